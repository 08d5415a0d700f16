"""Data-parallel training under ``torchrun``: the process group, the model's wrapper, rank 0's run directory.

Everything here is PyTorch's own engine (``torch.distributed``, DDP, FSDP2's ``fully_shard``); docs/distributed.md
gives the semantics. In short:

- :func:`join` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and joins its process
  group: ``nccl`` with one GPU per rank (``cuda:LOCAL_RANK``), ``gloo`` on CPU. Without torchrun, or with one
  process, nothing is initialised and a run is exactly a single-process run.
- ``batch_size`` is the global batch: each rank trains on its ``batch_size / world_size`` examples of it.
- :class:`SharedRunDir` lets rank 0 alone read and write the run directory; the other ranks receive what it read
  and wait for what it wrote, and an error on rank 0 (a run directory that is not empty, ...) is raised on every
  rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sharpness.harness.build import resolve_device
from sharpness.harness.config import ConfigError, TrainConfig
from sharpness.harness.rundir import RunDir

__all__ = [
    "World",
    "join",
    "check_config",
    "wrap_model",
    "no_sync",
    "on_main",
    "broadcast",
    "gather",
    "sum_over_ranks",
    "is_main_process",
    "load_model_file",
    "any_rank",
    "reduce_counters",
    "broadcast_buffers",
    "model_state",
    "load_model_state",
    "optimizer_state",
    "rank_optimizer_state",
    "load_rank_optimizer_state",
    "portable",
    "restored",
    "SharedRunDir",
    "LOCAL_OPTIMIZER_STATE",
]

#: Methods whose optimizer state differs between the ranks under ``per_replica``, so that each rank's is
#: checkpointed: FriendlySAM's and VaSSO's moving averages of each rank's own clean gradient, and the random
#: direction's generators (seeded per device, so per GPU).
LOCAL_OPTIMIZER_STATE = frozenset({"fsam", "vasso", "random"})

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: its rank among ``size`` processes and the device it trains on."""

    device: torch.device
    rank: int = 0
    size: int = 1
    backend: str | None = None
    flags: Any = None  # the process group of host-side flags (gloo; None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


_FLAGS_GROUP: list[Any] = []  # created once per process, by every rank in the same order


def join(device: str) -> World:
    """The :class:`World` of this process, joining torchrun's process group on first use.

    ``device`` is the config's: ``auto`` or ``cuda`` give each rank ``cuda:LOCAL_RANK`` (NCCL), ``cpu`` gives
    gloo; a numbered ``cuda:N`` is refused under torchrun (each rank's GPU is its local rank's).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index is not None:
            raise ConfigError(
                f"device {device} under torchrun: each rank uses cuda:LOCAL_RANK; set device to cuda or auto"
            )
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        placed = torch.device("cuda", local_rank)
        torch.cuda.set_device(placed)
    elif kind == "cpu":
        placed = torch.device("cpu")
    else:
        raise ConfigError(f"device {device} under torchrun: data-parallel runs use cuda (nccl) or cpu (gloo)")
    backend = "nccl" if kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=placed if kind == "cuda" else None)
        atexit.register(_leave)
    elif dist.get_world_size() != size or dist.get_backend() != backend:
        raise RuntimeError(
            f"the process group ({dist.get_world_size()} ranks, {dist.get_backend()}) is not torchrun's "
            f"({size} ranks, {backend} for device {device})"
        )
    if not _FLAGS_GROUP:
        # NCCL's collectives run on the GPU: the stop flag is agreed over gloo instead, without a device sync.
        _FLAGS_GROUP.append(dist.new_group(backend="gloo") if backend == "nccl" else None)
    return World(placed, rank, size, backend, _FLAGS_GROUP[0])


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_config(config: TrainConfig, world: World) -> None:
    """What a config needs of the world size: one line naming the key to change."""
    if not world.parallel:
        return
    if config.batch_size % world.size:
        raise ConfigError(
            f"batch_size ({config.batch_size}) is the global batch and must divide by the {world.size} ranks"
        )
    local = config.batch_size // world.size
    if config.m_sharpness is not None and local % config.m_sharpness:
        raise ConfigError(
            f"m_sharpness ({config.m_sharpness}) must divide each rank's batch ({config.batch_size} / {world.size} "
            f"= {local})"
        )
    if config.second_order:
        raise ConfigError("second_order does not run data-parallel (its third pass differentiates the gradient)")


# ---------------------------------------------------------------------------------------------------- the model
def wrap_model(model: nn.Module, world: World, config: TrainConfig) -> nn.Module:
    """The module the training step calls: ``model`` itself on one process, else its DDP wrapper, or ``model``
    sharded in place by ``fully_shard`` (each child holding parameters, then the root)."""
    if not world.parallel:
        return model
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # One-channel convolutions (digits, MNIST) get weight gradients in another but equivalent stride order; DDP
    # copies them into its buckets, which is correct, and says so once per process.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    # ESAM's SWP freezes some parameters in the clean pass, which global mode all-reduces.
    unused = config.method == "esam" and config.perturbation == "global"
    return DistributedDataParallel(
        model, device_ids=[world.device.index] if world.device.type == "cuda" else None, find_unused_parameters=unused
    )


def no_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """``module.no_sync()`` when ``enabled`` and ``module`` is a DDP wrapper: a pass whose gradient stays local."""
    if enabled and hasattr(module, "no_sync") and hasattr(module, "require_backward_grad_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def _fsdp(model: nn.Module) -> bool:
    """Whether ``fully_shard`` sharded ``model`` (called on data-parallel ranks only: the import costs time)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_state(model: nn.Module, world: World) -> dict[str, Tensor]:
    """The full (unsharded) state dict of ``model``; under FSDP gathered on every rank's call, held by rank 0."""
    if world.parallel and _fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def load_model_state(model: nn.Module, state: dict[str, Tensor] | None, world: World) -> None:
    """Load a full state dict into ``model``: under FSDP rank 0's (None on the others), broadcast and sharded;
    otherwise every rank's own ``state``."""
    if world.parallel and _fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, state if world.is_main else {}, options=options)
        return
    model.load_state_dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any] | None:
    """The optimizer's state dict for the checkpoint's top level; None under FSDP, where each rank's shards go
    into its own entry (:func:`rank_optimizer_state`)."""
    if world.parallel and _fsdp(model):
        return None
    return optimizer.state_dict()


