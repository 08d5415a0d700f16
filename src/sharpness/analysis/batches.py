"""Batches as nested tuples, lists and dicts of tensors: sizes, weights, casting and splitting.

The toolkit never looks inside a batch beyond this: the user's ``loss_fn(model, batch)`` does.
The batch size is the leading dimension of the first tensor found (depth first), and a data set's
loss is the example-weighted mean of the per-batch mean losses,

.. math::
    L(w) = \\frac{1}{N}\\sum_i \\ell_i(w) = \\sum_b \\frac{n_b}{N} L_b(w), \\qquad N = \\sum_b n_b,

which is why per-batch quantities (losses, gradients, Hessian-vector products) are combined with
weights :math:`n_b / N`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "map_tensors", "batch_size", "batch_weights", "prepare_batch", "split_batch"]

Batch = Any
"""A tensor, or a tuple / list / dict nesting of tensors (and other objects, left alone)."""


def map_tensors(batch: Batch, fn: Callable[[Tensor], Any]) -> Batch:
    """Apply ``fn`` to every tensor of ``batch``, keeping its structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(b, fn) for b in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    return batch


def _first_tensor(batch: Batch) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for b in values:
        t = _first_tensor(b)
        if t is not None:
            return t
    return None


def batch_size(batch: Batch) -> int:
    """The leading dimension of the first tensor in ``batch``."""
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError("cannot infer a batch size: the batch holds no tensor with a leading dimension")
    return int(t.shape[0])


def batch_weights(batches: Sequence[Batch], weights: Sequence[float] | None = None) -> list[float]:
    """Per-batch weights summing to 1: ``n_b / N`` by default, else the given ones normalised."""
    if len(batches) == 0:
        raise ValueError("no batches")
    raw = [float(batch_size(b)) for b in batches] if weights is None else [float(w) for w in weights]
    if len(raw) != len(batches):
        raise ValueError(f"got {len(raw)} weights for {len(batches)} batches")
    total = sum(raw)
    if not total > 0:
        raise ValueError("batch weights must have a positive sum")
    return [w / total for w in raw]


def prepare_batch(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
    """Move ``batch`` to ``device``; floating-point tensors are also cast to ``dtype`` when given."""

    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return map_tensors(batch, move)


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Split ``batch`` along its leading dimension into consecutive chunks of ``size`` examples.

    Every tensor whose leading dimension equals the batch size is split; other leaves are shared
    by all chunks. A last chunk with fewer than ``size`` examples is dropped (the caller can count
    the dropped examples as ``batch_size(batch) % size``).
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    n = batch_size(batch)
    starts = range(0, n - size + 1, size)

    def chunk(start: int) -> Batch:
        return map_tensors(batch, lambda t: t[start : start + size] if t.dim() > 0 and t.shape[0] == n else t)

    return [chunk(s) for s in starts]
