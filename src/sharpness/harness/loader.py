"""A data set held on the training device, served in shuffled batches with no host round trip."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sharpness.harness.seeds import epoch_seed

__all__ = ["DeviceData", "epoch_permutation"]


def epoch_permutation(num: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The order of epoch ``epoch``: a function of (seed, epoch) alone, so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, "order"))
    return torch.randperm(num, generator=gen).to(device)


class DeviceData:
    """Images (uint8, NCHW) and labels (int64) resident on ``device``.

    ``shard = (rank, world_size)``: :meth:`shuffled` serves this data-parallel rank's share of each batch;
    :meth:`in_order` serves every rank all of the data (not :attr:`per_rank`, unlike a streamed evaluation set).
    """

    per_rank = False

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, device: torch.device, shard: tuple[int, int] = (0, 1)
    ) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.device = device
        self.shard = shard

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def shuffled(self, batch_size: int, seed: int, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Training batches of epoch ``epoch`` from batch index ``start`` on (the last partial batch is dropped).

        Sharded, ``batch_size`` is the global batch: every rank cuts the same batches from the same order and
        keeps its contiguous ``batch_size / world_size`` examples of each, rank 0 the first.
        """
        rank, world = self.shard
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} does not divide over {world} ranks")
        local = batch_size // world
        order = epoch_permutation(len(self), seed, epoch, self.device)
        for i in range(start, self.num_batches(batch_size, drop_last=True)):
            idx = order[i * batch_size + rank * local : i * batch_size + (rank + 1) * local]
            yield self.images[idx], self.labels[idx]

    def in_order(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self), batch_size):
            yield self.images[i : i + batch_size], self.labels[i : i + batch_size]
