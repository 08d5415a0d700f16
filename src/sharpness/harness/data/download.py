"""Fetching the official data files over HTTP(S), verified against their published md5 checksums."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from sharpness.harness.data.catalog import RemoteFile, get_spec
from sharpness.harness.data.locations import resolve_data_dir

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_USER_AGENT = "sharpness-data/0.1 (python urllib)"


def file_md5(path: Path) -> str:
    """Hex md5 of a file's bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_dataset(name: str, data_dir: str | Path | None, base_url: str | None = None) -> list[Path]:
    """Download the official files of ``name`` into ``data_dir`` where :func:`load_dataset` finds them.

    Files already present with the right md5 are kept. Each download goes to a temporary file in the
    target folder, is checked against the md5 torchvision uses, then fsynced and renamed into place; a
    mismatch deletes the temporary file and raises ``ValueError`` giving both checksums. ``base_url``
    replaces the official host(s) (tests use a local server). The embedded ``digits`` set needs no
    files and returns ``[]``. Returns the paths of the data set's files.
    """
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    mirrors = (base_url,) if base_url is not None else spec.mirrors
    paths = []
    for remote in spec.remote:
        target = root / remote.subdir / remote.filename
        if not (target.is_file() and file_md5(target) == remote.md5):
            _fetch_from_mirrors(remote, mirrors, target)
        paths.append(target)
    return paths


def _fetch_from_mirrors(remote: RemoteFile, mirrors: tuple[str, ...], target: Path) -> None:
    failures = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{remote.filename}"
        try:
            fetch_verified(url, target, remote.md5)
            return
        except (urllib.error.URLError, OSError) as error:
            failures.append(f"{url}: {error}")
    raise OSError(
        f"could not download {remote.filename}: " + "; ".join(failures) + f"; check the network connection and run "
        f"again, or copy {remote.filename} into {target.parent} by hand"
    )


def fetch_verified(url: str, target: Path, md5: str) -> Path:
    """Download ``url`` to ``target`` atomically, raising ``ValueError`` if its md5 is not ``md5``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".download")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != md5:
            raise ValueError(f"checksum mismatch for {url}: expected md5 {md5}, got {actual}")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
