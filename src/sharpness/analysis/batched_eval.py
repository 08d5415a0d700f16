r"""Evaluating the loss at many weight vectors at once: ``torch.func.functional_call`` + ``torch.vmap``.

A landscape is the loss at tens to thousands of points :math:`\theta_1, \dots, \theta_P` of the
same architecture. Evaluated one at a time, each point is a forward pass over the data with the
model's weights overwritten in place; on a GPU, small models then leave the device mostly idle.
Here a chunk of :math:`P` points is stacked along a new leading dimension and
``vmap(lambda theta: functional_call(model, theta, batch))`` runs all of them in one batched
forward pass per batch (the PyTorch ``torch.func`` model-ensembling pattern). The model's own
tensors are never written.

This computes the same function as the sequential evaluation only when the forward pass of a
point does not depend on the others and has no side effects: BatchNorm must use its running
statistics (eval mode; batch statistics in train mode update the running buffers in place),
and BatchNorm recalibration, which needs in-place updates of the running statistics per point,
is excluded. :func:`evaluate_points` is only used by the landscapes under those conditions,
and falls back to the sequential path whenever ``vmap`` cannot run the user's functions
(e.g. a ``loss_fn`` that calls ``.item()``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sharpness.analysis.batches import Batch, batch_weights
from sharpness.analysis.hessian import LossFn

__all__ = ["evaluate_points"]


class _Objectives(nn.Module):
    """``forward(batch)`` is the tuple of the loss and the metrics of ``model`` on ``batch``."""

    def __init__(self, model: nn.Module, fns: Sequence[Callable[[nn.Module, Batch], Tensor]]) -> None:
        super().__init__()
        self.model = model
        self.fns = list(fns)

    def forward(self, batch: Batch) -> tuple[Tensor, ...]:
        return tuple(torch.as_tensor(fn(self.model, batch)) for fn in self.fns)


def evaluate_points(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    points: Mapping[str, Tensor],
    *,
    metrics: Mapping[str, Callable[[nn.Module, Batch], Tensor]] | None = None,
) -> list[dict[str, float]]:
    """Loss and metrics at ``P`` points in one vmapped pass per batch, in the model's current mode.

    Args:
        model: the architecture; its current parameters and buffers are used for every entry of
            its ``state_dict`` that ``points`` does not give.
        loss_fn, batches, metrics: as in :func:`~sharpness.analysis.landscape.evaluate`.
        points: ``{state_dict key: tensor of shape (P, *shape)}``, the varying entries.

    Returns one dict per point, accumulated exactly as
    :func:`~sharpness.analysis.landscape.evaluate` does (Python floats, batch order), so with the
    same per-batch values the totals are bit-identical.
    """
    fns = {"loss": loss_fn, **(metrics or {})}
    wrapper = _Objectives(model, list(fns.values()))
    keys = list(points)
    num = int(points[keys[0]].shape[0])

    def at(values: tuple[Tensor, ...], batch: Batch) -> tuple[Tensor, ...]:
        return functional_call(wrapper, {f"model.{k}": v for k, v in zip(keys, values, strict=True)}, (batch,))

    batched = torch.vmap(at, in_dims=(0, None))
    totals = [dict.fromkeys(fns, 0.0) for _ in range(num)]
    stacked = tuple(points[k] for k in keys)
    with torch.no_grad():
        for batch, w in zip(batches, batch_weights(batches), strict=True):
            columns = [c.tolist() for c in batched(stacked, batch)]  # in each function's own dtype
            for p, total in enumerate(totals):
                for name, column in zip(fns, columns, strict=True):
                    total[name] += w * column[p]
    return totals
