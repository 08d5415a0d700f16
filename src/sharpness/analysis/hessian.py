r"""Hessian-vector products of a training loss over a whole data set.

For data split into batches :math:`b` of :math:`n_b` examples and a loss function returning the
batch mean :math:`L_b(w)`, the training loss and its Hessian are

.. math::
    L(w) = \sum_b \frac{n_b}{N} L_b(w), \qquad
    H v = \sum_b \frac{n_b}{N} \nabla_w\!\left(\nabla_w L_b(w)^\top v\right),

each term computed exactly by double back-propagation (Pearlmutter 1994): the gradient is built
with ``create_graph=True`` and differentiated again against ``v``. No finite differences, so the
product is exact up to the rounding of the chosen dtype (float32, or float64 on a float64 copy of
the model). BatchNorm follows ``bn_mode`` (see :mod:`sharpness.analysis.model_state`); in
``"train"`` mode the Hessian is that of the sum of per-batch losses, each normalised with its own
batch statistics, so it depends on the batching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from sharpness.analysis.batches import Batch, batch_weights, prepare_batch
from sharpness.analysis.model_state import (
    BNMode,
    bn_mode_context,
    check_bn_mode,
    float64_copy,
    model_device,
    select_parameters,
)

__all__ = ["LossFn", "HessianOperator"]

LossFn = Callable[[nn.Module, Batch], Tensor]
"""``loss_fn(model, batch)``: the scalar mean loss of ``model`` on ``batch``."""


class HessianOperator:
    """:math:`v \\mapsto Hv` for the Hessian of the training loss, on flat vectors.

    Args:
        model: any module; it is not modified (BatchNorm buffers touched in ``"train"`` mode are
            put back after every product).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
        batches: the data, an iterable of batches (read once, kept in a list, moved to the model's
            device and, for floating-point tensors, cast to ``dtype``).
        params: names or parameter objects to differentiate; default: all with ``requires_grad``.
        dtype: ``None`` (the model's dtype) or ``torch.float64``, which works on a float64 copy.
        bn_mode: ``"eval"`` or ``"train"``.
        weights: per-batch weights (normalised to sum 1); default :math:`n_b/N`.
        cache_graphs: build each batch's gradient graph once and keep it, so every product costs
            one backward pass per batch instead of a forward and two backwards (about 1.6x faster
            on a small CNN, ``benchmarks/bench_hessian.py``) at the memory of all batches'
            graphs. ``None`` (default): cache only when there is a single batch, whose graph
            every product needs in memory anyway.

    With cached graphs the operator is the Hessian at the weights it was built at; otherwise
    every product uses the model's current weights. Vectors are flat 1-D tensors in the order of
    ``names``; :meth:`unflatten` and :meth:`flatten` convert to and from per-parameter tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        *,
        params: Sequence[str | nn.Parameter] | None = None,
        dtype: torch.dtype | None = None,
        bn_mode: BNMode = "eval",
        weights: Sequence[float] | None = None,
        cache_graphs: bool | None = None,
    ) -> None:
        check_bn_mode(bn_mode)
        names, chosen = select_parameters(model, params)
        model_dtype = chosen[0].dtype
        dtype = model_dtype if dtype is None else dtype
        if dtype != model_dtype:
            if dtype != torch.float64:
                raise ValueError(f"dtype must be None (the model's) or torch.float64, got {dtype}")
            model = float64_copy(model)
            names, chosen = select_parameters(model, names)
        self.model = model
        self.loss_fn = loss_fn
        self.names = names
        self.params = chosen
        self.bn_mode: BNMode = bn_mode
        self.dtype = dtype
        self.device = model_device(model)
        self.shapes = [p.shape for p in chosen]
        self.numels = [p.numel() for p in chosen]
        self.dim = sum(self.numels)
        self.batches = [prepare_batch(b, self.device, dtype) for b in batches]
        self.weights = batch_weights(self.batches, weights)
        self.num_matvecs = 0
        self._graphs: list[list[Tensor]] | None = None
        if cache_graphs or (cache_graphs is None and len(self.batches) == 1):
            with torch.enable_grad(), bn_mode_context(model, bn_mode):
                self._graphs = [self._gradient_graph(b) for b in self.batches]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Split a flat vector into views shaped like the parameters."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        return [t.view(s) for t, s in zip(torch.split(v, self.numels), self.shapes, strict=True)]

    def _gradient_graph(self, batch: Batch) -> list[Tensor]:
        loss = self.loss_fn(self.model, batch)
        return list(
            torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
        )

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Hv` for a flat vector ``v`` (same dtype and device as the operator)."""
        vs = self.unflatten(v.to(device=self.device, dtype=self.dtype))
        out = [torch.zeros_like(p, dtype=self.dtype) for p in self.params]
        with torch.enable_grad(), bn_mode_context(self.model, self.bn_mode):
            for i, (batch, weight) in enumerate(zip(self.batches, self.weights, strict=True)):
                grads = self._graphs[i] if self._graphs is not None else self._gradient_graph(batch)
                # A gradient that does not depend on the weights (unused parameter, linear model)
                # contributes nothing and cannot be differentiated.
                live = [j for j, g in enumerate(grads) if g.requires_grad]
                if not live:
                    continue
                hv = torch.autograd.grad(
                    [grads[j] for j in live],
                    self.params,
                    grad_outputs=[vs[j] for j in live],
                    retain_graph=self._graphs is not None,
                    allow_unused=True,
                    materialize_grads=True,
                )
                torch._foreach_add_(out, hv, alpha=weight)
        self.num_matvecs += 1
        return self.flatten(out)

    __call__ = matvec
