"""``load_dataset``: from a name and a data folder to an :class:`ArrayDataset`."""

from __future__ import annotations

from pathlib import Path

from sharpness.harness.data.catalog import get_spec
from sharpness.harness.data.dataset import ArrayDataset
from sharpness.harness.data.digits import read_digits
from sharpness.harness.data.download import download_dataset
from sharpness.harness.data.locations import resolve_data_dir
from sharpness.harness.data.search import not_found_message, search


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False) -> ArrayDataset:
    """Load data set ``name`` (one of :data:`DATASETS`) from files under ``data_dir``.

    ``data_dir`` defaults as in :func:`resolve_data_dir`. The first copy found is read, preferring
    ``<name>.npz``, then ``<name>.part<i>.npz``, then the official release formats. With ``download``
    the official files are fetched when no copy is found. ``digits`` is embedded and needs no files.

    Raises ``FileNotFoundError`` (naming the files and folders tried) when there is no copy, and
    ``ValueError`` (naming the file) when a file is corrupt, truncated or of the wrong shape.
    """
    spec = get_spec(name)
    if spec.name == "digits":
        splits = read_digits()
    else:
        root = resolve_data_dir(data_dir)
        result = search(spec, root)
        if result.found is None and download:
            download_dataset(spec.name, root)
            result = search(spec, root)
        if result.found is None:
            raise FileNotFoundError(not_found_message(spec, root, result))
        splits = result.found.read()
    return ArrayDataset.from_arrays(
        spec.name,
        splits.train.images,
        splits.train.labels,
        splits.test.images,
        splits.test.labels,
        spec.num_classes,
    )


def find_dataset(name: str, data_dir: str | Path | None = None) -> str | None:
    """Where :func:`load_dataset` would read ``name`` from (a file, parts or folder), or ``None`` if absent.

    The embedded ``digits`` set gives ``"embedded (scikit-learn load_digits)"``. Nothing is read or checked.
    """
    spec = get_spec(name)
    if spec.name == "digits":
        return "embedded (scikit-learn load_digits)"
    found = search(spec, resolve_data_dir(data_dir)).found
    return None if found is None else found.location
