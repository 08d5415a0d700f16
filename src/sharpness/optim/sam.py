r"""Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021), Algorithm 1."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpness.optim._validation import check_p, check_positive, check_positive_int, check_rho
from sharpness.optim.perturbation import adaptive_scale, global_norm, perturbation

__all__ = ["SAM"]

_SAM_GROUP_KEYS = ("rho", "adaptive", "eta")


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
    Hessian-vector product; costs a third pass).

    Args:
        params: parameters or parameter groups; groups may set ``rho``, ``adaptive`` and ``eta``.
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
            ends the step exactly as the clean pass left it: the perturbed pass has no side effects.
        ascent_steps: number :math:`k` of inner ascent steps (default 1, the paper's SAM).
        second_order: add the second-order term (closure form only; the closure must call
            ``loss.backward(create_graph=opt.create_graph)``).
        max_grad_norm: if set, clip the final (unscaled) gradient to this global 2-norm before the base step.
        skip_nonfinite: skip the base step (and leave :math:`w` untouched) when a gradient of either pass is
            not finite. With an unfused base optimizer and no ``GradScaler`` this reads one flag on the host
            per step; fused base optimizers (``fused=True``) skip on the device.
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)  # calls closure at w and at w + eps, returns the loss at w

    The two-pass form for custom loops is ``first_step()``, a second forward/backward, ``second_step()``
    (or a plain ``step()``, as trainers and ``GradScaler.step`` call it).
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
        **base_kwargs: Any,
    ) -> None:
        check_rho(rho)
        self.p = check_p(p)
        check_positive(eta, "eta")
        self.ascent_steps = check_positive_int(ascent_steps, "ascent_steps")
        if second_order and ascent_steps != 1:
            raise ValueError("second_order=True supports ascent_steps=1 only")
        if max_grad_norm is not None:
            check_positive(max_grad_norm, "max_grad_norm")
        if adaptive_weights_only and model is None:
            raise ValueError("adaptive_weights_only=True needs model= to know which parameters are weights")
        self.second_order = bool(second_order)
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.model = model
        self.adaptive_weights_only = bool(adaptive_weights_only)
        self.create_graph = False  # True only during second_order's third pass

        sam_defaults = dict(rho=rho, adaptive=adaptive, eta=eta)
        super().__init__(params, sam_defaults)
        for group in self.param_groups:
            check_rho(group["rho"], "a param group's rho")
            check_positive(group["eta"], "a param group's eta")

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an instance; options {sorted(base_kwargs)} belong in its constructor"
                )
            self._adopt_groups(base_optimizer)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(f"base_optimizer must be an Optimizer class or instance, got {base_optimizer!r}")
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups  # one set of group dicts: schedulers see both
        self.defaults = {**base_optimizer.defaults, **sam_defaults}  # OneCycleLR & co. look for 'momentum' here

        self._names = {param: name for name, param in model.named_parameters()} if model is not None else {}
        self._in_closure_step = False
        self._ascents = 0  # ascent steps taken since the last second_step (0: w is not perturbed)
        self._perturbed: list[Tensor] = []
        self._buffer_backup: list[Tensor] = []
        self._first_pass_nonfinite: Tensor | None = None
        self.last_step_skipped: Tensor | None = None
        """Whether the last step was skipped for a non-finite gradient (a device tensor; None if unchecked)."""
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        """Number of steps skipped so far (a device tensor: read it when convenient, e.g. once per epoch)."""

    # ------------------------------------------------------------------ construction helpers
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
            for key in _SAM_GROUP_KEYS:
                group.setdefault(key, owner[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        check_rho(param_group["rho"], "a param group's rho")
        self.base_optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ the two passes
    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        r"""Move from :math:`w` to :math:`w + \hat\epsilon(w)` using the gradients now in ``.grad``.

        Call it after the clean pass's backward. With ``ascent_steps = k > 1`` call it (with a backward at
        the current point in between) up to ``k`` times, each a step of radius :math:`\rho/k`. It clears the
        gradients afterwards unless ``zero_grad=False``: the next backward must not add to them.
        """
        if self.second_order and not self._in_closure_step:
            raise RuntimeError("second_order=True needs the closure form, opt.step(closure)")
        if self._ascents >= self.ascent_steps:
            raise RuntimeError(
                f"first_step() called {self._ascents + 1} times without second_step() "
                f"(ascent_steps={self.ascent_steps}); finish the step with second_step() or step()"
            )
        params = self._params_to_perturb(restrict_to=self._perturbed if self._ascents else None)
        if self._ascents == 0:
            self._perturbed = params
            self._save(params)
        if params:
            radii, scales = self._radii_and_scales(params, self.ascent_steps)
            eps, dual_norm = perturbation([param.grad for param in params], radii, self.p, scales)
            torch._foreach_add_(params, eps)
            nonfinite = ~torch.isfinite(dual_norm)
            previous = self._first_pass_nonfinite
            self._first_pass_nonfinite = nonfinite if previous is None else previous | nonfinite
        self._ascents += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore :math:`w` (and the model's buffers) and let the base optimizer apply the gradients in ``.grad``.

        Call it after the perturbed pass's backward. Under ``GradScaler`` call ``scaler.step(opt)`` instead:
        it calls this through :meth:`step`, which unscales the gradients and skips on inf/NaN.
        """
        if self._ascents == 0:
            raise RuntimeError("second_step() called without first_step()")
        self._restore()
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in with_grad]
        # Set by GradScaler.step because of _step_supports_amp_scaling; grad_scale is None if already unscaled.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is not None and grads:
            torch._foreach_mul_(grads, grad_scale.double().reciprocal().float())
        total_norm = None
        if grads and self.max_grad_norm is not None:
            total_norm = torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm, foreach=True)

        skip = None
        if found_inf is not None or self.skip_nonfinite:
            flags = [] if self._first_pass_nonfinite is None else [self._first_pass_nonfinite]
            if found_inf is not None:
                flags.append(found_inf > 0)
            elif total_norm is not None:
                flags.append(~torch.isfinite(total_norm))
            elif grads:
                flags.append(~torch.isfinite(global_norm(grads)))
            if flags:
                skip = torch.stack([f.to(flags[0].device) for f in flags]).any()
        self._base_step(skip)

        self._ascents = 0
        self._perturbed = []
        self._first_pass_nonfinite = None
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One SAM step.

        With a ``closure`` (forward, ``loss.backward()``, return the loss): calls it at :math:`w`, at
        :math:`w + \\hat\\epsilon` (and, for ``second_order``, once more at :math:`w`), clearing gradients in
        between, steps, and returns the loss at :math:`w`.

        Without a closure, after :meth:`first_step` and the perturbed pass: finishes the step like
        :meth:`second_step` (the path of trainers and ``GradScaler.step`` that call ``optimizer.step()``
        themselves). A bare ``step()`` with neither is an error.
        """
        if closure is None:
            if self._ascents == 0:
                raise RuntimeError(
                    "SAM.step() needs a closure (forward + backward, returning the loss), or must follow "
                    "first_step() and the perturbed pass's backward"
                )
            self.second_step()
            return None
        if self._ascents:
            raise RuntimeError("step(closure) called between first_step() and second_step()")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self._in_closure_step = True
        try:
            for _ in range(self.ascent_steps):
                self.first_step(zero_grad=True)
                closure()
            if self.second_order:
                self._add_second_order_term(closure)
        finally:
            self._in_closure_step = False
        self.second_step()
        return loss

    # ------------------------------------------------------------------ internals
    def _params_to_perturb(self, restrict_to: list[Tensor] | None = None) -> list[Tensor]:
        """Parameters of groups with ``rho > 0`` that have a gradient (optionally only among ``restrict_to``)."""
        allowed = None if restrict_to is None else set(restrict_to)
        params = []
        for group in self.param_groups:
            if group["rho"] == 0:
                continue
            for param in group["params"]:
                if param.grad is None or (allowed is not None and param not in allowed):
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                params.append(param)
        return params

    def _radii_and_scales(self, params: list[Tensor], steps: int) -> tuple[list[float], list[Tensor | None] | None]:
        """Per-tensor radius ``rho / steps`` and ASAM scale (differentiable if grad mode is on)."""
        options = {param: group for group in self.param_groups for param in group["params"]}
        radii = [options[param]["rho"] / steps for param in params]
        scaled = [
            param
            for param in params
            if options[param]["adaptive"] and (not self.adaptive_weights_only or "weight" in self._names.get(param, ""))
        ]
        if not scaled:
            return radii, None
        scale_of = dict(zip(scaled, adaptive_scale(scaled, [options[p]["eta"] for p in scaled]), strict=True))
        return radii, [scale_of.get(param) for param in params]

    def _model_buffers(self) -> list[Tensor]:
        return [] if self.model is None else list(self.model.buffers())

    def _save(self, params: list[Tensor]) -> None:
        """Copy :math:`w` and the model's buffers, reusing the copy buffers of earlier steps."""
        if params:
            backups = [self.state[param].get("w") for param in params]
            if any(b is None for b in backups):
                for param in params:
                    self.state[param].setdefault("w", torch.empty_like(param, memory_format=torch.preserve_format))
                backups = [self.state[param]["w"] for param in params]
            torch._foreach_copy_(backups, params)
        buffers = self._model_buffers()
        if len(self._buffer_backup) != len(buffers) or any(
            b.shape != c.shape or b.dtype != c.dtype or b.device != c.device
            for b, c in zip(buffers, self._buffer_backup, strict=True)
        ):
            self._buffer_backup = [torch.empty_like(b) for b in buffers]
        if buffers:
            torch._foreach_copy_(self._buffer_backup, buffers)

    def _restore(self) -> None:
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self.state[param]["w"] for param in self._perturbed])
        buffers = self._model_buffers()
        if buffers:
            torch._foreach_copy_(buffers, self._buffer_backup)

    def _base_step(self, skip: Tensor | None) -> None:
        """Run the base optimizer's step unless ``skip`` (a device flag) is set."""
        base = self.base_optimizer
        self.last_step_skipped = skip
        if skip is None:
            base.step()
            return
        self.skipped_steps = self.skipped_steps.to(skip.device) + skip.to(torch.int64)
        if getattr(base, "_step_supports_amp_scaling", False):  # fused kernels skip on the device
            base.grad_scale, base.found_inf = None, skip.float()  # type: ignore[attr-defined]
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf  # type: ignore[attr-defined]
        elif not bool(skip):  # the one host read per step
            base.step()

    def _add_second_order_term(self, closure: Callable[[], Tensor]) -> None:
        r"""Replace ``.grad`` (:math:`v = \nabla L(w + \hat\epsilon)`) by :math:`v + (d\hat\epsilon/dw)^\top v`.

        :math:`(d\hat\epsilon/dw)^\top v` is the gradient of :math:`\hat\epsilon(w, g(w)) \cdot v` with
        respect to :math:`w`, taken through a third pass at :math:`w` whose backward keeps its graph.
        """
        params = list(self._perturbed)
        with torch.no_grad():
            v = {
                p: p.grad.detach().clone() for group in self.param_groups for p in group["params"] if p.grad is not None
            }
            self._restore()
        self.zero_grad()
        self.create_graph = True
        try:
            closure()
        finally:
            self.create_graph = False
        grads = [param.grad for param in params]
        if any(g is None or g.grad_fn is None for g in grads):
            raise RuntimeError("second_order=True: the closure must call loss.backward(create_graph=opt.create_graph)")
        radii, scales = self._radii_and_scales(params, steps=1)
        eps, _ = perturbation(grads, radii, self.p, scales)
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
        if self._ascents:
            raise RuntimeError("state_dict() between first_step() and second_step(): w is perturbed")
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "sam": {"skipped_steps": self.skipped_steps.detach().clone()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"base_optimizer", "sam"}:
            raise ValueError(
                "not a SAM state dict (expected keys 'base_optimizer' and 'sam'); "
                "to load a plain optimizer's state use opt.base_optimizer.load_state_dict()"
            )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        self.skipped_steps = state_dict["sam"]["skipped_steps"].detach().clone()
