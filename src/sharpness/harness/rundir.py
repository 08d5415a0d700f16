"""A run's directory: what it holds, and the only code that writes it.

``config.yaml`` (resolved; written last when a run starts, so its presence marks a started run), a bootstrap
run's ``train_labels.npy``, ``metrics.jsonl`` (one line per epoch, flushed), ``checkpoint.pt`` (atomic),
``summary.json``, ``model.pt`` and ``curves.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sharpness.harness.checkpoint import append_jsonl, atomic_write_bytes, load_checkpoint, save_checkpoint, write_json
from sharpness.harness.config import TrainConfig

__all__ = ["RunDir", "RunDirExists", "MAY_CHANGE"]

# Keys a resumed run may change: where the data and the computation are, not what is computed.
MAY_CHANGE = frozenset({"device", "data_dir", "cudnn_benchmark"})


class RunDirExists(FileExistsError):
    """The run directory already holds a run and neither resuming nor a new directory was asked for."""


class RunDir:
    """The files of one run in ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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
        if resume:
            raise FileNotFoundError(f"--resume: {self.path} holds no run (no config.yaml)")
        if self.path.exists() and any(self.path.iterdir()):
            raise RunDirExists(
                f"run directory {self.path} is not empty; pass --resume to continue it, or choose another --out"
            )
        return False

    def open(self, config: TrainConfig, train_labels: np.ndarray | None = None) -> None:
        """Write what a run starts from: ``config.yaml`` and a bootstrap run's ``train_labels.npy``, atomically."""
        if self.config_file.is_file():  # resumed, but killed before its first checkpoint
            self.metrics_file.unlink(missing_ok=True)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if train_labels is not None:
            atomic_write_bytes(self.path / "train_labels.npy", lambda f: np.save(f, train_labels))
        text = yaml.safe_dump(config.to_dict(), sort_keys=False).encode()
        atomic_write_bytes(self.config_file, lambda f: f.write(text))  # last: its presence marks a started run

    def finished_summary(self, config: TrainConfig, resume: bool) -> dict[str, Any] | None:
        """The summary of a finished run being resumed (after checking its config), else None."""
        if not (resume and self.summary_file.is_file()):
            return None
        self.check(config, resume=True)
        return json.loads(self.summary_file.read_text())

    # ------------------------------------------------------------------ during a run
    def load_checkpoint(self) -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_file)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.checkpoint_file, state)

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_file, record)

    def metrics(self) -> list[dict[str, Any]]:
        """The epochs' metric lines, in order."""
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines of epochs the checkpoint does not cover (a kill between the two writes)."""
        if not self.metrics_file.exists():
            return
        kept = [
            line
            for line in self.metrics_file.read_text().splitlines()
            if line and json.loads(line)["epoch"] <= last_epoch
        ]
        self.metrics_file.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ at the end
    def finish(self, summary: dict[str, Any], model_state: dict[str, Any]) -> None:
        """Write ``model.pt``, then ``summary.json`` (which marks the run finished), then ``curves.png``."""
        atomic_write_bytes(self.path / "model.pt", lambda f: torch.save(model_state, f))
        write_json(self.summary_file, summary)
        try:
            from sharpness.harness.report import plot_curves

            plot_curves(self.path)
        except Exception as exc:  # a plot must never lose a finished run
            print(f"warning: could not plot curves for {self.path}: {exc}", file=sys.stderr)
