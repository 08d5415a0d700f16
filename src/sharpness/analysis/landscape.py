r"""Loss landscapes: linear interpolation between two models, and 1-D / 2-D random slices.

* Interpolation (Goodfellow, Vinyals & Saxe 2015): :math:`\theta(\alpha) = (1-\alpha)\theta_a +
  \alpha\theta_b` for the whole state (parameters and floating-point buffers; integer buffers such
  as ``num_batches_tracked`` are taken from the nearer end). The form is chosen so that
  :math:`\alpha = 0` and :math:`\alpha = 1` give :math:`\theta_a` and :math:`\theta_b` bit for
  bit, hence exactly the two models' losses. Both ends are copied first, so they may be live
  tensors of ``model`` itself (``model.state_dict()``). Outside :math:`[0, 1]` the interpolated
  BatchNorm ``running_var`` can turn negative, which makes the loss NaN; it is clamped at 0
  (a variance is non-negative; BatchNorm then divides by :math:`\sqrt{\epsilon}`), and
  ``clamped_variances`` counts the grid points where this happened.
* Random slices (Li et al. 2018): :math:`L(w + \alpha d)` and :math:`L(w + \alpha d_1 + \beta d_2)`
  with filter-normalised random directions (:mod:`sharpness.analysis.directions`).

Each grid point is evaluated as the example-weighted mean loss over the batches (plus optional
metrics, e.g. accuracy, given as ``metric_fn(model, batch) -> Tensor`` batch means), without
gradients. BatchNorm: ``bn_mode="eval"`` uses running statistics; moving the weights makes the
stored statistics stale, so ``recalibration_batches`` can be given to recompute them at every
grid point (:func:`recalibrate_bn`) before evaluating. ``bn_mode="train"`` evaluates with batch
statistics instead. The batches are moved to the model's device once, not at each grid point.
The model is restored bit-exactly afterwards.

``points_per_batch > 1`` evaluates that many grid points at once with ``torch.vmap`` over
``torch.func.functional_call`` (:mod:`sharpness.analysis.batched_eval`), meant for GPUs, where
one small forward pass leaves the device idle (on a CPU it was 2-3x slower than one by one for a
ResNet-20, ``benchmarks/bench_landscape.py``). It applies when BatchNorm uses running statistics
and is not recalibrated (``bn_mode="eval"``, or a model without BatchNorm, and no
``recalibration_batches``); otherwise, or if ``vmap`` cannot run ``loss_fn`` / the metrics, the
points are evaluated one by one (with a warning in the latter case). The result's ``batched``
says which path ran. Both compute the same function; the values agree to rounding (batched
kernels may sum in a different order).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sharpness.analysis.batched_eval import evaluate_points
from sharpness.analysis.batches import Batch, batch_weights, prepare_batch
from sharpness.analysis.directions import Direction, parameter_values, random_direction
from sharpness.analysis.hessian import LossFn
from sharpness.analysis.model_state import (
    BNMode,
    has_batchnorm,
    is_batchnorm,
    model_device,
    preserved_state,
    set_bn_mode,
)
from sharpness.analysis.progress import progress_bar

__all__ = [
    "MetricFn",
    "evaluate",
    "recalibrate_bn",
    "interpolation_1d",
    "landscape_1d",
    "landscape_2d",
]

MetricFn = Callable[[nn.Module, Batch], Tensor]


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    metrics: Mapping[str, MetricFn] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Example-weighted means of the loss and the metrics, in the model's current mode, no grad.

    Accumulated in Python floats (float64) in batch order: :math:`\\sum_b (n_b/N) L_b`.
    """
    fns: dict[str, MetricFn] = {"loss": loss_fn, **(metrics or {})}
    totals = dict.fromkeys(fns, 0.0)
    with torch.no_grad():
        for batch, w in zip(batches, batch_weights(batches, weights), strict=True):
            for name, fn in fns.items():
                totals[name] += w * float(fn(model, batch))
    return totals


