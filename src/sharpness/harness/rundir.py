"""A run's directory: what it holds, and the only code that writes it.

``config.yaml`` (resolved; written last when a run starts, so its presence marks a started run), a bootstrap
run's ``train_labels.npy``, ``metrics.jsonl`` (one line per epoch, flushed), ``checkpoint.pt`` (atomic),
``summary.json``, ``model.pt`` and ``curves.png``; while a process owns the run, ``.lock`` (an OS file lock, see
:meth:`RunDir.lock`). The temporary files of atomic writes (``.<name>.<random>.tmp``) and the lock file never
count as a run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sharpness.harness.checkpoint import (
    append_jsonl,
    atomic_write_bytes,
    is_temporary,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from sharpness.harness.config import TrainConfig

__all__ = ["RunDir", "RunDirExists", "RunDirBusy", "RunDirError", "MAY_CHANGE", "LOCK_NAME", "describe_os_error"]

# Keys a resumed run may change: where the data and the computation are, not what is computed.
MAY_CHANGE = frozenset({"device", "data_dir", "cudnn_benchmark", "loader_workers"})
LOCK_NAME = ".lock"

# What to do about a failed file operation, by errno.
_ADVICE = {
    errno.ENOSPC: "free some space there, then run the command again (train: with --resume)",
    errno.EDQUOT: "free some of your quota, then run the command again (train: with --resume)",
    errno.EACCES: "choose a directory you may write (--out), or fix its permissions",
    errno.EPERM: "choose a directory you may write (--out), or fix its permissions",
    errno.EROFS: "choose a directory on a writable file system (--out)",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another --out",
    errno.EEXIST: "a part of that path is a file, not a folder: choose another --out",
}

_held: dict[Path, int] = {}  # run directories this process holds the lock of, with their nesting depth


class RunDirExists(FileExistsError):
    """The run directory already holds a run and neither resuming nor a new directory was asked for."""


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class RunDirError(OSError):
    """A file operation on a run directory failed; the message says what, where, and what to do."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def describe_os_error(exc: OSError, action: str, where: str | Path | None = None) -> str:
    """One line: ``action`` (``"write"``), the file (the error's, else ``where``), the system's reason, and the
    remedy for its errno."""
    where = f" {exc.filename or where}" if exc.filename or where else ""
    reason = exc.strerror or str(exc)
    advice = _ADVICE.get(exc.errno or 0, "check the path, then run the command again")
    return f"could not {action}{where}: {reason}; {advice}"


@contextlib.contextmanager
def _io(action: str, where: Path | None = None) -> Iterator[None]:
    """Turn an OSError of the block into a :class:`RunDirError` naming ``action``, the file (the error's, else
    ``where``) and the remedy."""
    try:
        yield
    except RunDirError:
        raise
    except OSError as exc:
        raise RunDirError(describe_os_error(exc, action, where), exc.errno) from exc


