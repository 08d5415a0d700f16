"""The in-memory form every loader returns: uint8 channel-last images with int64 labels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_STATS_CHUNK = 2048  # images per chunk when summing pixels, to bound temporary memory


@dataclass(frozen=True, eq=False, repr=False)
class ArrayDataset:
    """A train/test image-classification data set held as numpy arrays.

    Images are ``uint8`` of shape ``(N, H, W, C)`` with ``C`` 1 or 3; labels are ``int64`` of shape
    ``(N,)`` in ``[0, num_classes)``. ``mean`` and ``std`` are the per-channel mean and (population)
    standard deviation of ``x_train / 255``, the values used to normalise inputs.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise ValueError(
                    f"{self.name}: x_{split} must be uint8 of shape (N, H, W, 1 or 3), got {x.dtype} {x.shape}"
                )
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: y_{split} must be int64 of shape ({x.shape[0]},), got {y.dtype} {y.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                f"{self.x_test.shape[1:]} differ in shape"
            )
        channels = self.x_train.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean and std need {channels} values, one per channel")

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        num_classes: int,
    ) -> ArrayDataset:
        """Build a data set from uint8 images and integer labels, computing ``mean`` and ``std``.

        Images may be ``(N, H, W)`` (a channel axis is added) or ``(N, H, W, C)``; labels of any
        integer dtype are converted to ``int64``.
        """
        x_train, x_test = _channel_last(x_train), _channel_last(x_test)
        mean, std = channel_stats(x_train)
        return cls(
            name=name,
            x_train=x_train,
            y_train=np.ascontiguousarray(y_train, dtype=np.int64),
            x_test=x_test,
            y_test=np.ascontiguousarray(y_test, dtype=np.int64),
            num_classes=num_classes,
            mean=mean,
            std=std,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        height, width, channels = self.x_train.shape[1:]
        return height, width, channels

    @property
    def num_channels(self) -> int:
        """Number of colour channels, 1 or 3."""
        return int(self.x_train.shape[-1])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def _channel_last(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., np.newaxis]
    return np.ascontiguousarray(images)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``images / 255`` for uint8 ``(N, H, W, C)`` images.

    The sums are exact integers, so the result does not depend on summation order.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected non-empty uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}")
    channels = images.shape[-1]
    total = [0] * channels
    total_sq = [0] * channels
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].reshape(-1, channels)
        squares = chunk.astype(np.uint32)
        squares *= squares
        sums = chunk.sum(axis=0, dtype=np.uint64)
        sums_sq = squares.sum(axis=0, dtype=np.uint64)
        for c in range(channels):
            total[c] += int(sums[c])
            total_sq[c] += int(sums_sq[c])
    count = images.size // channels
    mean = tuple(s / (count * 255) for s in total)
    std = tuple(math.sqrt(count * q - s * s) / (count * 255) for s, q in zip(total, total_sq, strict=True))
    return mean, std
