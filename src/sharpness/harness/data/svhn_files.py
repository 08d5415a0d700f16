"""Reading the SVHN cropped-digit files ``train_32x32.mat``, ``test_32x32.mat`` and ``extra_32x32.mat``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sharpness.harness.data.catalog import DatasetSpec
from sharpness.harness.data.checks import Split, TrainTest, check_split

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# ``svhn_extra`` trains on train + extra (the SAM paper's SVHN setting); the test set is the same.
SVHN_EXTRA_FILES = {"train": "train_32x32.mat", "extra": "extra_32x32.mat", "test": "test_32x32.mat"}


def svhn_files(spec: DatasetSpec) -> dict[str, str]:
    """The ``.mat`` files a data set of the SVHN family reads, by split."""
    return SVHN_EXTRA_FILES if spec.name == "svhn_extra" else SVHN_FILES


def read_svhn_mat(path: Path, spec: DatasetSpec) -> Split:
    """One split: ``X`` is ``(32, 32, 3, N)`` uint8, ``y`` is ``(N, 1)`` in 1..10 where 10 means digit 0."""
    import scipy.io  # imported here: slow to import and needed only for SVHN

    try:
        contents = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as error:  # scipy raises many unrelated types for damaged files
        raise ValueError(f"{path}: truncated or corrupt MATLAB file ({type(error).__name__}: {error})") from error
    if "X" not in contents or "y" not in contents:
        raise ValueError(f"{path}: expected variables X and y, found {', '.join(sorted(contents)) or 'none'}")
    images, labels = contents["X"], contents["y"]
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: expected X of shape (32, 32, 3, N), got {images.shape}")
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isin(labels, np.arange(11))):
        raise ValueError(f"{path}: expected labels y in 1..10 (10 meaning digit 0)")
    labels = labels.astype(np.int64) % 10
    return check_split(path, np.moveaxis(images, -1, 0), labels, spec.image_shape, spec.num_classes)


def read_svhn_files(files: dict[str, Path], spec: DatasetSpec) -> TrainTest:
    """Read the train and test ``.mat`` files; with an ``extra`` file, its digits follow the training set's."""
    train = read_svhn_mat(files["train"], spec)
    if "extra" in files:
        extra = read_svhn_mat(files["extra"], spec)
        train = Split(np.concatenate([train.images, extra.images]), np.concatenate([train.labels, extra.labels]))
    return TrainTest(train, read_svhn_mat(files["test"], spec))
