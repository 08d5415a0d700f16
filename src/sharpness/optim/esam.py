r"""ESAM (Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks", ICLR 2022)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim._validation import check_probability
from sharpness.optim.sam import SAM

__all__ = ["ESAM"]


class ESAM(SAM):
    r"""SAM with stochastic weight perturbation (SWP, §3.1) and sharpness-sensitive data selection (SDS, §3.2).

    **SWP.** Each parameter tensor takes part in a step's ascent with probability :math:`\beta`: the others sit out
    the clean pass's backward (``requires_grad`` is off for it, which is where the saving is) and are not perturbed.
    With :math:`\hat g` the clean gradient of the tensors that take part,
    :math:`\hat\epsilon = \frac{\rho}{\beta}\,\hat g / \|\hat g\|`. As in the authors' code the draw is made per
    tensor at the end of each step, for the next one (the first step uses every tensor), and a draw that would
    leave no tensor uses all of them.

    **SDS.** The perturbed pass runs on the :math:`\max(1, \lfloor \gamma B \rfloor)` examples of the batch whose
    loss rises the most, :math:`\ell_i(w + \hat\epsilon) - \ell_i(w)`, found by a forward pass without backward on
    the whole batch (:meth:`select`); the base optimizer applies that subset's mean gradient. (The authors' code
    keeps the examples strictly above the :math:`\lfloor\gamma B\rfloor`-th largest value, one fewer.) With
    ``rho = 0`` nothing is perturbed, no example is sharper than another, and the whole batch is used: the base
    optimizer's step exactly. ``beta = gamma = 1`` is SAM.

    The closure differs from SAM's: ``closure(index=None)`` runs the forward pass on the examples ``index`` (all
    of them when None) and returns their per-example losses (``reduction="none"``) without calling backward;
    ``opt.step(closure)`` calls it at :math:`w` (and backpropagates the mean), at :math:`w + \hat\epsilon` without
    gradients, and on the selected examples, and returns the batch's mean loss at :math:`w`. The manual loop::

        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()                     # under no_sync() when data-parallel
        opt.first_step()
        with torch.no_grad():
            sharper = F.cross_entropy(model(x), y, reduction="none")
        keep = opt.select(losses, sharper)
        F.cross_entropy(model(x[keep]), y[keep]).backward()
        opt.step()

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        beta: SWP's probability that a tensor is perturbed (the authors use 0.5 to 0.6).
        gamma: SDS's fraction of the batch in the perturbed pass (the authors use 0.5).
        seed: seed of SWP's draws (default: drawn from torch's global generator).
        **options: SAM's other options and the base optimizer's.
    """

    _supports_subsets = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        beta: float = 0.5,
        gamma: float = 0.5,
        seed: int | None = None,
        **options: Any,
    ) -> None:
        self.beta = check_probability(beta, "beta")
        self.gamma = check_probability(gamma, "gamma")
        if self.beta == 0 or self.gamma == 0:
            raise ValueError("beta and gamma must be > 0")
        super().__init__(params, base_optimizer, rho, **options)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.generator = torch.Generator().manual_seed(int(seed))
        self._frozen: list[Tensor] = []  # tensors sitting out the next clean backward (SWP)
        self._step_params: list[Tensor] = []

    def _radius(self, group: dict[str, Any]) -> float:
        return self._option(group, "sam_rho") / self.beta

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> bool:
        self._unfreeze()
        return super().first_step(zero_grad)

    @torch.no_grad()
    def select(self, clean_losses: Tensor, perturbed_losses: Tensor) -> Tensor:
        r"""SDS: the indices (ascending) of the :math:`\max(1, \lfloor\gamma B\rfloor)` examples with the largest
        :math:`\ell_i(w + \hat\epsilon) - \ell_i(w)`; all :math:`B` when nothing is perturbed or :math:`\gamma = 1`."""
        if clean_losses.shape != perturbed_losses.shape or clean_losses.dim() != 1:
            raise ValueError(
                f"select() needs per-example losses of one shape (reduction='none'), got "
                f"{tuple(clean_losses.shape)} and {tuple(perturbed_losses.shape)}"
            )
        n = clean_losses.numel()
        keep = max(1, int(n * self.gamma))
        if keep >= n or not self._run.perturbed:
            return torch.arange(n, device=clean_losses.device)
        sharpness = perturbed_losses.float() - clean_losses.float()
        return torch.topk(sharpness, keep, sorted=False).indices.sort().values

    def _closure_step(self, closure: Callable[..., Tensor]) -> Tensor:
        if self._pending():
            raise RuntimeError("step(closure) called between first_step() and second_step()")
        if getattr(self, "found_inf", None) is not None:
            raise RuntimeError("GradScaler.step(opt, closure) is not supported: use the two-pass form under GradScaler")
        with torch.enable_grad():
            losses = closure()
            if losses.dim() != 1:
                self._unfreeze()
                raise RuntimeError("ESAM's closure must return per-example losses (reduction='none')")
            losses.mean().backward()
        self._check_closure_gradients()
        try:
            self.first_step()
            with torch.no_grad():
                perturbed = closure()
            index = self.select(losses.detach(), perturbed)
            with torch.enable_grad():
                closure(index).mean().backward()
        except BaseException:
            self.abort_step()
            raise
        self._finish_step()
        return losses.detach().mean()

    def abort_step(self) -> None:
        self._unfreeze()
        super().abort_step()

    def _final_gradient(self, params: list[Tensor], clean: list[Tensor] | None, ascended: bool) -> None:
        self._step_params = params

    def _commit(self, skipped: Tensor | bool) -> None:
        params, self._step_params = self._step_params, []
        if self.beta >= 1 or not params:
            return
        frozen = torch.rand(len(params), generator=self.generator) >= self.beta
        if bool(frozen.all()):
            return
        self._frozen = [p for p, f in zip(params, frozen.tolist(), strict=True) if f and p.requires_grad]
        for param in self._frozen:
            param.requires_grad_(False)

    def _unfreeze(self) -> None:
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []

    def _extra_state(self) -> dict[str, Any]:
        index = self._param_index()
        return {"generator": self.generator.get_state(), "frozen": [index[p] for p in self._frozen]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._unfreeze()
        params = list(self._param_index())
        self._frozen = [params[int(i)] for i in state.get("frozen", [])]
        for param in self._frozen:
            param.requires_grad_(False)
