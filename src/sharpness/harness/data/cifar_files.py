"""Reading the official CIFAR-10/100 python pickles, from a folder or straight from the ``.tar.gz``."""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharpness.harness.data.catalog import DatasetSpec
from sharpness.harness.data.checks import Split, TrainTest, check_split

_ROW_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Names inside an official CIFAR release."""

    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes


CIFAR_LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        label_key=b"labels",
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_file="test",
        label_key=b"fine_labels",
    ),
}

_ARRAY = np.zeros(1)
_CORES = ("numpy.core", "numpy._core")
# The only globals a CIFAR pickle needs: numpy array reconstruction (under the module names of numpy 1
# and 2) and ``_codecs.encode``, which protocol-2 pickles use for bytes. Anything else is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{core}.multiarray", "_reconstruct"): _ARRAY.__reduce__()[0] for core in _CORES},
    **{(f"{core}.numeric", "_frombuffer"): _ARRAY.__reduce_ex__(5)[0] for core in _CORES},
    **{(f"{core}.multiarray", "scalar"): np.float64(0).__reduce__()[0] for core in _CORES},
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a data file") from None


def _lookup(batch: dict, key: bytes) -> Any:
    if key in batch:
        return batch[key]
    return batch.get(key.decode())


def parse_batch(source: str, payload: bytes, label_key: bytes) -> Split:
    """Decode one pickled batch: ``data`` rows of 3072 bytes (R, G, B planes of 32x32) and its labels.

    Rows are turned into channel-last ``(N, 32, 32, 3)`` images. ``source`` names the file in errors.
    """
    try:
        batch = _ArrayUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{source}: truncated or corrupt CIFAR pickle ({error})") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: expected a pickled dict, got {type(batch).__name__}")
    data = _lookup(batch, b"data")
    labels = _lookup(batch, label_key)
    if data is None or labels is None:
        found = ", ".join(sorted(map(repr, batch)))
        raise ValueError(f"{source}: expected keys b'data' and {label_key!r}, found {found}")
    labels = np.asarray(labels)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.shape != (len(labels), _ROW_BYTES):
        raise ValueError(
            f"{source}: expected {len(labels)} images of {_ROW_BYTES} bytes (uint8 rows, one per label), "
            f"got {data.dtype} array of shape {data.shape}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(images, labels)


def _assemble(sources: dict[str, tuple[str, bytes]], layout: CifarLayout, spec: DatasetSpec) -> TrainTest:
    def split(names: tuple[str, ...]) -> Split:
        parts = []
        for name in names:
            source, payload = sources[name]
            images, labels = parse_batch(source, payload, layout.label_key)
            parts.append(check_split(source, images, labels, spec.image_shape, spec.num_classes))
        return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))

    return TrainTest(split(layout.train_files), split((layout.test_file,)))


def read_cifar_folder(folder: Path, spec: DatasetSpec) -> TrainTest:
    """Read an extracted release folder such as ``cifar-10-batches-py``."""
    layout = CIFAR_LAYOUTS[spec.name]
    names = (*layout.train_files, layout.test_file)
    sources = {name: (str(folder / name), (folder / name).read_bytes()) for name in names}
    return _assemble(sources, layout, spec)


def read_cifar_archive(path: Path, spec: DatasetSpec) -> TrainTest:
    """Read the batches straight out of the official ``.tar.gz`` without extracting it."""
    layout = CIFAR_LAYOUTS[spec.name]
    wanted = {f"{layout.folder}/{name}": name for name in (*layout.train_files, layout.test_file)}
    sources: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                key = wanted.get(member.name.removeprefix("./"))
                if key is None or not member.isfile():
                    continue
                with archive.extractfile(member) as extracted:  # type: ignore[union-attr]
                    sources[key] = (f"{path}:{member.name}", extracted.read())
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: truncated or corrupt tar.gz archive ({error})") from error
    missing = [member for member, key in wanted.items() if key not in sources]
    if missing:
        raise ValueError(f"{path}: archive lacks {', '.join(missing)}; expected the layout of {layout.archive}")
    return _assemble(sources, layout, spec)
