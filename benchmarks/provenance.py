"""Where a benchmark's figures come from: date, versions, and the commit of the code they measured.

Shared by the benchmark scripts (``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
COMMIT_VARIABLE = "SHARPNESS_SOURCE_COMMIT"
"""Names the commit where the tree has no ``.git`` (a copy sent to a GPU machine)."""


def source_state() -> dict[str, Any]:
    """The library's commit, its uncommitted files under ``src``, and a hash of the ``src`` tree itself.

    Call it before the runs: the code they import is the code of that moment. ``src_sha256`` ties the figures to
    the code also where git cannot (a copy sent to a GPU machine has no ``.git``): the commit is then
    ``$SHARPNESS_SOURCE_COMMIT`` if set, and the modified files are unknown (``None``). A checkout only counts if
    ``ROOT`` is its top level, so a copy inside another repository does not take that repository's commit.
    """
    state: dict[str, Any] = {"commit": None, "modified_src_files": None, "src_sha256": tree_hash(ROOT / "src")}
    git = ["git", "-C", str(ROOT)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == ROOT.resolve():
            commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=10
            )
            if commit.returncode == 0 and dirty.returncode == 0:
                state["commit"] = commit.stdout.strip() or None
                state["modified_src_files"] = [line[3:] for line in dirty.stdout.split("\n") if line.strip()]
                return state
    except (OSError, subprocess.SubprocessError):
        pass
    state["commit"] = os.environ.get(COMMIT_VARIABLE) or None
    return state


def tree_hash(folder: Path) -> str | None:
    """SHA-256 over the relative paths and contents of the ``.py`` and ``.yaml`` files below ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_info(benchmark: str) -> dict[str, Any]:
    """The fields every benchmark's JSON starts with."""
    return {
        "benchmark": benchmark,
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "source": source_state(),
    }
