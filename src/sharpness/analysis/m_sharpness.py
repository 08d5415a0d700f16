r"""m-sharpness (Foret et al. 2021, §4.1).

For disjoint sets :math:`S` of :math:`m` training examples, with :math:`L_S` the mean loss on
:math:`S`, the paper measures

.. math::
    \frac{1}{|\mathcal{S}|}\sum_{S\in\mathcal{S}}
    \Big(\max_{\|\epsilon\|_p \le \rho} L_S(w + \epsilon) - L_S(w)\Big),

with the inner maximum replaced by its first-order solution, eq. (2):
:math:`\hat\epsilon_S = \rho\,\mathrm{sign}(g_S)|g_S|^{q-1}/\|g_S\|_q^{q-1}`,
:math:`g_S = \nabla L_S(w)`, :math:`1/p + 1/q = 1` (computed by
:func:`sharpness.optim.perturbation.perturbation`). For a loss linear in :math:`w` this is the
exact maximum, :math:`\rho\|g_S\|_q`.

With ``ascent_steps > 1`` the maximum is approached by further ascent steps from
:math:`\hat\epsilon_S`, and the largest :math:`L_S(w+\epsilon_t)` over the iterates is kept (every
iterate is feasible, so the value only gets closer to the true maximum from below):

* ``step_size=None`` (default): :math:`\epsilon_{t+1} = \hat\epsilon(\nabla L_S(w+\epsilon_t))`,
  the maximiser over the ball of the linearisation at the current iterate (a conditional-gradient
  step of length 1; it never decreases a loss that is convex in :math:`\epsilon`);
* ``step_size=a``: projected normalised ascent
  :math:`\epsilon_{t+1} = \Pi(\epsilon_t + a\, d_t)`, with :math:`d_t` the unit-:math:`\ell_p`
  steepest-ascent direction and :math:`\Pi` the Euclidean projection onto the ball for
  :math:`p \in \{2, \infty\}` (a radial rescaling for other :math:`p`).

Subsets are consecutive runs of ``m`` examples inside each batch, in data order (shuffle the
data to draw them at random); a batch's last ``n_b mod m`` examples are left out and counted.
BatchNorm follows ``bn_mode``: ``"eval"`` (running statistics: :math:`L_S` is the mean of the
per-example losses, the literal definition) or ``"train"`` (statistics of :math:`S` itself, the
loss SAM differentiates when each accelerator holds ``m`` examples). The weights, buffers and
training flags are restored bit-exactly afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sharpness.analysis.batches import Batch, batch_size, prepare_batch, split_batch
from sharpness.analysis.hessian import LossFn
from sharpness.analysis.model_state import (
    BNMode,
    model_device,
    preserved_state,
    select_parameters,
    set_bn_mode,
)
from sharpness.analysis.progress import progress_bar
from sharpness.optim.perturbation import global_norm, perturbation

__all__ = ["m_sharpness", "subset_sharpness"]


def _project(eps: list[Tensor], rho: float, p: float) -> list[Tensor]:
    if math.isinf(p):
        return [e.clamp(-rho, rho) for e in eps]
    norm = float(global_norm(eps, p))
    return eps if norm <= rho else torch._foreach_mul(eps, rho / norm)


def _loss_and_grad(model: nn.Module, loss_fn: LossFn, batch: Batch, params: list[nn.Parameter]):
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return float(loss.detach()), list(grads)


def _set(params: list[nn.Parameter], values: list[Tensor]) -> None:
    for p, v in zip(params, values, strict=True):
        p.data.copy_(v)


def subset_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: list[nn.Parameter],
    *,
    rho: float,
    p: float = 2.0,
    ascent_steps: int = 1,
    step_size: float | None = None,
) -> tuple[float, float]:
    """``(L_S(w), max_t L_S(w + eps_t))`` for one subset ``batch``, in the model's current mode.

    The parameters are left at their original values (restored by copy, bit-exactly).
    """
    if ascent_steps < 1:
        raise ValueError("ascent_steps must be >= 1")
    w0 = [q.detach().clone() for q in params]
    try:
        loss0, grads = _loss_and_grad(model, loss_fn, batch, params)
        eps = perturbation(grads, rho, p).eps
        best = -math.inf
        for t in range(ascent_steps):
            _set(params, torch._foreach_add(w0, eps))
            if t == ascent_steps - 1:
                with torch.no_grad():
                    best = max(best, float(loss_fn(model, batch)))
                break
            loss_t, grads = _loss_and_grad(model, loss_fn, batch, params)
            best = max(best, loss_t)
            if step_size is None:
                eps = perturbation(grads, rho, p).eps
            else:
                direction = perturbation(grads, 1.0, p).eps
                eps = _project(torch._foreach_add(eps, direction, alpha=step_size), rho, p)
    finally:
        _set(params, w0)
    return loss0, best


def _subsets(batches: Iterable[Batch], m: int, dropped: list[int]) -> Iterator[Batch]:
    for batch in batches:
        dropped[0] += batch_size(batch) % m
        yield from split_batch(batch, m)


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    m: int,
    rho: float,
    p: float = 2.0,
    ascent_steps: int = 1,
    step_size: float | None = None,
    bn_mode: BNMode = "eval",
    params: Sequence[str | nn.Parameter] | None = None,
    max_subsets: int | None = None,
    progress: bool = True,
) -> dict:
    """m-sharpness of ``model`` over the data, as a JSON-serialisable dict.

    Args:
        model: any module (left bit-identical).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
        batches: the data; each batch is cut into subsets of ``m`` examples.
        m: examples per subset.
        rho: radius :math:`\\rho` of the ball.
        p: norm of the ball (``p > 1``, ``math.inf`` allowed).
        ascent_steps: 1 for the paper's :math:`\\hat\\epsilon`; more for further ascent steps.
        step_size: ``None`` for linearisation-maximiser steps, else the projected step length.
        bn_mode: ``"eval"`` or ``"train"`` (see the module docstring).
        params: parameters perturbed (names or objects); default all with ``requires_grad``.
        max_subsets: stop after this many subsets.
        progress: show a progress bar (only on a terminal).

    Returns:
        ``sharpness`` (mean over subsets), its ``sharpness_std`` and ``sharpness_stderr``, mean
        ``loss`` and ``perturbed_loss``, ``per_subset`` values, ``num_subsets``,
        ``dropped_examples``, and the settings.
    """
    if m < 1:
        raise ValueError("m must be >= 1")
    _, chosen = select_parameters(model, params)
    device = model_device(model)
    dropped = [0]
    losses, perturbed = [], []
    with preserved_state(model):
        set_bn_mode(model, bn_mode)
        data = (prepare_batch(b, device) for b in batches)
        for subset in progress_bar(_subsets(data, m, dropped), total=max_subsets, desc="m-sharpness", enabled=progress):
            loss0, loss_max = subset_sharpness(
                model, loss_fn, subset, chosen, rho=rho, p=p, ascent_steps=ascent_steps, step_size=step_size
            )
            losses.append(loss0)
            perturbed.append(loss_max)
            if max_subsets is not None and len(losses) >= max_subsets:
                break
    if not losses:
        raise ValueError(f"no subset of {m} examples in the data")
    diffs = torch.tensor(perturbed, dtype=torch.float64) - torch.tensor(losses, dtype=torch.float64)
    k = diffs.numel()
    std = float(diffs.std(unbiased=True)) if k > 1 else 0.0
    return {
        "m": m,
        "rho": float(rho),
        "p": float(p) if math.isfinite(p) else "inf",
        "ascent_steps": ascent_steps,
        "step_size": step_size,
        "bn_mode": bn_mode,
        "num_subsets": k,
        "dropped_examples": dropped[0],
        "sharpness": float(diffs.mean()),
        "sharpness_std": std,
        "sharpness_stderr": std / math.sqrt(k),
        "loss": sum(losses) / k,
        "perturbed_loss": sum(perturbed) / k,
        "per_subset": diffs.tolist(),
    }