def recalibrate_bn(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch]) -> None:
    """Recompute every BatchNorm layer's running statistics from ``batches``.

    The statistics are reset and accumulated with ``momentum=None`` (PyTorch's cumulative
    average), so they become the plain average of the per-batch means and variances; the forward
    passes go through ``loss_fn`` with only the BatchNorm layers in train mode. Momenta and
    training flags are restored; the new statistics stay (this is the point).
    """
    bns = [m for m in model.modules() if is_batchnorm(m) and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        set_bn_mode(model, "train")
        with torch.no_grad():
            for batch in batches:
                loss_fn(model, batch)
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        for m, flag in flags:
            m.training = flag


def _prepare(model: nn.Module, batches: Iterable[Batch] | None) -> list[Batch] | None:
    if batches is None:
        return None
    device = model_device(model)
    return [prepare_batch(b, device) for b in batches]


def _grid_point(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Batch],
    bn_mode: BNMode,
    recalibration: list[Batch] | None,
    metrics: Mapping[str, MetricFn] | None,
) -> dict[str, float]:
    if recalibration is not None:
        recalibrate_bn(model, loss_fn, recalibration)
    set_bn_mode(model, bn_mode)
    return evaluate(model, loss_fn, batches, metrics=metrics)


def _result(kind: str, values: list[dict[str, float]], shape: tuple[int, ...], **extra) -> dict:
    def reshape(xs: list[float]) -> list:
        return xs if len(shape) == 1 else [xs[i * shape[1] : (i + 1) * shape[1]] for i in range(shape[0])]

    names = list(values[0])
    return {
        "kind": kind,
        **extra,
        "loss": reshape([v["loss"] for v in values]),
        "metrics": {n: reshape([v[n] for v in values]) for n in names if n != "loss"},
    }


def _linspace(values: Sequence[float] | Tensor | None, lo: float, hi: float, n: int) -> list[float]:
    if values is None:
        return torch.linspace(lo, hi, n, dtype=torch.float64).tolist()
    return [float(v) for v in values]


def _check_points_per_batch(points_per_batch: int) -> int:
    if int(points_per_batch) < 1:
        raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
    return int(points_per_batch)


def _run_grid(
    model: nn.Module,
    loss_fn: LossFn,
    data: list[Batch],
    grid: Sequence,
    set_point: Callable[[object], None],
    stacked_point: Callable[[Sequence], dict[str, Tensor]],
    *,
    kind: str,
    bn_mode: BNMode,
    recal: list[Batch] | None,
    metrics: Mapping[str, MetricFn] | None,
    points_per_batch: int,
    progress: bool,
) -> tuple[list[dict[str, float]], bool]:
    """Values at every grid point, batched when allowed (see the module docstring), and whether
    the batched path ran. ``set_point`` writes one point into the model; ``stacked_point`` gives
    the varying state entries of a chunk of points, stacked. Call inside ``preserved_state``."""
    batchable = points_per_batch > 1 and recal is None and (bn_mode == "eval" or not has_batchnorm(model))
    if batchable:
        set_bn_mode(model, bn_mode)
        chunks = [grid[i : i + points_per_batch] for i in range(0, len(grid), points_per_batch)]
        values: list[dict[str, float]] = []
        try:
            for chunk in progress_bar(chunks, desc=f"{kind} ({points_per_batch} points per pass)", enabled=progress):
                values += evaluate_points(model, loss_fn, data, stacked_point(chunk), metrics=metrics)
            return values, True
        except Exception as exc:  # vmap cannot run every loss function; the sequential path can
            if values:
                raise
            warnings.warn(
                f"batched evaluation failed ({type(exc).__name__}: {exc}); evaluating the points one by one",
                RuntimeWarning,
                stacklevel=3,
            )
    values = []
    for point in progress_bar(grid, desc=kind, enabled=progress):
        set_point(point)
        values.append(_grid_point(model, loss_fn, data, bn_mode, recal, metrics))
    return values, False


def _running_var_keys(model: nn.Module) -> set[str]:
    return {
        f"{name}.running_var" if name else "running_var"
        for name, m in model.named_modules()
        if is_batchnorm(m) and getattr(m, "running_var", None) is not None
    }


