"""Bit-exact snapshots of a model, BatchNorm modes, parameter selection and float64 copies.

Every analysis in this package leaves the model exactly as it found it: parameters, buffers
(BatchNorm running statistics and ``num_batches_tracked`` included) and each module's
``training`` flag are restored bit for bit, and ``.grad`` fields are never touched (gradients
are taken with :func:`torch.autograd.grad`).

BatchNorm modes (``bn_mode``), for every analysis:

* ``"eval"``: BatchNorm layers normalise with their running statistics, so the loss is a sum
  of per-example losses and does not depend on how the data is batched.
* ``"train"``: BatchNorm layers normalise with the statistics of the current batch (the
  function SGD and SAM actually differentiate during training); the running statistics these
  forward passes update are put back afterwards.

All other modules (dropout in particular) are in eval mode in both cases, so every quantity is a
deterministic function of the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "BNMode",
    "ModelSnapshot",
    "is_batchnorm",
    "has_batchnorm",
    "preserved_state",
    "bn_mode_context",
    "check_bn_mode",
    "set_bn_mode",
    "select_parameters",
    "float64_copy",
    "model_device",
]

BNMode = Literal["eval", "train"]


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (any dimension, SyncBatchNorm included)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm layer."""
    return any(is_batchnorm(m) for m in model.modules())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer; CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class ModelSnapshot:
    """Copies of every parameter and buffer and every module's ``training`` flag."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors = [(t, t.detach().clone()) for t in _state_tensors(model)]
        self.training = [(m, m.training) for m in model.modules()]

    def restore(self, buffers_only: bool = False) -> None:
        """Write the saved values back in place.

        The copy goes through ``.data`` so the tensors' autograd version counters do not move: a
        graph built before the restore (a cached Hessian-vector-product graph) stays usable.
        """
        params = {id(p) for p in self.model.parameters()} if buffers_only else set()
        for t, saved in self.tensors:
            if id(t) not in params:
                t.data.copy_(saved)
        for m, flag in self.training:
            m.training = flag


def _state_tensors(model: nn.Module) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Restore ``model``'s parameters, buffers and training flags on exit, even after an error."""
    snap = ModelSnapshot(model)
    try:
        yield snap
    finally:
        snap.restore()


def check_bn_mode(bn_mode: str) -> BNMode:
    """``bn_mode`` itself if it is ``"eval"`` or ``"train"``; a ``ValueError`` otherwise."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    return bn_mode  # type: ignore[return-value]


def set_bn_mode(model: nn.Module, bn_mode: BNMode) -> None:
    """Put ``model`` in eval mode, then its BatchNorm layers in train mode if ``bn_mode == "train"``."""
    check_bn_mode(bn_mode)
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if is_batchnorm(m):
                m.train()


@contextmanager
def bn_mode_context(model: nn.Module, bn_mode: BNMode) -> Iterator[None]:
    """Run the body in ``bn_mode``; restore the training flags and all buffers afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if bn_mode == "train" else []
    set_bn_mode(model, bn_mode)
    try:
        yield
    finally:
        for b, saved in buffers:
            b.data.copy_(saved)
        for m, flag in flags:
            m.training = flag


def select_parameters(
    model: nn.Module, params: Sequence[str | nn.Parameter] | None = None
) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters to analyse: all with ``requires_grad`` by default, else those given.

    ``params`` may hold parameter names (as in ``model.named_parameters()``) or the parameter
    objects themselves; the model's order is kept.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        wanted_names = {x for x in params if isinstance(x, str)}
        wanted_ids = {id(x) for x in params if not isinstance(x, str)}
        known = {n for n, _ in named}
        missing = wanted_names - known
        if missing:
            raise KeyError(f"no such parameters: {sorted(missing)}")
        if len(wanted_ids - {id(p) for _, p in named}) > 0:
            raise KeyError("some given parameter tensors do not belong to the model")
        chosen = [(n, p) for n, p in named if n in wanted_names or id(p) in wanted_ids]
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameters without requires_grad cannot be differentiated: {frozen}")
    if not chosen:
        raise ValueError("no parameters selected")
    return [n for n, _ in chosen], [p for _, p in chosen]


def float64_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with floating-point parameters and buffers in float64, no grads."""
    clone = copy.deepcopy(model).to(torch.float64)
    for p in clone.parameters():
        p.grad = None
    return clone
