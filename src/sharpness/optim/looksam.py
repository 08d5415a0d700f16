r"""LookSAM (Liu, Mai, Chen, Hsieh, You; "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim._tensors import copy_
from sharpness.optim._validation import check_nonnegative
from sharpness.optim.gradients import add_scaled, norm_ratio, orthogonal
from sharpness.optim.sam import SAM
from sharpness.optim.schedules import Every

__all__ = ["LookSAM"]


class LookSAM(SAM):
    r"""SAM every ``k`` steps; in between, one pass that reuses the SAM gradient's direction (Algorithm 1).

    On steps :math:`t \equiv 0 \pmod k` a full SAM step (two passes) applies :math:`g_s = \nabla L(w + \hat\epsilon)`
    and keeps its component orthogonal to the clean gradient :math:`g`,

    .. math:: g_v = g_s - \frac{\langle g_s, g\rangle}{\|g\|^2}\, g ;

    on the other steps one pass at :math:`w` gives :math:`g`, and the base optimizer applies

    .. math:: g + \alpha \frac{\|g\|}{\|g_v\|}\, g_v ,

    the norms global over all parameters. Steps count from 0, so the first step is a SAM step; ``k = 1`` is SAM.
    Unlike pytorch-optimizer's LookSAM, the steps in between run one pass (not two), use :math:`g` once (not
    :math:`2g`), and apply the update from the current :math:`w`.

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        k: SAM's interval (the paper reports k = 5 and 10).
        alpha: :math:`\alpha`, the weight of the reused direction (0.7 in the paper's experiments).
        **options: SAM's other options and the base optimizer's.

    Manual loop: after the clean backward, ``if opt.first_step(): <perturbed backward>``, then ``opt.step()``.
    Data-parallel: run the clean pass under ``no_sync()`` only when ``opt.clean_pass_no_sync`` (per-replica
    perturbations, on SAM steps); on the steps in between it is the step's only pass and must be averaged.
    """

    _keeps_clean_gradient = True
    _supports_subsets = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        k: int = 5,
        alpha: float = 0.7,
        **options: Any,
    ) -> None:
        self.schedule = Every(k)
        self.alpha = check_nonnegative(alpha, "alpha")
        super().__init__(params, base_optimizer, rho, **options)
        self._gv = self._param_state("gv")  # g_v of the last SAM step

    @property
    def k(self) -> int:
        return self.schedule.k

    @property
    def next_step_ascends(self) -> bool:
        return self.schedule.ascends(self._steps)

    def _ascends(self, grads: list[Tensor]) -> bool:
        return self.next_step_ascends

    def _final_gradient(self, params: list[Tensor], clean: list[Tensor] | None, ascended: bool) -> None:
        grads = [p.grad for p in params]
        if ascended:
            if clean is not None and self._run.perturbed:  # rho = 0: g_s = g, nothing to reuse
                self._gv.propose(params, orthogonal(grads, self._average_over_replicas(clean)))
            return
        gv = self._gv.get(params)
        if self.alpha == 0 or gv is None:
            return
        copy_(grads, add_scaled(grads, gv, self.alpha * norm_ratio(grads, gv)), mixed=False)
