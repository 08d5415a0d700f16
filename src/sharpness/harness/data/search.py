"""Finding a data set's files under a data folder, in order of preference, and explaining a miss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sharpness.harness.data.catalog import DatasetSpec
from sharpness.harness.data.checks import TrainTest
from sharpness.harness.data.cifar_files import CIFAR_LAYOUTS, read_cifar_archive, read_cifar_folder
from sharpness.harness.data.idx_files import IDX_FILES, find_idx_files, read_idx_folder
from sharpness.harness.data.locations import DATA_DIR_ENV
from sharpness.harness.data.npz_files import find_parts, read_npz, read_npz_parts
from sharpness.harness.data.svhn_files import read_svhn_files, svhn_files


@dataclass(frozen=True)
class Found:
    """A located copy of a data set: what it is (for messages) and how to read it."""

    location: str
    read: Callable[[], TrainTest]


@dataclass
class SearchResult:
    """The first copy found (or ``None``), what was looked for where, and incomplete copies seen."""

    found: Found | None = None
    looked_for: list[tuple[str, list[Path]]] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)


def candidate_folders(spec: DatasetSpec, root: Path) -> list[Path]:
    """``root`` and the data set's usual sub-folders of it."""
    return [root, *(root / subdir for subdir in spec.subdirs)]


def search(spec: DatasetSpec, root: Path) -> SearchResult:
    """Look for ``spec``'s files under ``root``: ``.npz``, ``.npz`` parts, then the official formats."""
    folders = candidate_folders(spec, root)
    result = SearchResult()
    finders = [_npz, _npz_parts]
    if spec.name in CIFAR_LAYOUTS:
        finders += [_cifar_folder, _cifar_archive]
    if spec.name in ("mnist", "fashion_mnist"):
        finders.append(_idx)
    if spec.name in ("svhn", "svhn_extra"):
        finders.append(_svhn)
    for finder in finders:
        finder(spec, folders, result)
        if result.found is not None:
            break
    return result


def _npz(spec: DatasetSpec, folders: list[Path], result: SearchResult) -> None:
    result.looked_for.append((f"{spec.name}.npz", folders))
    for folder in folders:
        path = folder / f"{spec.name}.npz"
        if path.is_file():
            result.found = Found(str(path), partial(read_npz, path, spec))
            return


def _npz_parts(spec: DatasetSpec, folders: list[Path], result: SearchResult) -> None:
    result.looked_for.append((f"{spec.name}.part0.npz, {spec.name}.part1.npz, ... (numbered parts)", folders))
    for folder in folders:
        parts = find_parts(folder, spec.name)
        if parts:
            result.found = Found(", ".join(map(str, parts)), partial(read_npz_parts, parts, spec))
            return


def _cifar_folder(spec: DatasetSpec, folders: list[Path], result: SearchResult) -> None:
    layout = CIFAR_LAYOUTS[spec.name]
    names = (*layout.train_files, layout.test_file)
    result.looked_for.append((f"{layout.folder}/ holding {', '.join(names)}", folders))
    for folder in folders:
        batches = folder / layout.folder
        if not batches.is_dir():
            continue
        missing = [name for name in names if not (batches / name).is_file()]
        if missing:
            result.incomplete.append(f"{batches} lacks {', '.join(missing)}")
            continue
        result.found = Found(str(batches), partial(read_cifar_folder, batches, spec))
        return


def _cifar_archive(spec: DatasetSpec, folders: list[Path], result: SearchResult) -> None:
    archive_name = CIFAR_LAYOUTS[spec.name].archive
    result.looked_for.append((archive_name, folders))
    for folder in folders:
        path = folder / archive_name
        if path.is_file():
            result.found = Found(str(path), partial(read_cifar_archive, path, spec))
            return


def _idx(spec: DatasetSpec, folders: list[Path], result: SearchResult) -> None:
    # Not the data folder itself: MNIST and Fashion-MNIST use the same file names.
    subfolders = folders[1:]
    result.looked_for.append((", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values()), subfolders))
    for folder in subfolders:
        files, missing = find_idx_files(folder)
        if files and missing:
            result.incomplete.append(f"{folder} lacks {', '.join(f'{stem}[.gz]' for stem in missing)}")
        elif files:
            result.found = Found(str(folder), partial(read_idx_folder, files, spec))
            return


def _svhn(spec: DatasetSpec, folders: list[Path], result: SearchResult) -> None:
    names = svhn_files(spec)
    result.looked_for.append((", ".join(names.values()), folders))
    for folder in folders:
        files = {split: folder / name for split, name in names.items() if (folder / name).is_file()}
        if len(files) == len(names):
            result.found = Found(str(folder), partial(read_svhn_files, files, spec))
            return
        if files:
            missing = [name for split, name in names.items() if split not in files]
            result.incomplete.append(f"{folder} lacks {', '.join(missing)}")


def not_found_message(spec: DatasetSpec, root: Path, result: SearchResult) -> str:
    """Explain which files were looked for in which folders and how to provide them."""
    lines = [f"data set {spec.name!r} not found under {root}. Looked for any of:"]
    for pattern, folders in result.looked_for:
        lines.append(f"  - {pattern}  in {', '.join(map(str, folders))}")
    if result.incomplete:
        lines.append("Incomplete copies: " + "; ".join(result.incomplete) + ".")
    lines.append(
        "To provide it, put the files in one of those folders, or point to another folder with "
        f"--data-dir DIR (data_dir=...) or the environment variable {DATA_DIR_ENV}; or fetch the "
        f"official files with `sharpness download {spec.name}` (or --download on train, compare and select-rho)."
    )
    return "\n".join(lines)
