"""Seeds of the random streams of a run, one per (seed, epoch, stream[, rank]), mixed by numpy's ``SeedSequence``.

A run draws from three streams each epoch: the batch order, the augmentation and torch's global generator
(initialisation, dropout, shake-shake); the optimizers that draw (ESAM, StochasticSAM, the random direction) seed
their generators once from the ``optimizer`` stream of epoch 0. Hashing (seed, epoch, stream) gives each its
own seed, so no two streams, epochs or runs share one by an arithmetic coincidence (``seed * K + epoch`` gave
the batch order and the augmentation the same seed).

Data-parallel runs (docs/distributed.md) give each rank its own augmentation and torch stream: rank ``r > 0``
hashes (seed, epoch, stream, r), and rank 0 hashes what one process does, so its streams are the single-process
ones. The batch order and the optimizer's stream stay shared by all ranks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STREAMS", "epoch_seed"]

STREAMS: dict[str, int] = {"order": 0, "augment": 1, "torch": 2, "optimizer": 3}


def epoch_seed(seed: int, epoch: int, stream: str, rank: int = 0) -> int:
    """A 63-bit seed for ``stream`` (one of :data:`STREAMS`) in epoch ``epoch`` of a run seeded ``seed``, on
    data-parallel rank ``rank`` (0: the single-process seed)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; choose one of {', '.join(STREAMS)}")
    if seed < 0 or epoch < 0 or rank < 0:
        raise ValueError(f"seed, epoch and rank must be >= 0, got {seed}, {epoch} and {rank}")
    entropy = [seed, epoch, STREAMS[stream]] + ([rank] if rank else [])
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) & ((1 << 63) - 1)