def rank_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, world: World, config: TrainConfig, per_replica: bool
) -> dict[str, Any] | None:
    """What this rank's entry of a checkpoint holds of the optimizer: under FSDP every rank's shards (as plain local
    tensors, :func:`portable`); under ``per_replica`` the state of :data:`LOCAL_OPTIMIZER_STATE`'s methods on the
    ranks other than 0 (whose state is the checkpoint's top-level one); otherwise nothing."""
    if _fsdp(model):
        return portable(optimizer.state_dict())
    if world.rank and per_replica and config.method in LOCAL_OPTIMIZER_STATE:
        return portable(optimizer.state_dict())
    return None


def load_rank_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load :func:`rank_optimizer_state`'s output on the rank that saved it."""
    param = next(model.parameters())
    optimizer.load_state_dict(restored(saved, getattr(param, "device_mesh", None), param.device))


def load_model_file(model: nn.Module, path: str | Path, world: World) -> None:
    """Load a ``model.pt`` (a full state dict) that rank 0 reads into every rank's ``model``."""
    device = next(model.parameters()).device
    if not world.parallel:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return
    held: dict[str, Any] = {}
    main_only = _fsdp(model)

    def read() -> dict[str, Tensor] | None:
        held.update(torch.load(path, map_location="cpu", weights_only=True))
        return None if main_only else held

    state = on_main(read, world)
    load_model_state(model, held if main_only else state, world)


def _dtensor_type() -> type | None:
    """DTensor's class if its module is loaded (it is once anything was sharded), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def portable(obj: Any) -> Any:
    """``obj`` (nested dicts, lists and tuples) with every tensor copied to the CPU and every DTensor replaced by its
    local shard and how it was sharded (plain data: a checkpoint loads with ``weights_only=True``)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(obj, dtensor):
        placements = []
        for placement in obj.placements:
            if placement.is_shard():
                placements.append(("shard", placement.dim))
            elif placement.is_replicate():
                placements.append(("replicate",))
            else:
                raise ValueError(f"cannot checkpoint a DTensor placed {placement}")
        local = obj.to_local().detach().cpu()
        return {_DTENSOR: local, "placements": placements, "shape": list(obj.shape), "stride": list(obj.stride())}
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(portable(v) for v in obj)
    return obj


_DTENSOR = "dtensor_local_shard"


