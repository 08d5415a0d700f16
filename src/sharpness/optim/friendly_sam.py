r"""Friendly-SAM (Li, Zhou, He, Cheng, Huang; "Friendly Sharpness-Aware Minimization", CVPR 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim._validation import check_nonnegative, check_probability
from sharpness.optim.directions import friendly, moving_average
from sharpness.optim.sam import SAM

__all__ = ["FriendlySAM"]


class FriendlySAM(SAM):
    r"""SAM perturbed along the clean gradient minus its running mean (the "full-gradient" component).

    With :math:`m` an exponential moving average of the raw clean gradients,

    .. math::
        d_t = g_t - \sigma m_{t-1}, \qquad m_t = \lambda m_{t-1} + (1-\lambda) g_t, \qquad
        \hat\epsilon_t = \rho\, d_t / \|d_t\| ,

    the average taken *after* its use and fed the raw gradient, never :math:`d_t` (pytorch-optimizer feeds it the
    modified one, which changes its decay to :math:`\lambda - \sigma(1-\lambda)`). As in the authors' code,
    :math:`m_1 = g_1` and the first step is SAM's; ``sigma = 0`` is SAM. A skipped step (inf/NaN) leaves
    :math:`m` as it was. Under fp16's GradScaler pass ``grad_scaler=`` (:math:`m` holds unscaled gradients).

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        sigma: :math:`\sigma`, the weight of the removed component.
        lmbda: :math:`\lambda`, the average's decay (the authors run 0.6 to 0.95).
        **options: SAM's other options and the base optimizer's.
    """

    _reads_gradient_scale = True
    _supports_subsets = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **options: Any,
    ) -> None:
        self.sigma = check_nonnegative(sigma, "sigma")
        self.lmbda = check_probability(lmbda, "lmbda")
        super().__init__(params, base_optimizer, rho, **options)
        self._average = self._param_state("average")

    def _direction(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        grads = self._unscaled(grads)
        previous = self._average.get(params)
        self._average.propose(params, moving_average(previous, grads, 1.0 - self.lmbda))
        return friendly(grads, previous, self.sigma)
