r"""How a variant forms its final gradient: inner products and orthogonal components of gradient lists.

A "vector" here is a list of tensors (one per parameter), as in :mod:`sharpness.optim.perturbation`; every
function works on the concatenation of the list and is built from ``torch._foreach_*`` ops (a few launches for
the whole list, no host synchronisation). Reductions accumulate in float64 (float32 on MPS). DTensors (FSDP2's
sharded gradients) count whole: elementwise work runs on the shards, and the reductions are all-reduced over them
(:func:`~sharpness.optim.perturbation.global_norm`).

- GSAM (Zhuang et al., 2022, Algorithm 1): :math:`\nabla f_p - \alpha\, \nabla f_\perp`, where
  :math:`\nabla f_\perp` is the component of the clean gradient orthogonal to the perturbed one
  (:func:`orthogonal`, then :func:`add_scaled`).
- LookSAM (Liu et al., 2022, eqs. 6-7): on a SAM step the component :math:`g_v` of the SAM gradient orthogonal to
  the clean one (:func:`orthogonal`); on the steps between, :math:`g + \alpha \frac{\|g\|}{\|g_v\|} g_v`
  (:func:`add_scaled` with :func:`norm_ratio`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sharpness.optim.perturbation import global_norm

__all__ = ["dot", "orthogonal", "add_scaled", "norm_ratio"]

_TINY = torch.finfo(torch.float32).tiny


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float32 if tensors[0].device.type == "mps" else torch.float64


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    r""":math:`\langle a, b\rangle` over the concatenations, a 0-dim tensor (float64, or float32 on MPS).

    The products are summed as :math:`\sum \max(a b, 0) - \sum \max(-a b, 0)`, two 1-norms, so the whole list
    reduces in a few foreach launches (a per-tensor ``sum`` would launch once per tensor).
    """
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"dot of lists of {len(a)} and {len(b)} tensors")
    products = torch._foreach_mul(a, b)
    dtype = _accumulation_dtype(a)
    positive = global_norm(torch._foreach_clamp_min(products, 0.0), 1.0, dtype=dtype)
    negative = global_norm(torch._foreach_clamp_max(products, 0.0), 1.0, dtype=dtype)
    return positive - negative


def orthogonal(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    r"""The component of :math:`a` orthogonal to :math:`b`: :math:`a - \frac{\langle a, b\rangle}{\|b\|^2} b`.

    A zero :math:`b` leaves :math:`a` whole.
    """
    a, b = list(a), list(b)
    b_sq = global_norm(b, 2.0, dtype=_accumulation_dtype(b)).square()
    coefficient = dot(a, b) / b_sq.clamp_min(_TINY)
    return add_scaled(a, b, -coefficient)


def add_scaled(a: Sequence[Tensor], b: Sequence[Tensor], scale: Tensor | float) -> list[Tensor]:
    """:math:`a + s\\, b` for a number or 0-dim tensor :math:`s`, out of place (one multiply, one add per device)."""
    a, b = list(a), list(b)
    if isinstance(scale, Tensor):
        scaled = []
        devices = {t.device for t in b}
        if len(devices) == 1:
            scaled = torch._foreach_mul(b, scale.to(device=b[0].device, dtype=b[0].dtype))
        else:
            scaled = [t * scale.to(device=t.device, dtype=t.dtype) for t in b]
        return torch._foreach_add(a, scaled)
    return torch._foreach_add(a, b, alpha=float(scale))


def norm_ratio(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    r""":math:`\|a\| / \|b\|` (2-norms of the concatenations); 0 when :math:`b = 0`."""
    dtype = _accumulation_dtype(list(a))
    norm_b = global_norm(list(b), 2.0, dtype=dtype)
    ratio = global_norm(list(a), 2.0, dtype=dtype) / norm_b.clamp_min(_TINY)
    return torch.where(norm_b > 0, ratio, torch.zeros_like(ratio))
