"""Label noise as in the paper's robustness experiments (Foret et al., Table 4)."""

from __future__ import annotations

import numpy as np

NOISE_KINDS = ("symmetric", "asymmetric")


def noisy_labels(
    labels: np.ndarray, num_classes: int, fraction: float, seed: int, kind: str = "symmetric"
) -> np.ndarray:
    """A copy of ``labels`` with exactly ``round(fraction * N)`` of them changed.

    The changed positions are drawn uniformly without replacement. ``"symmetric"`` (the default, the
    paper's setting) gives each one a uniformly random *different* class; ``"asymmetric"`` maps class
    ``i`` to ``(i + 1) % num_classes``. The result is int64 and depends only on the arguments (the draw
    uses ``numpy.random.default_rng(seed)``); ``labels`` is not modified.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{labels.min()}, {labels.max()}]")

    noisy = labels.astype(np.int64, copy=True)
    rng = np.random.default_rng(seed)
    positions = rng.choice(len(noisy), size=round(fraction * len(noisy)), replace=False)
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=len(positions))
    else:
        shift = np.ones(len(positions), dtype=np.int64)
    noisy[positions] = (noisy[positions] + shift) % num_classes
    return noisy
