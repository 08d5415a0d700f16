r"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang et al., ICLR 2022, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim._validation import check_nonnegative, check_rho
from sharpness.optim.gradients import orthogonal
from sharpness.optim.sam import SAM

__all__ = ["GSAM"]


class GSAM(SAM):
    r"""SAM that also lowers the surrogate gap :math:`h(w) = f_p(w) - f(w)`.

    With :math:`g = \nabla f(w)` (the clean pass) and :math:`g_p = \nabla f(w + \hat\epsilon)`,
    :math:`\hat\epsilon = \rho_t g / \|g\|` (eq. 2), the base optimizer applies

    .. math::
        d = g_p - \alpha\, g_\perp, \qquad g_\perp = g - \frac{\langle g, g_p\rangle}{\|g_p\|^2}\, g_p,

    the perturbed gradient minus :math:`\alpha` times the component of the clean gradient orthogonal to it, which
    descends :math:`f_p` and ascends :math:`f` along :math:`g_\perp`, shrinking the gap (Algorithm 1). The radius
    follows the learning rate, as in the paper's experiments and the authors' code:

    .. math:: \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})\,
              \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}}

    per parameter group, with :math:`\eta_t` the group's learning rate at the step (unclamped, as in the authors'
    code: below :math:`\eta_{\min}` in a warm-up, :math:`\rho_t < \rho_{\min}`, though never below 0).
    ``rho_min = rho`` (the default) keeps :math:`\rho` constant; ``alpha = 0`` with a constant radius is SAM.

    Args:
        params, base_optimizer: as for :class:`SAM`.
        rho: :math:`\rho_{\max}`.
        rho_min: :math:`\rho_{\min}` (default ``rho``: constant radius).
        alpha: :math:`\alpha` (0.4 in the authors' PyTorch example, 0.6 in their ViT config).
        lr_max: :math:`\eta_{\max}` (default: each group's learning rate when GSAM is built).
        lr_min: :math:`\eta_{\min}` (default 0, the end of a cosine schedule).
        **options: SAM's other options (``p``, ``adaptive``, ``eta``, ``model``, ``max_grad_norm``,
            ``skip_nonfinite``, ``grad_scaler``) and the base optimizer's.

    Data-parallel with per-replica perturbations, the clean pass runs under ``no_sync()`` (each replica perturbs
    with its own gradient); the decomposition is linear in :math:`g`, and GSAM averages the clean gradients over
    the replicas before it (one more all-reduce of a gradient), so every replica applies the same :math:`d`. The
    authors' code instead decomposes each replica's own pair and averages the :math:`d`'s, which differs by the
    replicas' spread of :math:`g_p`. With global perturbations (``perturbation="global"``, and under FSDP) the
    clean gradient is already the average.
    """

    _keeps_clean_gradient = True
    _supports_subsets = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        rho_min: float | None = None,
        alpha: float = 0.4,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **options: Any,
    ) -> None:
        self.alpha = check_nonnegative(alpha, "alpha")
        self.rho_min = check_rho(rho if rho_min is None else rho_min, "rho_min")
        if self.rho_min > check_rho(rho):
            raise ValueError(f"rho_min ({self.rho_min}) must not exceed rho ({rho})")
        self.lr_max = None if lr_max is None else check_nonnegative(lr_max, "lr_max")
        self.lr_min = check_nonnegative(lr_min, "lr_min")
        super().__init__(params, base_optimizer, rho, **options)
        for group in self.param_groups:
            group.setdefault("gsam_lr_max", group["lr"] if self.lr_max is None else self.lr_max)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if getattr(self, "base_optimizer", None) is not None:
            group = self.param_groups[-1]
            group.setdefault("gsam_lr_max", group["lr"] if self.lr_max is None else self.lr_max)

    def _radius(self, group: dict[str, Any]) -> float:
        rho_max = self._option(group, "sam_rho")
        if rho_max == 0:
            return 0.0
        lr_max, lr = group["gsam_lr_max"], float(group["lr"])
        if lr_max <= self.lr_min:
            return rho_max
        rho_min = min(self.rho_min, rho_max)
        return max(0.0, rho_min + (rho_max - rho_min) * (lr - self.lr_min) / (lr_max - self.lr_min))

    def _final_gradient(self, params: list[Tensor], clean: list[Tensor] | None, ascended: bool) -> None:
        if clean is None or self.alpha == 0 or not self._run.perturbed:
            return  # rho = 0: nothing was perturbed and d is the clean gradient, as for the base optimizer
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, orthogonal(self._average_over_replicas(clean), grads), alpha=-self.alpha)
