r"""Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021), Algorithm 1."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpness.optim import _sharded
from sharpness.optim._tensors import (
    Copies,
    ParamState,
    all_reduce_any,
    all_reduce_mean_,
    by_device,
    copy_,
    layout,
    mixed,
)
from sharpness.optim._validation import check_p, check_positive, check_positive_int, check_rho
from sharpness.optim.perturbation import adaptive_scale, global_norm, perturbation

__all__ = ["SAM"]

# SAM's per-group options live in the group dicts it shares with the base optimizer, under these keys. The bare
# names are accepted in the groups given to SAM unless the base optimizer has a hyperparameter of that name
# (Adadelta's ``rho``), which then keeps it.
_GROUP_KEYS = {"rho": "sam_rho", "adaptive": "sam_adaptive", "eta": "sam_eta"}

_PERTURBATIONS = ("per_replica", "global")


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer.

    SAM minimises :math:`\max_{\|\epsilon\|_p \le \rho} L(w + \epsilon)` (eq. 1). Each step

    1. takes the gradient :math:`g = \nabla L(w)` of the clean pass and moves to :math:`w + \hat\epsilon(w)`
       with :math:`\hat\epsilon = \rho\,\mathrm{sign}(g)|g|^{q-1} / \|g\|_q^{q-1}` (eq. 2; :math:`\rho g/\|g\|_2`
       for :math:`p = 2`), the norm running over all perturbed parameters of all groups;
    2. takes the gradient there, :math:`\nabla L(w)|_{w + \hat\epsilon}` (eq. 3), restores :math:`w` exactly
       (from a copy: subtracting :math:`\hat\epsilon` is not exact in floating point) and lets the base optimizer
       apply that gradient to :math:`w`.

    Options: ASAM (``adaptive``; :math:`T_w = |w| + \eta`, :math:`\hat\epsilon = \rho T_w^2 g / \|T_w g\|`),
    per-group ``rho`` (a group with ``rho=0`` is neither perturbed nor part of the norm), ``ascent_steps``
    (Appendix C.6: :math:`k` steps of radius :math:`\rho/k`, each along eq. 2 at the current point, so the
    perturbation stays in the ball for every :math:`p`), ``second_order`` (Appendix C.4: the exact gradient of
    :math:`L(w + \hat\epsilon(w))`, adding :math:`(d\hat\epsilon/dw)^\top \nabla L(w + \hat\epsilon)` by a
    Hessian-vector product; costs a third pass), and m-sharpness training (§4.1, :meth:`next_subset`).

    Args:
        params: parameters or parameter groups; groups may set ``rho``, ``adaptive`` and ``eta`` (stored as
            ``sam_rho``, ``sam_adaptive``, ``sam_eta``; spell them so when the base optimizer has an option of
            the bare name, as Adadelta has ``rho``).
        base_optimizer: an optimizer class, built on SAM's groups with ``**base_kwargs``, or an optimizer
            instance built on exactly the same parameters.
        rho: radius :math:`\rho \ge 0` of the neighbourhood.
        p: the norm of the ball, in :math:`(1, \infty]`.
        adaptive: use ASAM's scale-invariant ball.
        eta: ASAM's :math:`\eta`.
        adaptive_weights_only: scale only parameters whose name contains ``"weight"``, as the ASAM authors'
            code does (biases then get :math:`T = 1`); needs ``model``. Default ``False``: every parameter,
            as in the ASAM paper.
        model: if given, every buffer of the model (BatchNorm running statistics, ``num_batches_tracked``, ...)
            ends the step exactly as the clean pass left it: the perturbed pass has no side effects. Pass it for
            any model with buffers. (Variants whose only pass is at the perturbed point, MSAM, keep its.)
        ascent_steps: number :math:`k` of inner ascent steps (default 1, the paper's SAM).
        second_order: add the second-order term (closure form only; the closure must call
            ``loss.backward(create_graph=opt.create_graph)``).
        max_grad_norm: if set, clip the final (unscaled) gradient to this global 2-norm before the base step.
        skip_nonfinite: skip the base step (and leave :math:`w` untouched) when a gradient of either pass is
            not finite. Fused base optimizers (``fused=True``) skip on the device once every parameter has had
            one base step; before that, and always with other base optimizers, SAM reads the flag on the host
            once per step.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 loop, for the variants whose first step reads the
            size of the clean gradient (FriendlySAM, VaSSO, AESAM); SAM itself needs none (eq. 2 is invariant to
            the loss scale).
        perturbation: under data parallelism, the gradient the clean pass leaves in ``.grad``:
            ``"per_replica"`` (each replica's own, the paper's m-sharpness: DDP's clean pass under ``no_sync()``,
            see :attr:`clean_pass_no_sync`) or ``"global"`` (averaged over all replicas: DDP without
            ``no_sync()``, or FSDP). Default: ``"global"`` for FSDP2's DTensor parameters, where it is the only
            scheme (``"per_replica"`` raises), else ``"per_replica"``. The variants that mix the clean gradient
            into their final one (GSAM, LookSAM, AESAM) average it over the replicas only when it is per replica.
        process_group: the data-parallel group of DDP's replicas (default: the default group once
            ``torch.distributed`` is initialised). With more than one process in it, the skip flag of
            ``skip_nonfinite`` is all-reduced (MAX) every step, so that a non-finite gradient on any replica
            skips the step on all of them. Unused under FSDP, whose gradients come reduced.
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Under FSDP2 (``fully_shard``; parameters and gradients are DTensors) every norm and inner product, eq. 2's
    included, runs over the whole tensors (each rank's part, all-reduced: a collective on device tensors, no host
    synchronisation), so :math:`\rho` means what it means on one device; :math:`\hat\epsilon` is the global one
    (FSDP's gradients come averaged: per-replica :math:`\hat\epsilon` is not defined when each rank holds part
    of :math:`w`). The copies of :math:`w` and the variants' state are sharded like the parameters. Pass
    ``model=`` (the FSDP-wrapped root): SAM then also reshards its modules around the perturbed pass, without
    which ``reshard_after_backward=False`` would run that pass at :math:`w`. ``second_order`` raises (FSDP's
    gradients carry no graph), and so does ``first_step()`` finding no gradient (the clean pass must run with
    FSDP's gradient synchronisation on). Fused AdamW works; fused SGD does not (torch 2.13 has no DTensor rule
    for it): use ``foreach=True``.

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)  # calls closure at w and at w + eps, returns the loss at w

    The two-pass form for custom loops is ``first_step()``, a second forward/backward, ``second_step()``
    (or a plain ``step()``, as trainers and ``GradScaler.step`` call it).

    The variants (:mod:`sharpness.optim`) subclass SAM and change one of three things: *where* it perturbs
    (:meth:`_direction`), *when* a step runs the ascent (:meth:`_ascends`), and *how* the final gradient is
    formed (:meth:`_final_gradient`); everything above holds for each of them.
    """

    _step_supports_amp_scaling = True  # GradScaler.step calls our step(), which unscales and skips itself.

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        p: float = 2.0,
        adaptive: bool = False,
        eta: float = 0.01,
        *,
        adaptive_weights_only: bool = False,
        model: nn.Module | None = None,
        ascent_steps: int = 1,
        second_order: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = True,
        grad_scaler: torch.amp.GradScaler | None = None,
        perturbation: str | None = None,
        process_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        check_rho(rho)
        if perturbation is not None and perturbation not in _PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {_PERTURBATIONS} (or None), got {perturbation!r}")
        self.p = check_p(p)
        check_positive(eta, "eta")
        self.ascent_steps = check_positive_int(ascent_steps, "ascent_steps")
        if second_order and ascent_steps != 1:
            raise ValueError("second_order=True supports ascent_steps=1 only")
        if not self._supports_subsets and (ascent_steps != 1 or second_order):
            raise ValueError(f"{type(self).__name__} has no ascent_steps or second_order options (SAM has)")
        if max_grad_norm is not None:
            check_positive(max_grad_norm, "max_grad_norm")
        if adaptive_weights_only and model is None:
            raise ValueError("adaptive_weights_only=True needs model= to know which parameters are weights")
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an instance; options {sorted(base_kwargs)} belong in its constructor"
                )
            self._base_keys = frozenset(base_optimizer.defaults)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            self._base_keys = frozenset(inspect.signature(base_optimizer).parameters)
        else:
            raise TypeError(f"base_optimizer must be an Optimizer class or instance, got {base_optimizer!r}")
        self.second_order = bool(second_order)
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self.model = model
        self.adaptive_weights_only = bool(adaptive_weights_only)
        self._sam_defaults = {"sam_rho": float(rho), "sam_adaptive": bool(adaptive), "sam_eta": float(eta)}

        super().__init__(params, dict(self._sam_defaults))
        if isinstance(base_optimizer, Optimizer):
            self._adopt_groups(base_optimizer)
        else:
            base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.base_optimizer = base_optimizer  # from here on, param_groups and state are the base optimizer's
        del self.__dict__["_groups_before_base"], self.__dict__["_state_before_base"]
        self.defaults = {**base_optimizer.defaults, **self._sam_defaults}  # OneCycleLR looks for 'momentum' here
        self._sharded = self._check_params(perturbation)
        self.perturbation = perturbation or ("global" if self._sharded else "per_replica")
        self._fsdp_modules = _sharded.fsdp_modules(model) if self._sharded else []

        self._names = {param: name for name, param in model.named_parameters()} if model is not None else {}
        self._w = Copies()  # SAM's copy of w per perturbed parameter, reused across steps
        self._clean = Copies()  # the clean pass's gradients, for variants whose final gradient uses them
        self._steps = 0  # steps finished (taken or skipped); the schedules of the variants count them
        self._param_states: dict[str, ParamState] = {}  # the variants' per-parameter state, by name
        # Mutated in place, never reassigned: wrappers that forward attribute reads to this optimizer (Lightning's
        # LightningOptimizer) then still share one step in progress.
        self._run = _StepState()

    @property
    def last_step_skipped(self) -> Tensor | None:
        """Whether the last step was skipped for a non-finite gradient (a device tensor; None if unchecked)."""
        return self._run.last_skipped

    @property
    def skipped_steps(self) -> Tensor:
        """Number of steps skipped so far (a device tensor: read it when convenient, e.g. once per epoch)."""
        return self._run.skipped_steps

    @property
    def clean_pass_no_sync(self) -> bool:
        """Whether a DDP loop runs the next step's clean pass (forward and backward) under ``model.no_sync()``.

        True for per-replica perturbations on a step that may ascend; False for global ones, for the steps that
        do not ascend (that pass is the step's only one and must be averaged) and for the variants whose one
        pass is at the perturbed point (MSAM).
        """
        per_replica = self.perturbation == "per_replica" and not self.perturbs_before_pass
        return per_replica and self.next_step_ascends is not False

    @property
    def create_graph(self) -> bool:
        """True only during ``second_order``'s third pass: the closure passes it to ``loss.backward``."""
        return self._run.create_graph

    # ------------------------------------------------------------------ groups and state: the base optimizer's
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's groups, which carry SAM's per-group options: one list, never stale."""
        base = getattr(self, "base_optimizer", None)  # through __getattr__ when a wrapper forwards to us
        return base.param_groups if base is not None else self.__dict__["_groups_before_base"]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:
            self.__dict__["_groups_before_base"] = groups
        else:
            base.param_groups = groups

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's per-parameter state (momentum buffers, Adam moments)."""
        base = getattr(self, "base_optimizer", None)
        return base.state if base is not None else self.__dict__["_state_before_base"]

    @state.setter
    def state(self, state: dict[Tensor, dict[str, Any]]) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:
            self.__dict__["_state_before_base"] = state
        else:
            base.state = state

    def _option(self, group: dict[str, Any], key: str) -> Any:
        return group.get(key, self._sam_defaults[key])

    def _rename_sam_keys(self, group: dict[str, Any]) -> None:
        """Store a group's SAM options under their ``sam_`` keys and check them."""
        for bare, key in _GROUP_KEYS.items():
            if bare in group and bare not in self._base_keys:
                if key in group:
                    raise ValueError(f"a param group sets both {bare!r} and {key!r}")
                group[key] = group.pop(bare)
        check_rho(group.get("sam_rho", 0.0), "a param group's rho")
        check_positive(group.get("sam_eta", 1.0), "a param group's eta")

    def _adopt_groups(self, base: Optimizer) -> None:
        """Give an already-built base optimizer's groups SAM's per-group options (from SAM's own groups)."""
        sam_group_of = {param: group for group in self.param_groups for param in group["params"]}
        base_params = [param for group in base.param_groups for param in group["params"]]
        if set(base_params) != set(sam_group_of) or len(base_params) != len(sam_group_of):
            raise ValueError("base_optimizer was built on other parameters than the ones given to SAM")
        for group in base.param_groups:
            owners = {id(sam_group_of[param]) for param in group["params"]}
            if len(owners) != 1:
                raise ValueError(
                    "a param group of base_optimizer spans several SAM param groups; group both the same way"
                )
            owner = sam_group_of[group["params"][0]]
            for key in self._sam_defaults:
                group.setdefault(key, owner[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._rename_sam_keys(param_group)
        if getattr(self, "base_optimizer", None) is None:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)
        self._check_params(self.perturbation)

    def _check_params(self, perturbation: str | None) -> bool:
        """Whether the parameters are FSDP2's DTensors; raises for what SAM cannot do with them."""
        params = [param for group in self.param_groups for param in group["params"]]
        return _sharded.check(params, second_order=self.second_order, perturbation=perturbation)

    # ------------------------------------------------------------------ what the variants change
    #: The perturbation needs no gradient of this step (MSAM's momentum, a random direction): ``first_step()`` is
    #: called before the step's only pass, and the closure form runs one pass per step.
    perturbs_before_pass: bool = False
    #: The final gradient of a step that ascends is formed from the clean pass's gradient too (GSAM, LookSAM):
    #: SAM keeps a copy of it.
    _keeps_clean_gradient: bool = False
    #: The direction or the schedule reads the clean gradient's size, so under fp16 it must be unscaled first.
    _reads_gradient_scale: bool = False
    #: m-sharpness (:meth:`next_subset`), ``ascent_steps`` and ``second_order`` are SAM's alone.
    _supports_subsets: bool = True

    @property
    def next_step_ascends(self) -> bool | None:
        """Whether the next step runs the ascent pass, known before its first pass (None: decided by its gradient).

        Data-parallel loops run the clean pass under ``no_sync()`` only on steps that ascend: on the others the
        clean pass is the step's only pass, and its gradient must be averaged like any optimizer's
        (:attr:`clean_pass_no_sync` says it in one word).
        """
        return True

    def _ascends(self, grads: list[Tensor]) -> bool:
        """When: whether this step runs the ascent, given the clean pass's gradients (scaled under fp16)."""
        return True

    def _direction(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Where: the vector that eq. 2 normalises into the perturbation of ``params``; SAM's is the gradient."""
        return grads

    def _final_gradient(self, params: list[Tensor], clean: list[Tensor] | None, ascended: bool) -> None:
        """How: turn ``.grad`` of ``params`` into the gradient the base optimizer applies, in place.

        ``.grad`` is unscaled here: the perturbed pass's gradient, or on a step that did not ascend the clean
        one. ``clean`` holds the clean gradients (unscaled, in the order of ``params``) when the variant keeps
        them. SAM applies the perturbed gradient as it is.
        """

    def _commit(self, skipped: Tensor | bool) -> None:
        """Make the state this step computed (an EMA, a stored direction) current unless ``skipped``.

        ``skipped`` is a host bool, or a device flag when the base step was skipped on the device.
        """

    def _drop(self) -> None:
        """Forget the state this step computed (the step was aborted)."""

    def _param_state(self, name: str) -> ParamState:
        """A variant's per-parameter state (an EMA, a stored direction): each step proposes it, SAM commits it
        unless the step was skipped, forgets it when the step is aborted, and saves it under ``name``."""
        state = self._param_states[name] = ParamState()
        return state

    def _extra_state(self) -> dict[str, Any]:
        """A variant's state other than :meth:`_param_state`'s, for :meth:`state_dict`."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _unscaled(self, tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` divided by ``grad_scaler``'s current scale (as they are without one), out of place."""
        scaler = self.grad_scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if scale is None or not tensors:
            return tensors
        inv = scale.double().reciprocal().float()
        out = list(tensors)
        for device, group in by_device(tensors).items():
            idx = [i for i, t in enumerate(tensors) if t.device == device]
            for i, t in zip(idx, torch._foreach_mul(group, inv.to(device)), strict=True):
                out[i] = t
        return out

    def _average_over_replicas(self, tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` (SAM's own copies) averaged in place over the DDP replicas when the clean pass is per
        replica; as they are otherwise (one process, global perturbations, FSDP).

        Variants whose final gradient mixes in the clean gradient call it: under the per-replica scheme the clean
        pass runs under ``no_sync()``, and every replica must apply the same gradient.
        """
        if tensors and self.perturbation == "per_replica" and self._data_parallel():
            all_reduce_mean_(tensors, self.process_group)
        return tensors

    def _data_parallel(self) -> bool:
        """Whether this process is one of several DDP replicas, each holding all of w (not FSDP's shards, whose
        gradients come reduced)."""
        if self._sharded:
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def _param_index(self) -> dict[Tensor, int]:
        """Each parameter's position across the groups, by which state dicts name parameters."""
        return {param: i for i, param in enumerate(p for group in self.param_groups for p in group["params"])}

    # ------------------------------------------------------------------ the two passes
    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> bool:
        r"""Move from :math:`w` to :math:`w + \hat\epsilon(w)` using the gradients now in ``.grad``.

        Call it after the clean pass's backward. With ``ascent_steps = k > 1`` call it (with a backward at
        the current point in between) up to ``k`` times, each a step of radius :math:`\rho/k`. It clears the
        gradients afterwards unless ``zero_grad=False``: the next backward must not add to them.

        Returns whether it perturbed: a variant that skips the ascent on some steps (LookSAM, IntervalSAM, ...)
        returns False on those and leaves the clean gradient in ``.grad``; then finish with :meth:`step` at once,
        with no second pass. Variants with :attr:`perturbs_before_pass` (MSAM) take it before the step's only pass.
        """
        if self.perturbs_before_pass:
            return self._perturb_before_pass()
        if self.second_order and not self._run.in_closure:
            raise RuntimeError("second_order=True needs the closure form, opt.step(closure)")
        if self._run.one_pass:
            raise RuntimeError("first_step() called again on a step that does not ascend; finish it with step()")
        if self._run.ascents >= self.ascent_steps:
            raise RuntimeError(
                f"first_step() called {self._run.ascents + 1} times without second_step() "
                f"(ascent_steps={self.ascent_steps}); finish the step with second_step() or step()"
            )
        last_ascent = self._run.ascents + 1 == self.ascent_steps
        if self._run.subset_grads is not None and last_ascent and not zero_grad:
            raise ValueError("after next_subset(), first_step() must clear the gradients (zero_grad=True)")
        ascent = self._ascent(restrict_to=self._run.perturbed if self._run.ascents else None)
        grads = [param.grad for param in ascent.params]
        if self._sharded and not self._with_grad():
            raise RuntimeError(
                "first_step() found no gradient on the FSDP-sharded parameters: run the clean pass with FSDP's "
                "gradient synchronisation on (set_requires_gradient_sync(False) or set_requires_all_reduce(False) "
                "keep the gradient in FSDP's private buffers and add it into the perturbed pass's)"
            )
        if self._run.ascents == 0:
            if self._keeps_clean_gradient and self.next_step_ascends is not False:
                with_grad = self._with_grad()
                self._clean.save(with_grad, [param.grad for param in with_grad])
                self._run.kept_clean = True
            if not self._ascends(grads):
                self._run.one_pass = True
                return False
            self._run.perturbed = ascent.params
            self._save(ascent.params)
            if ascent.params:
                grads = self._direction(ascent.params, grads)
        if ascent.params:
            scales = None
            if ascent.any_scaled:  # ASAM scales by w, not by w + eps
                scales = ascent.scales([self._w.of(param) for param in ascent.params])
            self._perturb(ascent, grads, scales)
        self._run.ascents += 1
        if self._run.subset_grads is not None and last_ascent:
            # m-sharpness: the perturbed backward adds this subset's gradient to the earlier subsets' sum
            for param, grad in self._run.subset_grads.items():
                param.grad = grad
            self._run.subset_grads = None
        elif zero_grad:
            self.zero_grad()
        return True

    def _perturb(self, ascent: _Ascent, direction: list[Tensor], scales: list[Tensor | None] | None) -> None:
        r""":math:`w \leftarrow w + \rho\, d / \|d\|` (eq. 2 for the direction ``d``), noting a non-finite ``d``.

        On DTensors, eq. 2 runs on the local shards, its norms all-reduced over them.
        """
        params, sharding = ascent.params, None
        if self._sharded:
            direction, sharding = _sharded.unwrap(direction)
            params = _sharded.local(params)
            scales = None if scales is None else _sharded.local(scales)
        eps, dual_norm = perturbation(direction, ascent.rho(), self.p, scales, sharding=sharding)
        torch._foreach_add_(params, eps)
        _sharded.reshard(self._fsdp_modules)
        nonfinite = ~torch.isfinite(dual_norm)
        previous = self._run.first_nonfinite
        self._run.first_nonfinite = nonfinite if previous is None else previous | nonfinite

    def _perturb_before_pass(self) -> bool:
        """``first_step()`` of the variants that perturb from their state, before the step's only pass."""
        if self._pending():
            raise RuntimeError("first_step() called twice; run the pass and finish the step with step()")
        ascent = self._ascent(with_grad=False)
        self._run.ascents = 1
        self._run.perturbed = ascent.params
        self._save(ascent.params, buffers=False)  # the step's only pass is the one whose statistics count
        direction = self._direction(ascent.params, []) if ascent.params else []
        # A zero direction (MSAM's first step, before any momentum) leaves w where it is.
        if ascent.params:
            scales = ascent.scales(ascent.params) if ascent.any_scaled else None
            self._perturb(ascent, direction, scales)
        return True

    @torch.no_grad()
    def next_subset(self) -> None:
        r"""m-sharpness (§4.1): close this subset's SAM passes and start the next subset's at :math:`w`.

        To train with a perturbation per subset of the batch (each computed from that subset's own gradient,
        as each accelerator does when SAM runs data-parallel), run for every subset :math:`S_i` its clean
        backward, :meth:`first_step` and its perturbed backward, with ``next_subset()`` between subsets and
        :meth:`second_step` (or ``step()``) after the last. The base optimizer then applies

        .. math:: \sum_i \nabla L_{S_i}(w)\big|_{w + \hat\epsilon_i}, \qquad
                  \hat\epsilon_i = \hat\epsilon\big(\nabla L_{S_i}(w)\big),

        so weight each subset's mean loss by :math:`|S_i|/|B|` for the mean over the batch. This restores
        :math:`w` and the model's buffers (as this subset's clean pass left them) and keeps the perturbed
        gradients, which the last subset's perturbed backward adds to: ``.grad`` holds the sum when
        ``second_step`` runs, also for ``GradScaler`` and clipping.
        """
        if self._run.ascents < self.ascent_steps:
            raise RuntimeError(
                "next_subset() needs first_step() and the perturbed pass's backward of the current subset first"
            )
        if self.second_order:
            raise RuntimeError("next_subset() does not support second_order=True")
        if not self._supports_subsets:
            raise RuntimeError(f"next_subset() (m-sharpness) is defined for SAM, not for {type(self).__name__}")
        self._restore()
        self._run.subset_grads = {p: p.grad for group in self.param_groups for p in group["params"]}
        for param in self._run.subset_grads:
            param.grad = None
        self._run.ascents = 0
        self._run.perturbed = []
        self._run.saved = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore :math:`w` (and the model's buffers) and let the base optimizer apply the gradients in ``.grad``.

        Call it after the perturbed pass's backward. It runs through :meth:`step`, so step hooks and
        learning-rate schedulers see one optimizer step. Under ``GradScaler`` call ``scaler.step(opt)`` instead:
        it calls :meth:`step`, which unscales the gradients and skips on inf/NaN.
        """
        if self._run.ascents == 0 and not self._run.one_pass:
            raise RuntimeError(
                "second_step() called without first_step()"
                + (" (after next_subset(), run the next subset's passes first)" if self._pending() else "")
            )
        self.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def abort_step(self) -> None:
        """Restore :math:`w` and the model's buffers and drop the pending step without updating anything.

        :meth:`step` calls it when the closure raises; a custom loop can call it after a failed perturbed pass.
        """
        if self._run.ascents:
            self._restore()
        for state in self._param_states.values():
            state.drop()
        self._drop()
        self._end_step()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One SAM step.

        With a ``closure`` (forward, ``loss.backward()``, return the loss): calls it at :math:`w`, at
        :math:`w + \\hat\\epsilon` (and, for ``second_order``, once more at :math:`w`), clearing gradients in
        between, steps, and returns the loss at :math:`w`. If the closure raises, :math:`w` is restored first.

        Without a closure, after :meth:`first_step` and the perturbed pass: finishes the step like
        :meth:`second_step` (the path of trainers and ``GradScaler.step`` that call ``optimizer.step()``
        themselves). A bare ``step()`` with neither is an error.
        """
        try:
            if closure is None:
                if self._run.ascents == 0 and not self._run.one_pass:
                    raise RuntimeError(
                        f"{type(self).__name__}.step() needs a closure (forward + backward, returning the loss), "
                        "or must follow first_step() and the perturbed pass's backward"
                    )
                self._finish_step()
                return None
            return self._closure_step(closure)
        except BaseException:
            # GradScaler.step deletes what it set on us only when our step returns.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _closure_step(self, closure: Callable[[], Tensor]) -> Tensor:
        if self._pending():
            raise RuntimeError("step(closure) called between first_step() and second_step()")
        if getattr(self, "found_inf", None) is not None:
            raise RuntimeError("GradScaler.step(opt, closure) is not supported: use the two-pass form under GradScaler")
        closure = torch.enable_grad()(closure)
        if self.perturbs_before_pass:
            self.first_step()
            try:
                loss = closure()
            except BaseException:
                self.abort_step()
                raise
            self._check_closure_gradients()
            self._finish_step()
            return loss
        loss = closure()
        self._check_closure_gradients()
        self._run.in_closure = True
        try:
            for _ in range(self.ascent_steps):
                if not self.first_step(zero_grad=True):
                    break
                closure()
            if self.second_order and self._run.ascents:
                self._add_second_order_term(closure)
        except BaseException:
            self.abort_step()
            raise
        finally:
            self._run.in_closure = False
        self._finish_step()
        return loss

    def _check_closure_gradients(self) -> None:
        if not self._with_grad():
            self.abort_step()
            raise RuntimeError("the closure produced no gradients: it must call loss.backward()")

    @torch.no_grad()
    def _finish_step(self) -> None:
        """Restore w and the buffers, unscale and clip the gradients, and run the base step unless skipping."""
        self._restore()
        try:
            self._base_update()
        finally:
            self._end_step()

    def _base_update(self) -> None:
        with_grad = self._with_grad()
        grads = [p.grad for p in with_grad]
        # Set by GradScaler.step because of _step_supports_amp_scaling; grad_scale is None if already unscaled.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None:
            found_inf = torch.as_tensor(found_inf)  # GradScaler passes a plain 0 when no gradient was checked
        if grad_scale is not None and self._reads_gradient_scale and self.grad_scaler is None:
            raise RuntimeError(
                f"{type(self).__name__} under GradScaler needs grad_scaler=scaler: its first step reads the size "
                "of the clean gradient, which the scaler's scale changes"
            )
        clean = self._clean.copies if self._run.kept_clean else None
        if clean is not None and self._clean.keys != with_grad:
            raise RuntimeError("the parameters with gradients changed between the clean and the perturbed pass")
        if grad_scale is not None and grads:
            inv_scale = grad_scale.double().reciprocal().float()
            for device, group in by_device(grads + (clean or [])).items():
                torch._foreach_mul_(group, inv_scale.to(device))
        if grads:
            self._final_gradient(with_grad, clean, ascended=not self._run.one_pass)
        total_norm = None
        if grads and self.max_grad_norm is not None:
            total_norm = _sharded.plain(torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm, foreach=True))

        skip = None
        if found_inf is not None or self.skip_nonfinite:
            flags = [] if self._run.first_nonfinite is None else [self._run.first_nonfinite]
            if found_inf is not None:
                flags.append(found_inf > 0)
            elif total_norm is not None:
                flags.append(~torch.isfinite(total_norm))
            elif grads:  # a sum of |g| propagates inf and NaN; it overflows only near float32's largest values
                flags.append(~torch.isfinite(global_norm(grads, 1.0, dtype=torch.float32)))
            if flags:
                skip = torch.stack([f.to(flags[0].device) for f in flags]).any()
            if self._data_parallel():  # the clean pass's flag is this replica's own: every replica skips alike
                device = with_grad[0].device if with_grad else self.param_groups[0]["params"][0].device
                skip = all_reduce_any(skip, device, self.process_group)
        skipped = self._base_step(skip, with_grad)
        for state in self._param_states.values():
            state.commit(skipped)
        self._commit(skipped)
        self._steps += 1

    # ------------------------------------------------------------------ internals
    def _pending(self) -> bool:
        """Whether a step is in progress (w perturbed, a one-pass step begun, or subsets' gradients waiting)."""
        return self._run.ascents > 0 or self._run.one_pass or self._run.subset_grads is not None

    def _with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _radius(self, group: dict[str, Any]) -> float:
        """The radius of a group this step (GSAM schedules it)."""
        return self._option(group, "sam_rho")

    def _ascent(self, restrict_to: list[Tensor] | None = None, with_grad: bool = True) -> _Ascent:
        """The parameters to perturb (groups with ``rho > 0``; with a gradient, unless ``with_grad`` is False)
        and their options."""
        allowed = None if restrict_to is None else set(restrict_to)
        ascent = _Ascent()
        for group in self.param_groups:
            rho = self._radius(group)
            if rho == 0:
                continue
            adaptive, eta = self._option(group, "sam_adaptive"), self._option(group, "sam_eta")
            for param in group["params"]:
                if with_grad and param.grad is None or (allowed is not None and param not in allowed):
                    continue
                if not param.requires_grad:
                    continue
                if param.grad is not None and param.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                ascent.params.append(param)
                ascent.radii.append(rho / self.ascent_steps)
                scaled = adaptive and (not self.adaptive_weights_only or "weight" in self._names.get(param, ""))
                ascent.etas.append(eta if scaled else None)
        return ascent

    def _save(self, params: list[Tensor], buffers: bool = True) -> None:
        """Copy :math:`w` and (unless ``buffers`` is False) the model's buffers, reusing the copies of earlier
        steps."""
        self._run.saved = True
        self._run.buffers_saved = buffers and self.model is not None
        if params:
            self._w.save(params, params)
        if not self._run.buffers_saved:
            return
        # Buffers by their slot in the module: a module may replace a buffer tensor instead of updating it in
        # place (``self.count = self.count + 1``); the restore writes into whatever tensor holds the slot then.
        self._run.buffer_slots = [
            (module._buffers, name)
            for module in self.model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]
        buffers = [slots[name] for slots, name in self._run.buffer_slots]
        backup = self._run.buffer_backup
        if len(backup) != len(buffers) or any(layout(b) != layout(c) for b, c in zip(buffers, backup, strict=True)):
            backup = self._run.buffer_backup = [torch.empty_like(b) for b in buffers]
            self._run.buffer_backup_mixed = mixed(backup)
        if buffers:
            copy_(backup, buffers, self._run.buffer_backup_mixed)

    def _restore(self) -> None:
        if not self._run.saved:  # a step that did not ascend: w and the buffers are the clean pass's
            return
        if self._run.perturbed:
            self._w.restore(self._run.perturbed)
            _sharded.reshard(self._fsdp_modules)
        if self._run.buffers_saved and self._run.buffer_backup:
            buffers = [slots[name] for slots, name in self._run.buffer_slots]
            copy_(buffers, self._run.buffer_backup, self._run.buffer_backup_mixed)

    def _end_step(self) -> None:
        self._run.saved = False
        self._run.ascents = 0
        self._run.one_pass = False
        self._run.kept_clean = False
        self._run.perturbed = []
        self._run.first_nonfinite = None
        self._run.subset_grads = None

    def _base_step(self, skip: Tensor | None, with_grad: list[Tensor]) -> Tensor | bool:
        """Run the base optimizer's step unless ``skip`` (a device flag) is set; return whether it was skipped
        (a host bool, or the device flag when the base optimizer skipped on the device)."""
        base = self.base_optimizer
        self._run.last_skipped = skip
        if skip is None:
            base.step()
            return False
        self._run.skipped_steps = self._run.skipped_steps.to(skip.device) + skip.to(torch.int64)
        # Fused kernels skip on the device. Until every parameter has had a base step, read the flag on the host
        # instead: torch's fused SGD allocates its momentum with empty_like on a parameter's first step and keeps
        # that uninitialised memory when the step is skipped.
        fused = getattr(base, "_step_supports_amp_scaling", False)
        stepped = self._run.stepped
        if fused and all(p in stepped for p in with_grad):
            base.grad_scale, base.found_inf = None, skip.float()  # type: ignore[attr-defined]
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf  # type: ignore[attr-defined]
            return skip
        if bool(skip):  # one host read per step
            return True
        base.step()
        stepped.update(with_grad)
        return False

    def _add_second_order_term(self, closure: Callable[[], Tensor]) -> None:
        r"""Replace ``.grad`` (:math:`v = \nabla L(w + \hat\epsilon)`) by :math:`v + (d\hat\epsilon/dw)^\top v`.

        :math:`(d\hat\epsilon/dw)^\top v` is the gradient of :math:`\hat\epsilon(w, g(w)) \cdot v` with
        respect to :math:`w`, taken through a third pass at :math:`w` whose backward keeps its graph.
        """
        params = list(self._run.perturbed)
        with torch.no_grad():
            v = {
                p: p.grad.detach().clone() for group in self.param_groups for p in group["params"] if p.grad is not None
            }
            self._restore()
        self.zero_grad()
        self._run.create_graph = True
        try:
            with warnings.catch_warnings():
                # torch warns of the parameter <-> .grad cycle that create_graph makes; zero_grad below breaks it.
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                closure()
        finally:
            self._run.create_graph = False
        grads = [param.grad for param in params]
        if any(g is None or g.grad_fn is None for g in grads):
            raise RuntimeError("second_order=True: the closure must call loss.backward(create_graph=opt.create_graph)")
        ascent = self._ascent(restrict_to=params)
        eps, _ = perturbation(grads, ascent.rho(), self.p, ascent.scales(params))
        dot = torch.stack([(e * v[p]).sum() for e, p in zip(eps, params, strict=True) if p in v]).sum()
        jacobian_v = torch.autograd.grad(dot, params, allow_unused=True)
        self.zero_grad()
        with torch.no_grad():
            for param, jv in zip(params, jacobian_v, strict=True):
                if jv is not None and param in v:
                    v[param].add_(jv)
            for param, grad in v.items():
                param.grad = grad
            self._restore()  # the third pass moved the buffers again

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's full state (momenta, moments, groups with SAM's options) and SAM's counters."""
        if self._pending():
            raise RuntimeError("state_dict() between first_step() and second_step(): w is perturbed")
        sam: dict[str, Any] = {"skipped_steps": self.skipped_steps.detach().clone(), "steps": self._steps}
        index = self._param_index()
        extra = {**{name: st.state_dict(index) for name, st in self._param_states.items()}, **self._extra_state()}
        if extra:
            sam["variant"] = extra
        return {"base_optimizer": self.base_optimizer.state_dict(), "sam": sam}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output, or a plain optimizer's state dict into the base optimizer.

        Groups loaded from a plain optimizer keep the SAM options the groups had before.
        """
        if self._pending():
            raise RuntimeError("load_state_dict() between first_step() and second_step(): w is perturbed")
        sam: dict[str, Any] = {}
        if set(state_dict) == {"base_optimizer", "sam"}:
            base_state, sam = state_dict["base_optimizer"], state_dict["sam"]
            skipped = sam["skipped_steps"]
        elif {"state", "param_groups"} <= set(state_dict):
            base_state, skipped = state_dict, None
        else:
            raise ValueError(
                "not an optimizer state dict (expected SAM's keys 'base_optimizer' and 'sam', or "
                "a plain optimizer's 'state' and 'param_groups')"
            )
        options = [{key: group[key] for key in self._sam_defaults if key in group} for group in self.param_groups]
        self.base_optimizer.load_state_dict(base_state)
        for group, kept in zip(self.param_groups, options, strict=True):
            for key, value in kept.items():
                group.setdefault(key, value)
        if skipped is not None:
            self._run.skipped_steps = skipped.detach().clone()
        self._steps = int(sam.get("steps", 0))
        variant = sam.get("variant", {})
        params = list(self._param_index())
        for name, st in self._param_states.items():
            st.load_state_dict(variant.get(name, {}), params)
        self._load_extra_state(variant)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer's keeps only defaults, state and groups; SAM needs all of its attributes. A scheduler's
        # wrapper of ``step`` (an instance attribute holding a weak reference to this object) is left behind.
        return {key: value for key, value in self.__dict__.items() if key != "step"}


class _StepState:
    """SAM's bookkeeping of the step in progress, and its skip counters."""

    def __init__(self) -> None:
        self.ascents = 0  # ascent steps taken since the last second_step (0: w is not perturbed)
        self.perturbed: list[Tensor] = []
        self.first_nonfinite: Tensor | None = None
        self.subset_grads: dict[Tensor, Tensor | None] | None = None  # m-sharpness: earlier subsets' gradients
        self.saved = False  # w of this step (or subset) is in SAM's copies
        self.buffers_saved = False  # and the model's buffers too
        self.one_pass = False  # first_step() decided this step does not ascend: .grad holds the clean gradient
        self.kept_clean = False  # the clean gradients of this step are in SAM._clean
        self.buffer_slots: list[tuple[dict[str, Tensor], str]] = []  # (module._buffers, name) per buffer
        self.buffer_backup: list[Tensor] = []
        self.buffer_backup_mixed = False
        self.stepped: set[Tensor] = set()  # parameters the base optimizer has stepped (so has state for)
        self.in_closure = False
        self.create_graph = False
        self.last_skipped: Tensor | None = None
        self.skipped_steps = torch.zeros((), dtype=torch.int64)


class _Ascent:
    """The tensors of one ascent step: parameters, radii, and each one's ASAM eta (None: not scaled)."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.radii: list[float] = []
        self.etas: list[float | None] = []

    @property
    def any_scaled(self) -> bool:
        return any(eta is not None for eta in self.etas)

    def rho(self) -> float | list[float]:
        """One float when every tensor shares the radius (eq. 2 in one pass), else one per tensor."""
        first = self.radii[0]
        return first if all(r == first for r in self.radii) else self.radii

    def scales(self, at: list[Tensor]) -> list[Tensor | None] | None:
        """ASAM's :math:`T = |w| + \\eta` at ``at`` (one tensor per parameter; differentiable in grad mode)."""
        idx = [i for i, eta in enumerate(self.etas) if eta is not None]
        if not idx:
            return None
        out: list[Tensor | None] = [None] * len(self.params)
        for i, t in zip(idx, adaptive_scale([at[i] for i in idx], [self.etas[i] for i in idx]), strict=True):
            out[i] = t
        return out
