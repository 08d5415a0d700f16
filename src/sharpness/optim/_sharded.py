r"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): every DTensor detail of the optimizers.

Under FSDP2 each parameter and its gradient are DTensors: rank :math:`r` stores a shard of the tensor
(``Shard(0)`` on a 1-D mesh, ``(Replicate(), Shard(0))`` under HSDP), and the gradients come already averaged
over all ranks. Elementwise work runs on the shards as it does on whole tensors; what needs the whole vector, a
norm or an inner product, is each rank's part reduced over the mesh dims that shard it (:func:`norm`).

- :func:`local` and :func:`unwrap` give the local shards (and how each is sharded) of a list of tensors.
- :func:`norm` is the one place that communicates: one all-reduce of a 0-dim tensor per mesh, a collective on
  device tensors (``DTensor.from_local(..., [Partial(op)]).full_tensor()``), which on CUDA waits on the stream,
  never on the host.
- :func:`check` rejects what SAM cannot do with DTensors, with one clear error each.
- :func:`fsdp_modules` and :func:`reshard` keep FSDP's unsharded parameters from going stale.

Nothing imports ``torch.distributed.tensor``: it is looked up in ``sys.modules``, and if it was never imported no
DTensor exists, so plain training pays neither the import nor a check per tensor.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["Sharding", "is_dtensor", "local", "unwrap", "norm", "plain", "like", "check", "fsdp_modules", "reshard"]

#: How a local shard's part of a norm is reduced: None for a plain (or fully replicated) tensor, else the DTensor's
#: mesh and, per mesh dim, whether the tensor is sharded over it (the dims to reduce; replicated dims hold copies).
Sharding = tuple[Any, tuple[bool, ...]] | None

T = TypeVar("T")


def _dtensor_class() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(tensors: Iterable[T]) -> list[T]:
    """The local shards of the DTensors among ``tensors``; anything else (plain tensors, None) as it is.

    Call it under ``torch.no_grad()``: a DTensor's local shard is then the very tensor FSDP stores, so in-place
    writes into it reach the parameter.
    """
    cls = _dtensor_class()
    if cls is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]


def _sharding(t: Tensor) -> Sharding:
    reduced = []
    for placement in t.placements:  # type: ignore[attr-defined]
        if placement.is_partial():
            raise RuntimeError(
                f"a gradient with placements {t.placements} is not reduced yet (Partial): "  # type: ignore[attr-defined]
                "SAM takes norms of reduced gradients only"
            )
        reduced.append(placement.is_shard())
    return (t.device_mesh, tuple(reduced)) if any(reduced) else None  # type: ignore[attr-defined]


def unwrap(tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Sharding] | None]:
    """The local shards of ``tensors`` and each one's :data:`Sharding`; ``(tensors, None)`` when none is a DTensor."""
    cls = _dtensor_class()
    if cls is None or not any(isinstance(t, cls) for t in tensors):
        return list(tensors), None
    shardings = [_sharding(t) if isinstance(t, cls) else None for t in tensors]
    return local(tensors), shardings


