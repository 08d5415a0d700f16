"""A finished (or checkpointed) run, loaded back for analysis: its config, model and data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from sharpness.harness.augment import Augmentation, build_augmentation
from sharpness.harness.build import resolve_device
from sharpness.harness.checkpoint import load_checkpoint
from sharpness.harness.config import TrainConfig
from sharpness.harness.models import build_model
from sharpness.harness.prepare import PreparedData, prepare_data

__all__ = ["LoadedRun", "load_run", "cross_entropy_loss"]


@dataclass
class LoadedRun:
    run_dir: Path
    config: TrainConfig
    model: nn.Module
    data: PreparedData
    augment: Augmentation
    device: torch.device

    def batches(
        self,
        split: str = "train",
        batch_size: int = 256,
        num_batches: int | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Normalised, un-augmented batches of the run's training labels (``train``) or of ``test``, on the device."""
        if split == "train":
            images, labels = self.data.train_images, self.data.train_labels
        elif split == "test":
            images, labels = self.data.dataset.x_test, self.data.dataset.y_test
        else:
            raise ValueError(f"split must be train or test, got {split!r}")
        count = len(labels) if num_batches is None else min(len(labels), num_batches * batch_size)
        x = torch.from_numpy(images[:count].transpose(0, 3, 1, 2).copy()).to(self.device)
        y = torch.from_numpy(labels[:count]).long().to(self.device)
        return [
            (self.augment.normalize(x[i : i + batch_size]), y[i : i + batch_size]) for i in range(0, count, batch_size)
        ]


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The training loss of the harness's runs, in the ``loss_fn(model, batch)`` form of :mod:`sharpness.analysis`."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def load_run(run_dir: str | Path, device: str = "auto") -> LoadedRun:
    """Load ``run_dir``: its final ``model.pt``, else the model of its latest ``checkpoint.pt``."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    values = yaml.safe_load(config_file.read_text())
    values["device"] = device
    config = TrainConfig.from_dict(values, source=str(config_file))
    dev = resolve_device(device)
    labels_file = run_dir / "train_labels.npy"  # a bootstrap run trained on another model's predictions
    data = prepare_data(config, np.load(labels_file) if labels_file.is_file() else None)
    ds = data.dataset
    model = build_model(
        config.model,
        ds.num_classes,
        in_channels=ds.x_train.shape[3],
        image_size=ds.x_train.shape[1],
        **config.model_kwargs,
    )
    if (run_dir / "model.pt").is_file():
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    else:
        state = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    model.load_state_dict(state)
    model.to(dev).eval()
    augment = build_augmentation("none", ds.mean, ds.std, image_size=ds.x_train.shape[1]).to(dev)
    return LoadedRun(run_dir, config, model, data, augment, dev)
