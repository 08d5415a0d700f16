r"""VaSSO: variance-suppressed sharpness-aware optimization (Li & Giannakis, NeurIPS 2023, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim._validation import check_probability
from sharpness.optim.directions import moving_average
from sharpness.optim.sam import SAM

__all__ = ["VaSSO"]


class VaSSO(SAM):
    r"""SAM perturbed along a moving average of the clean gradients, which lowers the perturbation's variance.

    .. math:: d_t = (1-\theta)\, d_{t-1} + \theta g_t, \qquad \hat\epsilon_t = \rho\, d_t / \|d_t\| ,

    :math:`\theta` weighting the *new* gradient and :math:`d_1 = g_1` (the authors' code): ``theta = 1`` is SAM.
    A skipped step (inf/NaN) leaves :math:`d` as it was. Under fp16's GradScaler pass ``grad_scaler=``
    (:math:`d` holds unscaled gradients).

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        theta: :math:`\theta` (the authors' default 0.9).
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
        theta: float = 0.9,
        **options: Any,
    ) -> None:
        self.theta = check_probability(theta, "theta")
        if self.theta == 0:
            raise ValueError("theta must be > 0 (theta = 0 never lets a new gradient in)")
        super().__init__(params, base_optimizer, rho, **options)
        self._average = self._param_state("average")

    def _direction(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        d = moving_average(self._average.get(params), self._unscaled(grads), self.theta)
        self._average.propose(params, d)
        return d