def _holder() -> bytes:
    """Who holds a lock: this process's pid, host, command and start time, as JSON."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
    me["since"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return (json.dumps(me) + "\n").encode()


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']}; since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunDir:
    """The files of one run in ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._created: list[Path] = []  # folders that lock() made, removed again if the run left them empty

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def curves_file(self) -> Path:
        return self.path / "curves.png"

    # ------------------------------------------------------------------ ownership
    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Own the directory for the block: an exclusive ``flock`` on ``.lock`` (made with the directory if missing).

        Another process holding it raises :class:`RunDirBusy` naming that process (its pid, host and command are
        in the lock file), before anything is written. The OS drops the lock when its holder dies, ``kill -9``
        included. Once owned, the temporary files that killed writers left are deleted. Re-entrant within a
        process; on release the lock file goes, and so does a directory the lock made if nothing else is in it.
        """
        key = self.path.absolute()
        if key in _held:
            _held[key] += 1
            try:
                yield self
            finally:
                _held[key] -= 1
            return
        with _io("create the run directory"):
            self._created = [p for p in (self.path, *self.path.parents) if not p.exists()][::-1]
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = self._take_lock()
        except BaseException:
            self._remove_created()
            raise
        _held[key] = 1
        try:
            self.clean_temporary()
            yield self
        finally:
            del _held[key]
            self._release(fd)

    def _take_lock(self) -> int:
        """The locked descriptor of ``.lock``, holding this process's description."""
        while True:
            with _io("open the lock file"):
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(fd)
                os.close(fd)
                raise RunDirBusy(
                    f"{self.path} is in use by {holder}; wait for it to end or stop it, or choose another --out"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if self._is_lock_file(fd):  # not a file that its previous holder unlinked after we opened it
                break
            os.close(fd)
        with _io("write the lock file"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder(), 0)
        return fd

    def _is_lock_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
        except FileNotFoundError:
            return False

    def _release(self, fd: int) -> None:
        try:
            if self._is_lock_file(fd):
                self.lock_file.unlink()
        finally:
            os.close(fd)
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                folder.rmdir()
        self._created = []

    def clean_temporary(self) -> list[Path]:
        """Delete the temporary files of atomic writes that a killed writer left (call only while owning the run)."""
        stale = [p for p in self.path.iterdir() if is_temporary(p.name)] if self.path.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def holds_files(self) -> bool:
        """Whether the directory holds anything but the lock and temporary files."""
        if not self.path.is_dir():
            return False
        return any(p.name != LOCK_NAME and not is_temporary(p.name) for p in self.path.iterdir())

    # ------------------------------------------------------------------ before a run
    def check(self, config: TrainConfig, resume: bool) -> bool:
        """Check that ``config`` may run here, writing nothing; True when there is a checkpoint to continue from."""
        if resume and self.config_file.is_file():
            saved = yaml.safe_load(self.config_file.read_text())
            mine, defaults = config.to_dict(), TrainConfig().to_dict()  # keys added since the run started
            diff = sorted(
                k
                for k in saved.keys() | mine.keys()
                if k not in MAY_CHANGE and saved.get(k, defaults.get(k)) != mine.get(k)
            )
            if diff:
                raise ValueError(
                    f"{self.path} holds a run of another config (its config.yaml differs in {', '.join(diff)}); "
                    "continue it with the same config, or choose another --out"
                )
            return self.checkpoint_file.is_file()
        if resume and (self.holds_files() or not self.path.is_dir() or self.path in self._created):
            raise FileNotFoundError(f"--resume: {self.path} holds no run (no config.yaml)")
        if self.holds_files():  # (a directory with nothing of a run: killed before its config.yaml landed)
            raise RunDirExists(
                f"run directory {self.path} is not empty; pass --resume to continue it, or choose another --out"
            )
        return False

    def open(self, config: TrainConfig, train_labels: np.ndarray | None = None) -> None:
        """Write what a run starts from: ``config.yaml`` and a bootstrap run's ``train_labels.npy``, atomically."""
        if self.config_file.is_file():  # resumed, but killed before its first checkpoint
            self.metrics_file.unlink(missing_ok=True)
            return
        labels_file = self.path / "train_labels.npy"
        text = yaml.safe_dump(config.to_dict(), sort_keys=False).encode()
        try:
            with _io("write", self.path):
                self.path.mkdir(parents=True, exist_ok=True)
                if train_labels is not None:
                    atomic_write_bytes(labels_file, lambda f: np.save(f, train_labels))
                atomic_write_bytes(self.config_file, lambda f: f.write(text))  # last: its presence marks a started run
        except RunDirError:
            labels_file.unlink(missing_ok=True)  # a start that did not land leaves nothing
            raise

    def finished_summary(self, config: TrainConfig, resume: bool) -> dict[str, Any] | None:
        """The summary of a finished run being resumed (after checking its config), else None."""
        if not (resume and self.summary_file.is_file()):
            return None
        self.check(config, resume=True)
        summary = json.loads(self.summary_file.read_text())
        if not self.curves_file.is_file():  # killed between summary.json and the plot
            self._plot()
        return summary

    # ------------------------------------------------------------------ during a run
    def load_checkpoint(self) -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_file)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        with _io("write", self.checkpoint_file):
            save_checkpoint(self.checkpoint_file, state)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with _io("write", self.metrics_file):
            append_jsonl(self.metrics_file, record)

    def metrics(self) -> list[dict[str, Any]]:
        """The epochs' metric lines, in order."""
        return [record for _, record in self._metric_lines(drop_torn=False)]

    def _metric_lines(self, drop_torn: bool) -> list[tuple[str, dict[str, Any]]]:
        """``metrics.jsonl``'s lines and their records; with ``drop_torn`` an unreadable last line is left out.

        Only the last line can be torn (a power cut between its write and its fsync); it belongs to an epoch
        that no checkpoint holds. An unreadable line before it is damage, reported with its file and line.
        """
        lines = [(n, line) for n, line in enumerate(self.metrics_file.read_text(errors="replace").split("\n"), 1)]
        lines = [(n, line) for n, line in lines if line.strip()]
        out = []
        for k, (n, line) in enumerate(lines):
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError as exc:
                if drop_torn and k == len(lines) - 1:
                    break
                raise ValueError(
                    f"{self.metrics_file}, line {n}: not a JSON record ({exc.msg}); the file is damaged: restore "
                    "it, or start the run again in another --out"
                ) from None
        return out

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines of epochs the checkpoint does not cover (a kill between the two writes, or a torn
        last line)."""
        if not self.metrics_file.exists():
            return
        lines = self._metric_lines(drop_torn=True)
        kept = "".join(line + "\n" for line, record in lines if record["epoch"] <= last_epoch).encode()
        if kept != self.metrics_file.read_bytes():
            with _io("write", self.metrics_file):
                atomic_write_bytes(self.metrics_file, lambda f: f.write(kept))

    # ------------------------------------------------------------------ at the end
    def finish(self, summary: dict[str, Any], model_state: dict[str, Any]) -> None:
        """Write ``model.pt``, then ``summary.json`` (which marks the run finished), then ``curves.png``."""
        with _io("write", self.path / "model.pt"):
            atomic_write_bytes(self.path / "model.pt", lambda f: torch.save(model_state, f))
        with _io("write", self.summary_file):
            write_json(self.summary_file, summary)
        self._plot()

    def _plot(self) -> None:
        try:
            from sharpness.harness.report import plot_curves

            plot_curves(self.path)
        except Exception as exc:  # a plot must never lose a finished run
            print(f"warning: could not plot curves for {self.path}: {exc}", file=sys.stderr)