def norm(tensors: Sequence[Tensor], shardings: Sequence[Sharding], ord: float, dtype: torch.dtype) -> Tensor:
    """The ``ord``-norm of the whole tensors whose local shards are ``tensors``: a plain 0-dim tensor, the same on
    every rank.

    Each rank folds its shards into one part per sharding (:math:`\\sum \\|t\\|^{ord}`, or the max for
    ``ord = inf``) and reduces it over the sharded mesh dims: one all-reduce per mesh. Every rank takes part in
    each of them, also with empty shards only (a tensor smaller than the mesh), which contribute the identity
    (``_foreach_norm`` has none for ``inf`` and would raise on that rank alone, leaving the others waiting).
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    inf = math.isinf(ord)
    groups: dict[Sharding, list[Tensor]] = {}
    for t, sharding in zip(tensors, shardings, strict=True):
        groups.setdefault(sharding, []).append(t)
    device = tensors[0].device
    parts = []
    for sharding, group in groups.items():
        nonempty = [t for t in group if t.numel()]
        if nonempty:
            norms = torch._foreach_norm(nonempty, ord, dtype=dtype)
            try:
                norms = torch.stack(norms)
            except RuntimeError:  # plain tensors on several devices
                norms = torch.stack([n.to(device) for n in norms])
            part = norms.amax() if inf else norms.sum() if ord == 1 else norms.pow(ord).sum()
        else:
            part = torch.zeros((), dtype=dtype, device=device)
        if sharding is not None:
            mesh, reduced = sharding
            op = "max" if inf else "sum"
            placements = [Partial(op) if r else Replicate() for r in reduced]
            part = DTensor.from_local(part, mesh, placements, run_check=False).full_tensor()
        parts.append(part.to(device))
    total = torch.stack(parts)
    return total.amax() if inf else total.sum() if ord == 1 else total.sum().pow(1.0 / ord)


def plain(t: Tensor) -> Tensor:
    """A replicated DTensor (``clip_grad_norm_``'s total norm on DTensors) as a plain tensor (no communication)."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def like(reference: Tensor, local_tensor: Tensor) -> Tensor:
    """``local_tensor`` (shaped like ``reference``'s local shard) as a DTensor sharded like ``reference``."""
    if not is_dtensor(reference):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_tensor,
        reference.device_mesh,  # type: ignore[attr-defined]
        reference.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=reference.shape,
        stride=reference.stride(),
    )


def check(params: Sequence[Tensor], *, second_order: bool, perturbation: str | None) -> bool:
    """Whether ``params`` are DTensors (FSDP2); raise, once and clearly, for what SAM cannot do with them."""
    kinds = {is_dtensor(p) for p in params}
    if len(kinds) > 1:
        raise ValueError(
            "SAM's parameters mix DTensors (FSDP2) and plain tensors: FSDP2 averages the gradients of the former "
            "only, so eps-hat and the update would mix global and per-rank gradients; apply fully_shard to the "
            "root module too, so that every parameter is sharded"
        )
    if kinds != {True}:
        return False
    if second_order:
        raise ValueError(
            "second_order=True is not supported on FSDP2 (DTensor) parameters: FSDP2 reduce-scatters the "
            "gradients outside autograd, so they carry no graph to differentiate"
        )
    if perturbation == "per_replica":
        hsdp = any(p.device_mesh.ndim > 1 and not all(pl.is_shard() for pl in p.placements) for p in params)  # type: ignore[attr-defined]
        if hsdp:
            raise ValueError(
                "perturbation='per_replica' (one eps-hat per HSDP replica group) is not supported: FSDP2's public "
                "API gives no gradient reduced within a replica group only (set_requires_all_reduce(False) keeps it "
                "in private buffers and adds it into the next backward); use perturbation='global'"
            )
        raise ValueError(
            "perturbation='per_replica' is not defined under FSDP: each rank holds only part of w, and FSDP's "
            "gradients come averaged over all ranks, so eps-hat is the global one; use perturbation='global'"
        )
    return True


def fsdp_modules(model: nn.Module | None) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` wrapped (none if FSDP2 was never imported)."""
    cls = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if model is None or cls is None:
        return []
    return [module for module in model.modules() if isinstance(module, cls)]


def reshard(modules: Sequence[nn.Module]) -> None:
    """Free the unsharded parameters FSDP may still hold, so that the next forward all-gathers the current shards.

    With ``reshard_after_backward=False`` FSDP keeps the weights it gathered for the backward, and the next forward
    would use them as they were before SAM moved the shards (to :math:`w + \\hat\\epsilon`, or back to :math:`w`).
    A no-op for a module already sharded; not recursive, hence every module.
    """
    for module in modules:
        module.reshard()  # type: ignore[operator]
