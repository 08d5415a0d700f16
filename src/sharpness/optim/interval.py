r"""SAM on some steps only, plain base-optimizer steps (one pass) on the others.

- :class:`IntervalSAM`: every ``k``-th step (Composer's ``interval``).
- :class:`StochasticSAM`: each step with probability ``p`` (randomized switching: Zhao et al., 2022).
- :class:`AESAM`: when the squared norm of the clean gradient is an outlier of its running statistics
  (Jiang, Yang, Zhang, Kwok; "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023).

In a manual loop: after the clean backward, ``if opt.first_step(): <perturbed backward>``, then ``opt.step()``.
Data-parallel with per-replica perturbations, the clean pass runs under ``no_sync()`` only where
``opt.clean_pass_no_sync`` is true, i.e. where ``opt.next_step_ascends`` is not False (for AESAM it is None, decided
by the gradient: run it under ``no_sync()``; on a step that then does not ascend AESAM averages the clean gradients
over the replicas itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim.perturbation import global_norm
from sharpness.optim.sam import SAM
from sharpness.optim.schedules import Every, GradientOutlier, WithProbability

__all__ = ["IntervalSAM", "StochasticSAM", "AESAM"]


class _Scheduled(SAM):
    """SAM whose steps ascend by a schedule known before the step."""

    _supports_subsets = False
    schedule: Every | WithProbability

    @property
    def next_step_ascends(self) -> bool:
        return self.schedule.ascends(self._steps)

    def _ascends(self, grads: list[Tensor]) -> bool:
        return self.next_step_ascends

    def _extra_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])


class IntervalSAM(_Scheduled):
    r"""A SAM step on steps :math:`0, k, 2k, \dots`; the base optimizer alone on the clean gradient in between.

    :math:`k` steps cost :math:`k + 1` passes instead of :math:`2k`; ``k = 1`` is SAM.

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        k: the interval.
        **options: SAM's other options and the base optimizer's.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        k: int = 2,
        **options: Any,
    ) -> None:
        self.schedule = Every(k)
        super().__init__(params, base_optimizer, rho, **options)


class StochasticSAM(_Scheduled):
    r"""A SAM step with probability :math:`p`, the base optimizer's step on the clean gradient otherwise.

    The expected cost is :math:`1 + p` passes per step; ``p = 1`` is SAM, ``p = 0`` the base optimizer. The draws
    come from a generator of its own, saved in :meth:`state_dict`.

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        probability: :math:`p`.
        seed: the generator's seed (default: drawn from torch's global generator).
        **options: SAM's other options and the base optimizer's.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        probability: float = 0.5,
        seed: int | None = None,
        **options: Any,
    ) -> None:
        self.schedule = WithProbability(probability, seed)
        super().__init__(params, base_optimizer, rho, **options)


class AESAM(SAM):
    r"""SAM on the steps whose clean gradient is unusually large (AE-SAM, Jiang et al., 2023, Algorithm 1).

    With :math:`\mu_t, \sigma_t^2` moving averages (decay :math:`\delta`) of :math:`\|g_t\|^2`, a step ascends
    when :math:`\|g_t\|^2 \ge \mu_t + c_t\sigma_t` (:class:`~sharpness.optim.schedules.GradientOutlier`), else
    it is the base optimizer's step on :math:`g_t`. The decision reads :math:`\|g_t\|^2` on the host: one
    synchronisation per step. Under fp16's GradScaler pass ``grad_scaler=`` (the norm must be unscaled).

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        c_start, c_end: the threshold :math:`c_t`, moving linearly from ``c_start`` to ``c_end`` over
            ``total_steps`` (constant ``c_start`` without ``total_steps``).
        decay: :math:`\delta` of the moving averages.
        total_steps: the length of :math:`c_t`'s schedule in steps.
        **options: SAM's other options and the base optimizer's.
    """

    _supports_subsets = False
    _reads_gradient_scale = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        c_start: float = 0.0,
        c_end: float | None = None,
        decay: float = 0.9,
        total_steps: int | None = None,
        **options: Any,
    ) -> None:
        self.schedule = GradientOutlier(c_start, c_end, decay, total_steps)
        super().__init__(params, base_optimizer, rho, **options)

    @property
    def next_step_ascends(self) -> None:
        return None

    def _ascends(self, grads: list[Tensor]) -> bool:
        if not grads:
            return True
        # Averaged over data-parallel replicas (when per replica), so that all of them take the same decision.
        sq_norm = self._average_over_replicas([global_norm(self._unscaled(grads), 2.0).square()])[0]
        ascends = self.schedule.ascends(self._steps, float(sq_norm))
        if not ascends:
            self._average_over_replicas([p.grad for p in self._with_grad()])
        return ascends

    def _extra_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
