"""Two CPU processes, gloo on 127.0.0.1, for the data-parallel tests.

A test module runs all its scenarios in one pair of processes (:func:`run_once`): starting two interpreters
that import torch costs seconds, the scenarios themselves milliseconds. The workers return plain results (numbers,
messages), and the tests assert on them. Under pytest-xdist the pair runs once per session, not once per worker.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, fn: Callable[[int], Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank), f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[[int], Any], out: Path) -> list[Any]:
    """``fn(rank)`` on each of 2 processes (a module-level function); its results, by rank."""
    mp.spawn(_entry, args=(free_port(), fn, str(out)), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.rank{rank}", weights_only=False) for rank in range(WORLD)]


def run_once(name: str, fn: Callable[[int], Any], tmp_path_factory: Any) -> list[Any]:
    """:func:`spawn` ``fn`` once per test session, sharing its results among the xdist workers."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's directory
    done = shared / f"{name}.results"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            torch.save(spawn(fn, shared / name), done)
        return torch.load(done, weights_only=False)


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Records each read of a tensor's value by the host (``item``, ``bool``, ...): on CUDA each is a
    synchronisation, so a step without any runs ahead of the device. (A proxy on CPU: it sees the Python calls.)"""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    reads: list[str] = []

    def recording(name: str) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return saved[name](self, *args, **kwargs)

        return read

    for name in names:
        setattr(torch.Tensor, name, recording(name))
    try:
        yield reads
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
