"""Where data files live: the ``--data-dir`` argument, else ``$SHARPNESS_DATA_DIR``, else a user cache."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "SHARPNESS_DATA_DIR"


def default_data_dir() -> Path:
    """``~/.cache/sharpness/data``."""
    return Path.home() / ".cache" / "sharpness" / "data"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The folder to search: ``data_dir`` when given, else ``$SHARPNESS_DATA_DIR`` when set and non-empty,
    else :func:`default_data_dir`. ``~`` is expanded; the folder need not exist.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    return default_data_dir()
