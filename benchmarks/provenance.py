"""Where a benchmark's figures come from: date, versions, and the commit of the code they measured.

Shared by the benchmark scripts (``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import datetime as dt
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
    """The library's commit and its uncommitted files under ``src`` (read-only git).

    Call it before the runs: the code they import is the code of that moment. Without git (or outside
    a checkout) the commit is ``$SHARPNESS_SOURCE_COMMIT`` if set, and the modified files are unknown (``None``).
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    if commit is None or commit.returncode != 0 or dirty is None or dirty.returncode != 0:
        return {"commit": os.environ.get(COMMIT_VARIABLE) or None, "modified_src_files": None}
    modified = [line[3:] for line in dirty.stdout.split("\n") if line.strip()]
    return {"commit": commit.stdout.strip() or None, "modified_src_files": modified}


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
