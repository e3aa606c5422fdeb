"""A progress bar for long work: tqdm when it is installed, else the bare iterable."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["progress"]


def progress(iterable: Iterable, total: int | None = None, desc: str = "", disable: bool = False):
    """Wrap ``iterable`` in a tqdm bar (``total`` items, labelled ``desc``) unless ``disable``."""
    try:
        # Not tqdm.auto: outside notebooks that is tqdm_asyncio, which calls iter(iterable) when
        # the bar is made. For a DataLoader that starts a second set of worker processes, which
        # prefetch, then idle until a garbage collection finds the bar.
        from tqdm.std import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)
