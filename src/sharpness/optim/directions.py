r"""Where a variant perturbs: the vector :math:`d` that eq. 2 normalises into :math:`\hat\epsilon = \rho d/\|d\|`.

SAM's :math:`d` is the clean gradient :math:`g`. The others, as pure functions of gradients and state (lists of
tensors, one per parameter, out of place: the caller decides what becomes state):

- :func:`negative_momentum`: MSAM's :math:`-v`, the base optimizer's momentum.
- :func:`gaussian`: :math:`z \sim N(0, I)`, the random control of the SAM paper (Appendix C.5).
- :func:`moving_average`: VaSSO's :math:`d_t = (1-\theta) d_{t-1} + \theta g_t`.
- :func:`friendly`: Friendly-SAM's :math:`g_t - \sigma m_{t-1}`, with :func:`moving_average` for :math:`m`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sharpness.optim import _sharded

__all__ = ["negative_momentum", "gaussian", "moving_average", "friendly"]


def negative_momentum(momenta: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """:math:`-v` per parameter; a parameter without momentum yet (before its first base step) gets 0."""
    return torch._foreach_neg([torch.zeros_like(p) if v is None else v for p, v in zip(params, momenta, strict=True)])


def gaussian(params: Sequence[Tensor], generators: dict[torch.device, torch.Generator]) -> list[Tensor]:
    """Standard normal noise shaped like ``params``: one draw per (device, dtype) from that device's generator.

    For DTensors (FSDP2) each rank draws its local shards only, sharded like the parameters: the generators must
    then differ between ranks.
    """
    shards = _sharded.local(params)
    out: list[Tensor | None] = [None] * len(params)
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(shards):
        kinds.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), idx in kinds.items():
        sizes = [shards[i].numel() for i in idx]
        flat = torch.randn(sum(sizes), generator=generators[device], device=device, dtype=dtype)
        for i, chunk in zip(idx, flat.split(sizes), strict=True):
            out[i] = _sharded.like(params[i], chunk.view_as(shards[i]))
    return out  # type: ignore[return-value]


def moving_average(previous: Sequence[Tensor] | None, grads: Sequence[Tensor], weight: float) -> list[Tensor]:
    r""":math:`(1 - w)\,\text{previous} + w\, g` (a copy of ``grads`` when there is no previous average yet)."""
    if previous is None:
        return torch._foreach_mul(list(grads), 1.0)
    return torch._foreach_lerp(list(previous), list(grads), weight)


def friendly(grads: Sequence[Tensor], average: Sequence[Tensor] | None, sigma: float) -> list[Tensor]:
    r""":math:`g - \sigma m` (the gradient itself when there is no average :math:`m` yet)."""
    if average is None:
        return list(grads)
    return torch._foreach_add(list(grads), list(average), alpha=-sigma)
