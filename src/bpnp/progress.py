"""A progress bar for long work: tqdm when it is installed, else the bare iterable."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["progress"]


def progress(iterable: Iterable, total: int | None = None, desc: str = "", disable: bool = False):
    """Wrap ``iterable`` in a tqdm bar (``total`` items, labelled ``desc``) unless ``disable``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)
