r"""Momentum-SAM (Becker, Altrock, Risse; "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead",
2023): one pass per step, perturbed along the base optimizer's momentum."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim.sam import SAM

__all__ = ["MSAM"]

# Where torch's optimizers keep their momentum: SGD (and RMSprop with momentum), then Adam, AdamW, NAdam, ...
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MSAM(SAM):
    r"""SAM's two passes replaced by one, at a point chosen from the momentum instead of a fresh gradient.

    With :math:`v_t` the base optimizer's momentum buffer (SGD's ``momentum_buffer``:
    :math:`v_t = \mu v_{t-1} + g_{t-1}`; Adam's first moment ``exp_avg``), each step takes the gradient at

    .. math:: \tilde w_t = w_t - \rho\, \frac{v_t}{\|v_t\|}

    (the authors' Figure 1: the perturbation is the *negative* normalised momentum, the norm global over all
    parameters) and lets the base optimizer apply it to :math:`w_t`. Before the first base step there is no
    momentum and the step is the base optimizer's own. ``rho = 0`` is the base optimizer exactly.

    Unlike the authors' implementation, which keeps the weights at :math:`\tilde w` between steps (and asks the
    training loop to move them back before evaluation and checkpoints), ``w`` is restored after the pass, so the
    model always holds :math:`w`; the weight decay of a coupled base optimizer (SGD) is then taken at :math:`w`,
    theirs at :math:`\tilde w`.

    One pass: call :meth:`first_step` *before* the forward pass (it needs no gradient), then the forward and
    backward, then :meth:`step` (or ``scaler.step(opt)``). ``opt.step(closure)`` does the same and returns the
    loss at :math:`\tilde w`.

    Args:
        params, base_optimizer, rho: as for :class:`SAM` (the authors use larger radii than SAM's, e.g. 0.3 to 3
            with SGD, since :math:`\tilde w` lies along a descent direction).
        **options: SAM's other options and the base optimizer's.
    """

    perturbs_before_pass = True
    _supports_subsets = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.3,
        **options: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, **options)
        sgd_without_momentum = [
            g for g in self.param_groups if isinstance(self.base_optimizer, torch.optim.SGD) and g["momentum"] == 0
        ]
        if sgd_without_momentum:
            raise ValueError("MSAM perturbs along the momentum: give the SGD base optimizer momentum > 0")

    def _direction(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        states = [self.state.get(p, {}) for p in params]
        buffers = [_momentum(state) for state in states]
        if any(state and buffer is None for state, buffer in zip(states, buffers, strict=True)):
            raise RuntimeError(
                f"MSAM found no momentum in {type(self.base_optimizer).__name__}'s state "
                f"(looked for {', '.join(_MOMENTUM_KEYS)})"
            )
        # Before a parameter's first base step it has no momentum and is not perturbed.
        return torch._foreach_neg(
            [torch.zeros_like(p) if b is None else b for p, b in zip(params, buffers, strict=True)]
        )


def _momentum(state: dict[str, Any]) -> Tensor | None:
    for key in _MOMENTUM_KEYS:
        value = state.get(key)
        if isinstance(value, Tensor):
            return value
    return None
