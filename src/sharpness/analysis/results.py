"""Saving and loading analysis results (plain dicts of floats, lists and strings) as JSON or NPZ.

In an NPZ file every numeric list (at any depth of nesting, keys joined with ``/``) becomes an
array, and everything else (scalars, strings, ``None``) is kept as one JSON string under
``__meta__``; :func:`load_result` rebuilds the dict, arrays back to lists.

JSON is written strictly (RFC 8259 has no NaN or infinity): a non-finite float, e.g. the loss of
a diverged landscape point, is written as ``null`` and reads back as ``None``. In NPZ arrays it
stays a float NaN / infinity; outside arrays it becomes ``None`` as in JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["save_result", "load_result", "finite_or_none"]

_META = "__meta__"


def finite_or_none(x: Any) -> Any:
    """``x`` with every non-finite float (at any depth of dicts, lists, tuples) replaced by ``None``."""
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite_or_none(v) for v in x]
    return x


def _is_numeric_list(x: Any) -> bool:
    if not isinstance(x, list | tuple) or len(x) == 0:
        return False
    try:
        arr = np.asarray(x)
    except ValueError:
        return False
    return arr.dtype.kind in "biuf"


def _flatten(d: dict, prefix: str, arrays: dict, meta: dict) -> None:
    for key, value in d.items():
        if "/" in str(key):
            raise ValueError(f"key {key!r} contains '/', which NPZ nesting uses")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            meta.setdefault("__dicts__", []).append(name)
            _flatten(value, name + "/", arrays, meta)
        elif _is_numeric_list(value):
            arrays[name] = np.asarray(value)
        else:
            meta[name] = value


def save_result(result: dict, path: str | Path) -> Path:
    """Write ``result`` to ``path``: JSON for ``.json``, NumPy archive for ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(finite_or_none(result), indent=1, allow_nan=False))
    elif path.suffix == ".npz":
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        _flatten(result, "", arrays, meta)
        np.savez(path, **arrays, **{_META: np.array(json.dumps(finite_or_none(meta), allow_nan=False))})
    else:
        raise ValueError(f"unknown result format {path.suffix!r}: use .json or .npz")
    return path


def load_result(path: str | Path) -> dict:
    """Read a result written by :func:`save_result`."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix != ".npz":
        raise ValueError(f"unknown result format {path.suffix!r}: use .json or .npz")
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f[_META]))
        flat = {k: f[k].tolist() for k in f.files if k != _META}
    out: dict = {}
    for name in meta.pop("__dicts__", []):
        _insert(out, name, {})
    for name, value in [*meta.items(), *flat.items()]:
        _insert(out, name, value)
    return out


def _insert(out: dict, name: str, value: Any) -> None:
    *parents, leaf = name.split("/")
    for p in parents:
        out = out.setdefault(p, {})
    if isinstance(value, dict):
        out.setdefault(leaf, {})
    else:
        out[leaf] = value
