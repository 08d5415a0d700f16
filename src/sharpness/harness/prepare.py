"""The arrays of one run: training subset, held-out validation split, label noise; the test set stays clean."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sharpness.harness.config import IMAGEFOLDER, ConfigError, TrainConfig
from sharpness.harness.data import ArrayDataset, load_dataset, noisy_labels, train_val_split
from sharpness.harness.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PreparedData", "prepare_data", "input_statistics"]


@dataclass
class PreparedData:
    """What a run trains and evaluates on.

    ``train_labels`` are the labels trained on: the noisy ones, or a bootstrap run's predicted ones.
    ``clean_train_labels`` are the data set's, ``noisy_train_labels`` the config's label noise applied to them
    (equal to the clean ones without noise), both before any bootstrap override. ``val_*`` is the held-out
    split (``None`` without ``val_fraction``; its labels are clean), ``test_*`` the data set's clean test set.
    ``eval_split`` names the split that selects hyperparameters: ``val`` with ``eval_on: val``, else ``test``.
    """

    dataset: ArrayDataset
    train_images: np.ndarray
    train_labels: np.ndarray
    clean_train_labels: np.ndarray
    noisy_train_labels: np.ndarray
    val_images: np.ndarray | None
    val_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray
    eval_split: str

    @property
    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The evaluated splits by name: ``val`` first when ``eval_split`` is ``val``, then ``test``."""
        out = {}
        if self.eval_split == "val" and self.val_images is not None and self.val_labels is not None:
            out["val"] = (self.val_images, self.val_labels)
        out["test"] = (self.test_images, self.test_labels)
        return out


def prepare_data(config: TrainConfig, train_labels: np.ndarray | None = None) -> PreparedData:
    """The arrays of ``config``: ``train_subset``, then the seeded ``val_fraction`` hold-out, then label noise on
    the remaining training labels. ``train_labels`` (a bootstrap run's) replaces the labels trained on."""
    if config.dataset == IMAGEFOLDER:
        raise ValueError(
            f"dataset {IMAGEFOLDER} is streamed from its folder by the trainer (sharpness.harness.streaming), not "
            "loaded into memory; this command needs an in-memory data set"
        )
    ds = load_dataset(config.dataset, config.data_dir)
    x, y = ds.x_train, ds.y_train
    if config.train_subset is not None:
        x, y = x[: config.train_subset], y[: config.train_subset]
    val_x = val_y = None
    if config.val_fraction > 0:
        train_idx, val_idx = train_val_split(len(y), config.val_fraction, config.seed)
        if len(val_idx) == 0 or len(train_idx) == 0:
            raise ValueError(
                f"val_fraction {config.val_fraction:g} of {len(y)} training images leaves "
                f"{len(train_idx)} to train on and {len(val_idx)} to validate on; both need at least one"
            )
        val_x, val_y = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]
    noisy = y
    if config.label_noise > 0:
        noisy = noisy_labels(y, ds.num_classes, config.label_noise, seed=config.seed, kind=config.noise_kind)
    if train_labels is not None and len(train_labels) != len(y):
        raise ValueError(f"{len(train_labels)} replacement training labels for {len(y)} training images")
    return PreparedData(
        dataset=ds,
        train_images=x,
        train_labels=noisy if train_labels is None else np.asarray(train_labels, dtype=np.int64),
        clean_train_labels=y,
        noisy_train_labels=noisy,
        val_images=val_x,
        val_labels=val_y,
        test_images=ds.x_test,
        test_labels=ds.y_test,
        eval_split="val" if config.eval_on == "val" else "test",
    )


def input_statistics(config: TrainConfig, dataset: ArrayDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the run normalises with: the data set's own, or with ``normalization:
    imagenet`` ImageNet's (what an ImageNet-pretrained model was trained on)."""
    if config.normalization == "dataset":
        return tuple(dataset.mean), tuple(dataset.std)
    channels = dataset.x_train.shape[3]
    if channels != 3:
        raise ConfigError(f"normalization: imagenet needs RGB images; {config.dataset} has {channels} channel(s)")
    return IMAGENET_MEAN, IMAGENET_STD
