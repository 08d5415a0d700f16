r"""The SAM perturbation as pure functions of gradients (and, for ASAM, parameters).

For a loss :math:`L(w)` with gradient :math:`g`, the paper's eq. (2) solves the first-order
inner maximisation :math:`\max_{\|\epsilon\|_p \le \rho} \epsilon^\top g` in closed form:

.. math::
    \hat\epsilon(w) = \rho \, \mathrm{sign}(g) \, \frac{|g|^{q-1}}{\left(\|g\|_q^q\right)^{1/p}},
    \qquad \frac1p + \frac1q = 1,

where :math:`(\|g\|_q^q)^{1/p} = \|g\|_q^{q-1}`. For :math:`p = 2` this is :math:`\rho g / \|g\|_2`;
for :math:`p = \infty` (:math:`q = 1`) it is :math:`\rho\,\mathrm{sign}(g)`.

Adaptive SAM (ASAM, Kwon et al. 2021) solves the same problem in the coordinates
:math:`\tilde\epsilon = T_w^{-1}\epsilon` with :math:`T_w = |w| + \eta`, which gives
:math:`\hat\epsilon = \rho\, T_w \,\mathrm{sign}(T_w g)|T_w g|^{q-1} / \|T_w g\|_q^{q-1}`
(for :math:`p = 2`: :math:`\rho T_w^2 g / \|T_w g\|_2`).

The norm is global: it runs over every tensor passed in, so the caller decides which parameters
share one ball. For DTensors (FSDP2's sharded gradients) it runs over the whole tensors: each rank's part,
all-reduced over the shards (a collective on device tensors). Everything here is built from out-of-place
``torch._foreach_*`` ops: one kernel launch per op for the whole list, no host synchronisation, and
differentiable by autograd (which the second-order variant of SAM uses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from sharpness.optim import _sharded

__all__ = ["Perturbation", "dual_exponent", "global_norm", "adaptive_scale", "perturbation"]

# Smallest norm we divide by (float32's smallest normal): a zero gradient gives a zero perturbation, not NaN.
_TINY = torch.finfo(torch.float32).tiny


class Perturbation(NamedTuple):
    """Result of :func:`perturbation`."""

    eps: list[Tensor]
    """:math:`\\hat\\epsilon`, one tensor per input gradient."""
    dual_norm: Tensor
    """:math:`\\|T g\\|_q` as a 0-dim float64 tensor (float32 on MPS); non-finite when any gradient is."""


def dual_exponent(p: float) -> float:
    """The exponent :math:`q` with :math:`1/p + 1/q = 1` (``p = inf`` gives 1)."""
    if not p > 1.0:
        raise ValueError(f"p must be > 1 (p = 1 has no unique maximiser), got {p}")
    return 1.0 if math.isinf(p) else p / (p - 1.0)


def global_norm(
    tensors: Sequence[Tensor],
    ord: float = 2.0,
    dtype: torch.dtype | None = None,
    *,
    sharding: Sequence[_sharded.Sharding] | None = None,
) -> Tensor:
    """The ``ord``-norm of the concatenation of ``tensors``, as a 0-dim tensor.

    Accumulates in ``dtype`` (float64 if a tensor is), by default in float64 whatever the tensors' dtype
    (float32 on MPS, which has no float64): squares of float32 gradients below 1e-19 or above 1e19 underflow or
    overflow in float32, not in float64. Per-device partial norms are gathered onto the first tensor's device
    (no host synchronisation).

    DTensors (FSDP2's sharded parameters and gradients) count whole: each rank's part is reduced over the shards
    by one all-reduce per mesh, and every rank gets the same plain tensor. ``sharding`` is for callers that pass
    the DTensors' local shards instead: each shard's sharding, as :func:`sharpness.optim._sharded.unwrap` gives it.
    """
    if len(tensors) == 0:
        raise ValueError("global_norm of an empty list")
    if sharding is None:
        tensors, sharding = _sharded.unwrap(tensors)
    device = tensors[0].device
    if dtype is None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
    elif any(t.dtype == torch.float64 for t in tensors):
        dtype = torch.float64  # never narrower than the tensors
    if sharding is not None:
        return _sharded.norm(tensors, sharding, ord, dtype)
    norms = torch._foreach_norm(list(tensors), ord, dtype=dtype)
    try:
        stacked = torch.stack(norms)
    except RuntimeError:  # tensors on several devices
        stacked = torch.stack([n.to(device) for n in norms])
    return torch.linalg.vector_norm(stacked, ord)


def adaptive_scale(params: Sequence[Tensor], eta: float | Sequence[float] = 0.01) -> list[Tensor]:
    """ASAM's diagonal :math:`T_w = |w| + \\eta`, one tensor per parameter (``eta`` a float or one per tensor)."""
    eta = float(eta) if isinstance(eta, int | float) else [float(e) for e in eta]
    return torch._foreach_add(torch._foreach_abs(list(params)), eta)


def perturbation(
    grads: Sequence[Tensor],
    rho: float | Sequence[float],
    p: float = 2.0,
    scale: Sequence[Tensor | None] | None = None,
    *,
    sharding: Sequence[_sharded.Sharding] | None = None,
) -> Perturbation:
    """:math:`\\hat\\epsilon` of eq. (2) for the concatenation of ``grads``.

    Args:
        grads: gradients :math:`g`, one tensor per parameter.
        rho: radius :math:`\\rho`, a float or one float per tensor (a per-tensor radius scales that
            tensor's share of the direction; the direction itself is normalised globally).
        p: the norm of the ball, ``p > 1`` (``math.inf`` allowed).
        scale: optional ASAM scale :math:`T_w` per tensor (see :func:`adaptive_scale`); ``None``
            entries mean :math:`T = 1` for that tensor.
        sharding: when ``grads`` (and ``scale``) are the local shards of DTensors, each one's sharding
            (see :func:`global_norm`); DTensors themselves need none.

    Returns:
        The perturbation and the dual norm :math:`\\|T g\\|_q` it was normalised by. If any gradient is
        inf/NaN, every entry of the perturbation is NaN, so that a pass at :math:`w + \\hat\\epsilon` is
        non-finite too and whatever watches that pass (``GradScaler``, a skip check) sees the overflow.

    For ``p`` other than 2 and inf the powers :math:`|s|^{q-1}` are taken after dividing by
    :math:`\\max|s|`, which leaves :math:`\\hat\\epsilon` unchanged (it is homogeneous of degree 0) and keeps
    them clear of underflow and overflow.
    """
    grads = list(grads)
    if len(grads) == 0:
        raise ValueError("perturbation of an empty gradient list")
    q = dual_exponent(p)
    scaled = _apply_scale(grads, scale)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in scaled)

    if q == 2.0:
        dual_norm = global_norm(scaled, 2.0, sharding=sharding)
        direction, denominator = scaled, dual_norm
    elif q == 1.0:
        dual_norm = global_norm(scaled, 1.0, sharding=sharding)
        direction, denominator = torch._foreach_sign(scaled), torch.ones_like(dual_norm)
    else:
        peak = global_norm(scaled, math.inf, sharding=sharding).clamp_min(_TINY)
        unit = _div(scaled, peak, differentiable)
        unit_norm = global_norm(unit, q, sharding=sharding)
        dual_norm = unit_norm * peak
        direction = torch._foreach_mul(torch._foreach_sign(unit), torch._foreach_pow(torch._foreach_abs(unit), q - 1.0))
        denominator = unit_norm.pow(q - 1.0)
    # (||s||_q^q)^(1/p) = ||s||_q^(q-1); NaN when a gradient is not finite, which poisons every entry.
    denominator = torch.where(torch.isfinite(dual_norm), denominator.clamp_min(_TINY), math.nan)
    if isinstance(rho, int | float):  # fold rho into the normaliser: one pass over the tensors
        eps = _div(direction, denominator / float(rho) if rho != 0 else denominator * math.inf, differentiable)
        if scale is not None:
            eps = _apply_scale(eps, scale, inplace=not differentiable)
        return Perturbation(eps, dual_norm)
    rho = [float(r) for r in rho]
    if len(rho) != len(grads):
        raise ValueError(f"got {len(rho)} radii for {len(grads)} gradients")
    eps = _div(direction, denominator, differentiable)
    if scale is not None:
        eps = _apply_scale(eps, scale, inplace=not differentiable)
    if differentiable:
        eps = torch._foreach_mul(eps, rho)
    else:
        torch._foreach_mul_(eps, rho)
    return Perturbation(eps, dual_norm)