def interpolation_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    alphas: Sequence[float] | Tensor | None = None,
    bn_mode: BNMode = "eval",
    recalibration_batches: Iterable[Batch] | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    points_per_batch: int = 1,
    progress: bool = True,
) -> dict:
    """Loss along :math:`(1-\\alpha)\\theta_a + \\alpha\\theta_b`; ``model`` supplies the architecture.

    Args:
        model: a module whose ``state_dict()`` keys match ``state_a`` and ``state_b``.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
        batches: evaluation data.
        state_a, state_b: full state dicts (``model.state_dict()`` of the two models; they are
            copied, so the model's own live state dict is fine).
        alphas: grid; default 41 points on :math:`[-0.5, 1.5]`.
        bn_mode, recalibration_batches, metrics, points_per_batch: see the module docstring.
        progress: show a progress bar.

    Returns:
        ``{"kind": "interpolation", "alphas", "loss", "metrics", "bn_mode", "recalibrated",
        "clamped_variances", "points_per_batch", "batched"}``; ``clamped_variances`` counts the
        points at which some interpolated BatchNorm variance was negative and set to 0 (``None``
        with recalibration, which replaces the interpolated statistics).
    """
    alphas = _linspace(alphas, -0.5, 1.5, 41)
    points_per_batch = _check_points_per_batch(points_per_batch)
    data, recal = _prepare(model, batches), _prepare(model, recalibration_batches)
    assert data is not None
    with preserved_state(model):
        targets = model.state_dict(keep_vars=True)
        missing = set(targets) - set(state_a) | set(targets) - set(state_b)
        if missing:
            raise KeyError(f"state dicts lack {sorted(missing)}")
        device = model_device(model)
        variances = _running_var_keys(model)
        # Copies: the ends may alias the very tensors the loop overwrites.
        ends = {
            k: (
                targets[k],
                state_a[k].detach().to(device=device, dtype=targets[k].dtype, copy=True),
                state_b[k].detach().to(device=device, dtype=targets[k].dtype, copy=True),
            )
            for k in targets
        }
        clamped: set[float] = set()

        def mix(k: str, alphas_: Sequence[float]) -> Tensor:
            """The state entry ``k`` at each of ``alphas_``, stacked; variances clamped at 0."""
            _, a, b = ends[k]
            coef = torch.tensor(alphas_, dtype=torch.float64, device=device).view(-1, *([1] * a.dim()))
            out = a * (1.0 - coef).to(a.dtype) + b * coef.to(a.dtype)
            if k in variances:
                negative = (out < 0).flatten(1).any(1).tolist()
                clamped.update(alpha for alpha, neg in zip(alphas_, negative, strict=True) if neg)
                out = out.clamp_min(0.0)
            return out

        def set_point(alpha: float) -> None:
            for k, (target, a, b) in ends.items():
                if not target.is_floating_point():
                    target.data.copy_(a if alpha < 0.5 else b)
                elif k in variances:
                    target.data.copy_(mix(k, [alpha])[0])
                else:
                    target.data.copy_(a * (1.0 - alpha) + b * alpha)

        def stacked_point(chunk: Sequence[float]) -> dict[str, Tensor]:
            # Integer buffers (num_batches_tracked) are not read by BatchNorm in eval mode.
            return {k: mix(k, chunk) for k, (target, _, _) in ends.items() if target.is_floating_point()}

        values, batched = _run_grid(
            model,
            loss_fn,
            data,
            alphas,
            set_point,
            stacked_point,
            kind="interpolation",
            bn_mode=bn_mode,
            recal=recal,
            metrics=metrics,
            points_per_batch=points_per_batch,
            progress=progress,
        )
    return _result(
        "interpolation",
        values,
        (len(alphas),),
        alphas=alphas,
        bn_mode=bn_mode,
        recalibrated=recal is not None,
        clamped_variances=None if recal is not None else len(clamped),
        points_per_batch=points_per_batch,
        batched=batched,
    )


def _move(params: list[nn.Parameter], center: list[Tensor], dirs: list[list[Tensor]], coefs: list[float]) -> None:
    point = list(center)
    for d, c in zip(dirs, coefs, strict=True):
        point = torch._foreach_add(point, d, alpha=c)
    for p, value in zip(params, point, strict=True):
        p.data.copy_(value)


