"""Validation of arrays read from files, raising ``ValueError`` that names the file and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """Images ``(N, H, W, C)`` uint8 and labels ``(N,)`` int64 of one split."""

    images: np.ndarray
    labels: np.ndarray


def check_split(
    source: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    image_shape: tuple[int, int, int],
    num_classes: int,
) -> Split:
    """Check and normalise one split read from ``source``.

    ``(N, H, W)`` images gain a channel axis; labels become int64. Raises ``ValueError`` naming
    ``source`` when the dtype, shape, count or label range is not what the data set needs.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 images, got dtype {images.dtype}")
    if images.ndim == 3 and image_shape[-1] == 1:
        images = images[..., np.newaxis]
    if images.ndim != 4 or images.shape[1:] != image_shape:
        raise ValueError(
            f"{source}: expected images of shape (N, {', '.join(map(str, image_shape))}), got {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{source}: expected at least one image, got none")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: expected a 1-D integer label array, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{source}: expected {images.shape[0]} labels (one per image), got {labels.shape[0]}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{source}: expected labels in [0, {num_classes - 1}], got values in [{low}, {high}]")
    return Split(np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int64))


class TrainTest(NamedTuple):
    """The two splits of a data set as read from its files."""

    train: Split
    test: Split
