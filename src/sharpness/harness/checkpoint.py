"""Checkpoints that survive a crash at any instant: temporary file, fsync, atomic rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "append_jsonl",
    "write_json",
    "is_temporary",
    "TEMP_SUFFIX",
]

TEMP_SUFFIX = ".tmp"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write_bytes` (``.<target>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write: Any) -> Path:
    """Write a file so that readers see the old content or the new one, never a torn one.

    ``write`` is called with a binary file object. The data is fsync'ed before the rename and the folder
    after it, so a power cut or ``kill -9`` leaves either the previous file or the complete new one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint holds tensors and plain containers, never code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: not a readable checkpoint ({_load_problem(exc)}); it is damaged or was not written by "
            "sharpness: start the run again in another --out"
        ) from exc


def _load_problem(exc: Exception) -> str:
    """What ``torch.load`` found wrong, in one line, without its advice to load with ``weights_only=False``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    plain = [line for line in lines if "weights_only" not in line]
    return (plain or [type(exc).__name__])[0].rstrip(".")


def write_json(path: str | Path, obj: Any) -> Path:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write_bytes(path, lambda f: f.write(data))


def append_jsonl(path: str | Path, obj: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so a killed run keeps every finished epoch's line.

    A failed write (a full disk) cuts the file back to its previous length; only a power cut can leave a torn
    last line, which :meth:`sharpness.harness.rundir.RunDir.truncate_metrics` drops on resume.
    """
    data = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
