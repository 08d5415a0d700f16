"""Reading MNIST-style idx files (``train-images-idx3-ubyte`` etc.), gzip-compressed or raw."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from sharpness.harness.data.catalog import DatasetSpec
from sharpness.harness.data.checks import Split, TrainTest, check_split

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# Stems of the four files; the original releases also use a dot before "idx" inside their archives.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _variants(stem: str) -> list[str]:
    dotted = stem.replace("-idx", ".idx")
    return [f"{stem}.gz", stem, f"{dotted}.gz", dotted]


def find_idx_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The idx files present in ``folder`` (key -> path) and the stems of those missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, stem in IDX_FILES.items():
        path = next((folder / name for name in _variants(stem) if (folder / name).is_file()), None)
        if path is None:
            missing.append(stem)
        else:
            found[key] = path
    return found, missing


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: truncated or corrupt gzip data ({error})") from error


def read_idx_images(path: Path) -> np.ndarray:
    """Images ``(N, rows, cols)`` uint8 from an idx3 file (magic 2051)."""
    data = _read_bytes(path)
    if len(data) < 16:
        raise ValueError(f"{path}: expected a 16-byte idx3 header, got {len(data)} bytes in all")
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IMAGES_MAGIC:
        raise ValueError(f"{path}: expected idx3 image magic number {IMAGES_MAGIC}, got {magic}")
    expected = count * rows * cols
    if len(data) - 16 != expected:
        raise ValueError(
            f"{path}: expected {count} images of {rows}x{cols} bytes ({expected} bytes after the header), "
            f"got {len(data) - 16} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols).copy()


def read_idx_labels(path: Path) -> np.ndarray:
    """Labels ``(N,)`` uint8 from an idx1 file (magic 2049)."""
    data = _read_bytes(path)
    if len(data) < 8:
        raise ValueError(f"{path}: expected an 8-byte idx1 header, got {len(data)} bytes in all")
    magic, count = struct.unpack(">II", data[:8])
    if magic != LABELS_MAGIC:
        raise ValueError(f"{path}: expected idx1 label magic number {LABELS_MAGIC}, got {magic}")
    if len(data) - 8 != count:
        raise ValueError(f"{path}: expected {count} labels of 1 byte after the header, got {len(data) - 8} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=8).copy()


def read_idx_folder(files: dict[str, Path], spec: DatasetSpec) -> TrainTest:
    """Read the four idx files found by :func:`find_idx_files`."""

    def split(prefix: str) -> Split:
        images = read_idx_images(files[f"{prefix}_images"])
        labels = read_idx_labels(files[f"{prefix}_labels"])
        if len(labels) != len(images):
            raise ValueError(
                f"{files[f'{prefix}_labels']}: expected {len(images)} labels to match "
                f"{files[f'{prefix}_images']}, got {len(labels)}"
            )
        return check_split(files[f"{prefix}_images"], images, labels, spec.image_shape, spec.num_classes)

    return TrainTest(split("train"), split("test"))
