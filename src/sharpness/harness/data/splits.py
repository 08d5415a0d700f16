"""Holding out part of the training set for validation (the paper picks rho on a 10% hold-out)."""

from __future__ import annotations

import numpy as np


def train_val_split(num: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(train, val)`` partitioning ``range(num)``, drawn from a seeded permutation.

    ``val`` holds ``round(val_fraction * num)`` indices. Both arrays are int64 and sorted ascending, so
    they keep the data set's order; together they cover every index exactly once.
    """
    if num < 0:
        raise ValueError(f"num must be non-negative, got {num}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}")
    permutation = np.random.default_rng(seed).permutation(num)
    num_val = round(val_fraction * num)
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])
