"""Progress bars for the long loops of the analysis (HVP passes, grid points, subsets)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T], *, total: int | None = None, desc: str | None = None, enabled: bool = True
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` and standard error is a terminal.

    ``disable=None`` is tqdm's switch for "only on a TTY", so logs and CI output stay clean.
    """
    return iter(tqdm(iterable, total=total, desc=desc, disable=None if enabled else True, leave=False))
