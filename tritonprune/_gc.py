"""Fewer garbage collections while building large structures (traced graphs, plans).

Tracing a model and planning its buffers allocate many small container objects that live until the
call returns. Each young-generation collection that promotes them makes the next full collection scan
them all again, so with the default thresholds the collector's share grows with model size (about a
quarter of find_groups on a 3,000-layer MLP). Raising the young threshold for the call keeps that share
small; the previous thresholds come back on exit, and nothing is left uncollected: cyclic garbage is
freed by the next ordinary collection.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG = 50_000  # allocations between young collections (default 700)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    old = gc.get_threshold()
    if old[0] == 0 or old[0] >= YOUNG:  # collection off, or already rare: leave the user's choice
        yield
        return
    gc.set_threshold(YOUNG, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