def restored(obj: Any, mesh: Any, device: torch.device) -> Any:
    """The inverse of :func:`portable` on the rank that saved ``obj``: local shards become DTensors on ``mesh``."""
    if isinstance(obj, dict) and _DTENSOR in obj:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        placements = [Shard(p[1]) if p[0] == "shard" else Replicate() for p in obj["placements"]]
        local = obj[_DTENSOR].to(device)
        shape, stride = torch.Size(obj["shape"]), tuple(obj["stride"])
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
    if isinstance(obj, dict):
        return {k: restored(v, mesh, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(restored(v, mesh, device) for v in obj)
    return obj


@torch.no_grad()
def broadcast_buffers(model: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm's statistics, which each rank updates from its own batch)."""
    if world.parallel:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


# ---------------------------------------------------------------------------------------------------- collectives
def broadcast(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not world.parallel:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_object_device(world))
    return box[0]  # type: ignore[return-value]


def gather(obj: Any, world: World) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
    if not world.parallel:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _object_device(world: World) -> torch.device | None:
    return world.device if world.backend == "nccl" else None


def on_main(fn: Callable[[], T], world: World) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception it raises is raised on every
    rank (so that all stop with rank 0's one-line error). The broadcast is also the other ranks' barrier."""
    if not world.parallel:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if world.is_main:
        try:
            result = fn()
        except Exception as exc:  # sent to the others, then raised here too
            error = exc
    payload = broadcast((result, _picklable(error)), world)
    if error is not None:
        raise error
    if payload[1] is not None:
        raise payload[1]
    return payload[0]


def _picklable(error: BaseException | None) -> BaseException | None:
    """``error``, or a RuntimeError with its message if it does not pickle."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")
    return error


def sum_over_ranks(tensors: list[Tensor], world: World) -> None:
    """All-reduce (sum) ``tensors`` in place over the ranks."""
    if world.parallel:
        for t in tensors:
            dist.all_reduce(t)


def is_main_process() -> bool:
    """Whether this process is rank 0 of torchrun's job (or not under torchrun): the one that prints reports."""
    return int(os.environ.get("RANK", "0")) == 0


def any_rank(flag: bool, world: World) -> bool:
    """Whether ``flag`` is set on any rank: one all-reduce of one host integer (over gloo, no device sync)."""
    if not world.parallel:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=world.flags)
    return bool(value.item())


def reduce_counters(acc: dict[str, Tensor], world: World) -> dict[str, Tensor]:
    """An epoch's counters over all ranks: losses, correct predictions and examples summed; skipped steps and
    passes per step (the same on every rank) checked to agree, so that every rank takes the same decision."""
    if not world.parallel:
        return acc
    out = {k: v.clone() for k, v in acc.items()}
    summed = torch.stack([out["loss"].double(), out["correct"].double(), out["count"].double()])
    dist.all_reduce(summed)
    agreed = torch.stack([out["skipped"], -out["skipped"], out["passes"], -out["passes"]])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    skipped_max, skipped_min, passes_max, passes_min = agreed.tolist()
    if (skipped_max, passes_max) != (-skipped_min, -passes_min):
        raise RuntimeError(
            f"the ranks disagree on this epoch's skipped steps ({-skipped_min} to {skipped_max}) or passes "
            f"({-passes_min} to {passes_max}): their weights have diverged"
        )
    out["loss"] = summed[0]
    out["correct"], out["count"] = summed[1].long(), summed[2].long()
    return out


# ---------------------------------------------------------------------------------------------------- run directory
class SharedRunDir:
    """A :class:`RunDir` that rank 0 alone reads and writes (on one process: the RunDir itself).

    Each call runs on rank 0 and hands its result (or its exception) to every rank. ``main_only`` names
    checkpoint entries that only rank 0 receives (FSDP's full model state dict, which it broadcasts tensor by tensor).
    """

    def __init__(self, files: RunDir, world: World, main_only: tuple[str, ...] = ()) -> None:
        self.files = files
        self.world = world
        self.main_only = main_only

    @property
    def path(self) -> Path:
        return self.files.path

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.files, name)
        if callable(value):
            raise AttributeError(f"RunDir.{name} is not shared between ranks; add it to SharedRunDir")
        return value

    def _main(self, fn: Callable[[], T]) -> T:
        return on_main(fn, self.world)

    @contextlib.contextmanager
    def lock(self) -> Iterator[SharedRunDir]:
        """Rank 0 holds the directory's lock for the block, where :class:`RunDir` has one; if it cannot, every rank
        raises its error."""
        with contextlib.ExitStack() as held:
            if hasattr(self.files, "lock"):

                def take() -> None:
                    held.enter_context(self.files.lock())

                self._main(take)
            yield self

    def check(self, config: TrainConfig, resume: bool) -> bool:
        return self._main(lambda: self.files.check(config, resume))

    def open(self, config: TrainConfig, train_labels: Any = None) -> None:
        self._main(lambda: self.files.open(config, train_labels))

    def finished_summary(self, config: TrainConfig, resume: bool) -> dict[str, Any] | None:
        return self._main(lambda: self.files.finished_summary(config, resume))

    def load_checkpoint(self) -> dict[str, Any]:
        full: dict[str, Any] = {}

        def read() -> dict[str, Any]:
            full.update(self.files.load_checkpoint())
            return {k: v for k, v in full.items() if k not in self.main_only}

        state = self._main(read)
        return {**state, **{k: full[k] for k in self.main_only if k in full}} if self.world.is_main else state

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self._main(lambda: self.files.save_checkpoint(state))

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._main(lambda: self.files.append_metrics(record))

    def metrics(self) -> list[dict[str, Any]]:
        return self._main(self.files.metrics)

    def truncate_metrics(self, last_epoch: int) -> None:
        self._main(lambda: self.files.truncate_metrics(last_epoch))

    def finish(self, summary: dict[str, Any], model_state: dict[str, Any]) -> None:
        self._main(lambda: self.files.finish(summary, model_state))


def shared_run_dir(path: str | Path, world: World, config: TrainConfig) -> RunDir | SharedRunDir:
    """The run directory at ``path`` as this rank sees it."""
    files = RunDir(path)
    if not world.parallel:
        return files
    return SharedRunDir(files, world, ("model",) if config.distributed == "fsdp" else ())
