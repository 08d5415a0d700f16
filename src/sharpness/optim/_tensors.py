"""Tensor-list helpers of the optimizers: copies grouped by kind, lists by device."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sharpness.optim import _sharded

__all__ = [
    "layout",
    "mixed",
    "copy_",
    "by_device",
    "Copies",
    "ParamState",
    "all_reduce_mean_",
    "all_reduce_any",
    "select",
]


def layout(t: Tensor) -> tuple[torch.Size, torch.dtype, torch.device]:
    return t.shape, t.dtype, t.device


def mixed(tensors: list[Tensor]) -> bool:
    """Whether ``tensors`` hold more than one (dtype, device) kind; computed when a list of copies is built."""
    return len({(t.dtype, t.device) for t in tensors}) > 1


def copy_(targets: list[Tensor], sources: list[Tensor], mixed: bool) -> None:
    """``torch._foreach_copy_(targets, sources)``, one call per (dtype, device) when ``mixed``.

    CUDA's one-launch copy needs a single dtype in the list; BatchNorm's buffers mix float32 statistics
    with an int64 ``num_batches_tracked``, which would otherwise cost one kernel per buffer. ``mixed`` is
    cached with the lists, so the common single-kind step loops over no tensor in Python here.

    DTensors (FSDP2) are copied shard to shard: ``_foreach_copy_`` has no DTensor rule, and a copy of a shard
    holds that shard only. Call it under ``torch.no_grad()``.
    """
    targets, sources = _sharded.local(targets), _sharded.local(sources)
    if not mixed:
        torch._foreach_copy_(targets, sources)
        return
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], list[Tensor]]] = {}
    for target, source in zip(targets, sources, strict=True):
        dst, src = groups.setdefault((target.dtype, target.device), ([], []))
        dst.append(target)
        src.append(source)
    for dst, src in groups.values():
        torch._foreach_copy_(dst, src)


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


class Copies:
    """Copies of a list of tensors, kept per key (a parameter) and reused from step to step.

    ``save(keys, sources)`` copies ``sources`` (the keys themselves, or their gradients) in one ``foreach`` copy per
    (dtype, device) kind; the list of copies is rebuilt only when the keys or their layouts change.
    """

    def __init__(self) -> None:
        self._by_key: dict[Tensor, Tensor] = {}
        self.keys: list[Tensor] = []
        self.copies: list[Tensor] = []
        self._mixed = False

    def save(self, keys: list[Tensor], sources: list[Tensor]) -> list[Tensor]:
        if len(self.keys) != len(keys) or any(
            a is not b or layout(s) != layout(c)
            for a, b, s, c in zip(keys, self.keys, sources, self.copies, strict=True)
        ):
            for key, source in zip(keys, sources, strict=True):
                copy = self._by_key.get(key)
                if copy is None or layout(copy) != layout(source):
                    self._by_key[key] = torch.empty_like(source, memory_format=torch.preserve_format)
            self.keys, self.copies = list(keys), [self._by_key[key] for key in keys]
            self._mixed = mixed(self.copies)
        copy_(self.copies, sources, self._mixed)
        return self.copies

    def restore(self, targets: list[Tensor]) -> None:
        """Copy the saved values back into ``targets`` (the tensors saved, in the same order)."""
        copy_(targets, self.copies, self._mixed)

    def of(self, key: Tensor) -> Tensor:
        return self._by_key[key]


def all_reduce_mean_(tensors: list[Tensor], group: Any = None) -> None:
    """Average ``tensors`` in place over the processes of ``group``: one all-reduce per (dtype, device) kind."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size(group)
    kinds: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        kinds.setdefault((t.dtype, t.device), []).append(t)
    for same in kinds.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        torch._foreach_copy_(same, list(_unflatten_dense_tensors(flat, same)))


def all_reduce_any(flag: Tensor | None, device: torch.device, group: Any = None) -> Tensor:
    """Whether ``flag`` (a 0-dim bool tensor; None: False) is set on any process of ``group``: one all-reduce (MAX)
    of one byte on ``device``, a collective on the device (no host synchronisation)."""
    import torch.distributed as dist

    byte = torch.zeros((), dtype=torch.uint8, device=device) if flag is None else flag.to(device, torch.uint8)
    dist.all_reduce(byte, op=dist.ReduceOp.MAX, group=group)
    return byte.bool()


def select(skipped: Tensor | bool, old: list[Tensor] | None, new: list[Tensor]) -> list[Tensor] | None:
    """``old`` where ``skipped`` else ``new`` (``old`` None: nothing yet, which a skipped step keeps).

    A host bool picks a list; a device flag (a base step skipped on the device) picks per element on the device,
    ``old`` None then counting as zeros.
    """
    if not isinstance(skipped, Tensor):
        return old if skipped else new
    if old is None:
        old = [torch.zeros_like(t) for t in new]
    return [torch.where(skipped.to(n.device), o, n) for o, n in zip(old, new, strict=True)]


class ParamState:
    """Tensors kept per parameter (an EMA, a stored direction) that each step proposes and commits only if it was
    not skipped, so a skipped step leaves them as they were; saved by the parameters' indices."""

    def __init__(self) -> None:
        self.current: dict[Tensor, Tensor] = {}
        self._proposed: dict[Tensor, Tensor] | None = None

    def get(self, params: list[Tensor]) -> list[Tensor] | None:
        """The current tensors of ``params``, or None unless every one of them has one."""
        if not params or any(p not in self.current for p in params):
            return None
        return [self.current[p] for p in params]

    def propose(self, params: list[Tensor], tensors: list[Tensor]) -> None:
        self._proposed = dict(zip(params, tensors, strict=True))

    def commit(self, skipped: Tensor | bool) -> None:
        proposed, self._proposed = self._proposed, None
        if proposed is None:
            return
        params = list(proposed)
        kept = select(skipped, self.get(params), list(proposed.values()))
        if kept is not None:
            self.current.update(zip(params, kept, strict=True))

    def drop(self) -> None:
        self._proposed = None

    def state_dict(self, index: dict[Tensor, int]) -> dict[int, Tensor]:
        return {index[p]: t.detach().clone() for p, t in self.current.items()}

    def load_state_dict(self, state: dict[int, Tensor], params: list[Tensor]) -> None:
        self._proposed = None
        self.current = {params[int(i)]: t.to(params[int(i)].device) for i, t in state.items()}