def _div(tensors: list[Tensor], scalar: Tensor, differentiable: bool) -> list[Tensor]:
    """``[t / scalar for t in tensors]`` with one launch per device."""
    if differentiable:  # torch 2.13: foreach ops cannot backprop into a tensor scalar
        return [t / scalar.to(t.device) for t in tensors]
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return torch._foreach_div(tensors, _operand(scalar, tensors))
    out: list[Tensor] = list(tensors)
    for device in devices:
        idx = [i for i, t in enumerate(tensors) if t.device == device]
        picked = [tensors[i] for i in idx]
        for i, t in zip(idx, torch._foreach_div(picked, _operand(scalar, picked)), strict=True):
            out[i] = t
    return out


def _operand(scalar: Tensor, tensors: list[Tensor]) -> Tensor:
    """The 0-dim ``scalar`` on the tensors' device and, when they are all float32, in float32.

    CUDA's one-launch ``_foreach_div(tensors, scalar)`` needs the scalar in the tensors' dtype (otherwise it falls
    back to one kernel per tensor); the division casts a float64 scalar to float32 either way, so the result is
    the same.
    """
    dtype = torch.float32 if all(t.dtype == torch.float32 for t in tensors) else scalar.dtype
    return scalar.to(device=tensors[0].device, dtype=dtype)


def _apply_scale(tensors: list[Tensor], scale: Sequence[Tensor | None] | None, inplace: bool = False) -> list[Tensor]:
    """Multiply each tensor by its scale; ``None`` (for the list or an entry) leaves it as is."""
    if scale is None:
        return tensors
    scale = list(scale)
    if len(scale) != len(tensors):
        raise ValueError(f"got {len(scale)} scales for {len(tensors)} tensors")
    idx = [i for i, s in enumerate(scale) if s is not None]
    picked, factors = [tensors[i] for i in idx], [scale[i] for i in idx]
    if inplace:
        if picked:
            torch._foreach_mul_(picked, factors)
        return tensors
    out = list(tensors)
    if picked:
        for i, t in zip(idx, torch._foreach_mul(picked, factors), strict=True):
            out[i] = t
    return out