def _slice(
    kind: str,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    axes: list[list[float]],
    directions: Sequence[Direction] | None,
    seed: int,
    ignore_bias_bn: bool,
    params: Sequence[str | nn.Parameter] | None,
    bn_mode: BNMode,
    recalibration_batches: Iterable[Batch] | None,
    metrics: Mapping[str, MetricFn] | None,
    points_per_batch: int,
    progress: bool,
) -> dict:
    points_per_batch = _check_points_per_batch(points_per_batch)
    data, recal = _prepare(model, batches), _prepare(model, recalibration_batches)
    assert data is not None
    random = directions is None
    if directions is None:
        gen = torch.Generator().manual_seed(seed)
        directions = [
            random_direction(model, generator=gen, ignore_bias_bn=ignore_bias_bn, params=params) for _ in axes
        ]
    if len(directions) != len(axes):
        raise ValueError(f"need {len(axes)} directions, got {len(directions)}")
    names = list(directions[0])
    by_name = dict(model.named_parameters())
    chosen = [by_name[n] for n in names]
    center = list(parameter_values(model, names).values())
    dirs = [[d[n].to(device=p.device, dtype=p.dtype) for n, p in zip(names, chosen, strict=True)] for d in directions]
    grid = [[a] for a in axes[0]] if len(axes) == 1 else [[a, b] for a in axes[0] for b in axes[1]]

    def stacked_point(chunk: Sequence[list[float]]) -> dict[str, Tensor]:
        out = {}
        for i, (name, c) in enumerate(zip(names, center, strict=True)):
            value = c.unsqueeze(0).repeat(len(chunk), *([1] * c.dim()))
            for j, d in enumerate(dirs):
                coef = torch.tensor([p[j] for p in chunk], dtype=torch.float64, device=c.device).to(c.dtype)
                value = value + coef.view(-1, *([1] * c.dim())) * d[i]
            out[name] = value
        return out

    with preserved_state(model):
        values, batched = _run_grid(
            model,
            loss_fn,
            data,
            grid,
            lambda coefs: _move(chosen, center, dirs, coefs),
            stacked_point,
            kind=kind,
            bn_mode=bn_mode,
            recal=recal,
            metrics=metrics,
            points_per_batch=points_per_batch,
            progress=progress,
        )
    shape = tuple(len(a) for a in axes)
    extra = {"alphas": axes[0]} if len(axes) == 1 else {"alphas": axes[0], "betas": axes[1]}
    return _result(
        kind,
        values,
        shape,
        **extra,
        bn_mode=bn_mode,
        recalibrated=recal is not None,
        ignore_bias_bn=ignore_bias_bn,
        seed=seed if random else None,
        points_per_batch=points_per_batch,
        batched=batched,
    )


def landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    alphas: Sequence[float] | Tensor | None = None,
    direction: Direction | None = None,
    seed: int = 0,
    ignore_bias_bn: bool = True,
    params: Sequence[str | nn.Parameter] | None = None,
    bn_mode: BNMode = "eval",
    recalibration_batches: Iterable[Batch] | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    points_per_batch: int = 1,
    progress: bool = True,
) -> dict:
    """Loss along :math:`w + \\alpha d` for a filter-normalised random ``d`` (or the one given).

    Args:
        alphas: grid; default 41 points on :math:`[-1, 1]`.
        direction: a direction by parameter name; default: :func:`random_direction` from ``seed``.
        ignore_bias_bn: zero direction on tensors with at most one dimension.
        params: parameters the random direction spans (default all with ``requires_grad``).
        Other arguments as in :func:`interpolation_1d`.

    Returns:
        ``{"kind": "random_1d", "alphas", "loss", "metrics", ...}``.
    """
    return _slice(
        "random_1d",
        model,
        loss_fn,
        batches,
        [_linspace(alphas, -1.0, 1.0, 41)],
        None if direction is None else [direction],
        seed,
        ignore_bias_bn,
        params,
        bn_mode,
        recalibration_batches,
        metrics,
        points_per_batch,
        progress,
    )


def landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    alphas: Sequence[float] | Tensor | None = None,
    betas: Sequence[float] | Tensor | None = None,
    directions: tuple[Direction, Direction] | None = None,
    seed: int = 0,
    ignore_bias_bn: bool = True,
    params: Sequence[str | nn.Parameter] | None = None,
    bn_mode: BNMode = "eval",
    recalibration_batches: Iterable[Batch] | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    points_per_batch: int = 1,
    progress: bool = True,
) -> dict:
    """Loss on the plane :math:`w + \\alpha d_1 + \\beta d_2` of two filter-normalised random
    directions (drawn one after the other from ``seed``), or the two given.

    Returns:
        ``{"kind": "random_2d", "alphas", "betas", "loss", "metrics", ...}`` where ``loss[i][j]``
        is the loss at ``(alphas[i], betas[j])``; defaults: 21 points on :math:`[-1, 1]` each.
    """
    axes = [_linspace(alphas, -1.0, 1.0, 21), _linspace(betas, -1.0, 1.0, 21)]
    return _slice(
        "random_2d",
        model,
        loss_fn,
        batches,
        axes,
        None if directions is None else list(directions),
        seed,
        ignore_bias_bn,
        params,
        bn_mode,
        recalibration_batches,
        metrics,
        points_per_batch,
        progress,
    )
