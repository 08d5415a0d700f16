"""Each random stream of a run gets its own seed per (seed, epoch)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sharpness.harness.loader import epoch_permutation
from sharpness.harness.seeds import STREAMS, epoch_seed


def test_seed_is_the_seed_sequence_of_seed_epoch_and_stream():
    high, low = np.random.SeedSequence([7, 3, STREAMS["augment"]]).generate_state(2, dtype=np.uint32)
    assert epoch_seed(7, 3, "augment") == (int(high) << 32 | int(low)) & (2**63 - 1)


def test_streams_epochs_and_seeds_never_share_a_seed():
    seeds = [epoch_seed(s, e, k) for s, e, k in itertools.product(range(20), range(20), STREAMS)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)


def test_batch_order_and_augmentation_draw_differently():
    """They used to be seeded alike on the CPU (seed * 1_000_003 + epoch for both)."""
    order = epoch_permutation(50, seed=0, epoch=1, device=torch.device("cpu"))
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(epoch_seed(0, 1, "order")))
    assert torch.equal(order, expected)
    same_seed_order = torch.randperm(50, generator=torch.Generator().manual_seed(epoch_seed(0, 1, "augment")))
    assert not torch.equal(order, same_seed_order)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown random stream 'noise'"):
        epoch_seed(0, 0, "noise")
    with pytest.raises(ValueError, match=">= 0"):
        epoch_seed(-1, 0, "order")
