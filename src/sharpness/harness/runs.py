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
from sharpness.harness.prepare import PreparedData, input_statistics, prepare_data

__all__ = ["LoadedRun", "load_run", "cross_entropy_loss"]


@dataclass
class LoadedRun:
    run_dir: Path
    config: TrainConfig
    model: nn.Module
    data: PreparedData
    augment: Augmentation
    device: torch.device
    weights_file: Path
    """The file the model's weights were read from (``model.pt`` or ``checkpoint.pt``)."""

    def split_size(self, split: str = "train") -> int:
        return len(self._split(split)[1])

    def batches(
        self,
        split: str = "train",
        batch_size: int = 256,
        num_batches: int | None = None,
        order: np.ndarray | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Normalised, un-augmented batches of the run's training labels (``train``) or of ``test``, on the device.

        The examples are taken in stored order, or in ``order`` (indices into the split); only the examples
        used are copied to the device.
        """
        images, labels = self._split(split)
        index = np.arange(len(labels)) if order is None else np.asarray(order)
        if num_batches is not None:
            index = index[: num_batches * batch_size]
        x = torch.from_numpy(images[index].transpose(0, 3, 1, 2).copy()).to(self.device)
        y = torch.from_numpy(labels[index]).long().to(self.device)
        return [
            (self.augment.normalize(x[i : i + batch_size]), y[i : i + batch_size])
            for i in range(0, len(index), batch_size)
        ]

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "train":
            return self.data.train_images, self.data.train_labels
        if split == "test":
            return self.data.dataset.x_test, self.data.dataset.y_test
        raise ValueError(f"split must be train or test, got {split!r}")


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The training loss of the harness's runs, in the ``loss_fn(model, batch)`` form of :mod:`sharpness.analysis`."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def load_run(run_dir: str | Path, device: str = "auto", weights: str | Path | None = None) -> LoadedRun:
    """Load ``run_dir``: its final ``model.pt``, else the model of its latest ``checkpoint.pt``.

    ``weights`` names another ``model.pt`` state dict or ``checkpoint.pt`` of this run's model to load instead.
    """
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
        image_size=config.upscale_to or ds.x_train.shape[1],
        **config.model_kwargs,
    )
    if weights is None:
        weights = run_dir / "model.pt" if (run_dir / "model.pt").is_file() else run_dir / "checkpoint.pt"
    weights = Path(weights)
    try:
        saved = load_checkpoint(weights)
    except ValueError as exc:
        raise ValueError(f"{weights}: not a readable model.pt or checkpoint.pt file") from exc
    state = saved["model"] if isinstance(saved, dict) and isinstance(saved.get("model"), dict) else saved
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{weights}: not weights of this run's model ({first})") from exc
    model.to(dev).eval()
    mean, std = input_statistics(config, ds)
    augment = build_augmentation("none", mean, std, image_size=ds.x_train.shape[1], output_size=config.upscale_to)
    augment.to(dev)
    return LoadedRun(run_dir, config, model, data, augment, dev, weights)
