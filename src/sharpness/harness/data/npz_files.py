"""Reading ``<name>.npz`` archives and the same arrays split into ``<name>.part<i>.npz`` files."""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from sharpness.harness.data.catalog import DatasetSpec
from sharpness.harness.data.checks import Split, TrainTest, check_split

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def find_parts(folder: Path, name: str) -> list[Path]:
    """The files ``<name>.part<i>.npz`` in ``folder``, in numeric order of ``i`` (empty when none)."""
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(name)}\.part(\d+)\.npz")
    numbered = []
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            numbered.append((int(match.group(1)), path))
    return [path for _, path in sorted(numbered)]


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not named arrays")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: not a readable .npz archive with keys {', '.join(ARRAY_KEYS)} ({error})") from error


def read_npz(path: Path, spec: DatasetSpec) -> TrainTest:
    """Read one archive holding ``x_train, y_train, x_test, y_test``."""
    arrays = _read_arrays(path)
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise ValueError(
            f"{path}: missing keys {', '.join(missing)}; expected {', '.join(ARRAY_KEYS)}, "
            f"found {', '.join(sorted(arrays)) or 'none'}"
        )
    return TrainTest(
        check_split(path, arrays["x_train"], arrays["y_train"], spec.image_shape, spec.num_classes),
        check_split(path, arrays["x_test"], arrays["y_test"], spec.image_shape, spec.num_classes),
    )


def read_npz_parts(paths: list[Path], spec: DatasetSpec) -> TrainTest:
    """Concatenate part files in the given order; each holds a train range and/or test range.

    Part numbers must run 0, 1, 2, ... without gaps. Optional scalar keys ``train_index_start`` /
    ``train_index_stop`` are checked against the position of the part's training images.
    """
    pattern = re.compile(r".*\.part(\d+)\.npz")
    for expected, path in enumerate(paths):
        match = pattern.fullmatch(path.name)
        if match is None or int(match.group(1)) != expected:
            raise ValueError(
                f"{path}: expected part {expected} here; parts must be numbered 0, 1, 2, ... without gaps "
                f"(found {', '.join(p.name for p in paths)})"
            )
    pieces: dict[str, list[Split]] = {"train": [], "test": []}
    for path in paths:
        arrays = _read_arrays(path)
        held = [split for split in ("train", "test") if f"x_{split}" in arrays or f"y_{split}" in arrays]
        if not held:
            raise ValueError(
                f"{path}: expected x_train/y_train and/or x_test/y_test, found "
                f"{', '.join(sorted(arrays)) or 'no arrays'}"
            )
        for split in held:
            if f"x_{split}" not in arrays or f"y_{split}" not in arrays:
                raise ValueError(f"{path}: expected both x_{split} and y_{split}, found only one of them")
            part = check_split(path, arrays[f"x_{split}"], arrays[f"y_{split}"], spec.image_shape, spec.num_classes)
            if split == "train" and "train_index_start" in arrays:
                start = sum(len(p.labels) for p in pieces["train"])
                stop = start + len(part.labels)
                declared = (int(arrays["train_index_start"]), int(arrays.get("train_index_stop", stop)))
                if declared != (start, stop):
                    raise ValueError(
                        f"{path}: declares training images {declared[0]}:{declared[1]}, but in part order "
                        f"they are {start}:{stop}"
                    )
            pieces[split].append(part)
    for split in ("train", "test"):
        if not pieces[split]:
            raise ValueError(f"parts {', '.join(str(p) for p in paths)}: no part holds x_{split}/y_{split}")
    return TrainTest(*(_concatenate(pieces[split]) for split in ("train", "test")))


def _concatenate(parts: list[Split]) -> Split:
    if len(parts) == 1:
        return parts[0]
    return Split(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
    )
