"""Which channels to remove: the ranking rules live in graph/allocation.py (shared with the targeted
regularizer, which must pick the same channels); here the kept counts of a target size by search."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..graph.allocation import (
    _channels,
    _order,
    _removed_from,
    _units,
    kind_key,
    kind_label,
    ratio_of,
    select,
)
from ..graph.group import OUT
from .slicing import build_cuts

_ratio_of = ratio_of
__all__ = ["select", "kind_key", "kind_label", "iterative_ratios", "equal_counts", "evaluate", "width"]


def iterative_ratios(ratio: float, steps: int) -> list[float]:
    """Per-call ratios so that `steps` successive prune calls remove `ratio` of the original channels,
    the cumulative removed fraction growing linearly (ratio*i/steps after call i)."""
    out = []
    for i in range(1, steps + 1):
        before, after = 1 - ratio * (i - 1) / steps, 1 - ratio * i / steps
        out.append(1 - after / before)
    return out


# --------------------------------------------------------------------------------------- prune()


def evaluate(groups, shapes, metric, removed, meta=None) -> float:
    """`metric` (parameters or MACs left) of the model of `shapes` once `removed` is cut."""
    meta = meta if meta is not None else {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    return metric(build_cuts(list(zip(groups, removed)), meta))


def _search(choose, groups, shapes, metric, goal) -> list[list[int]]:
    """The selection of the smallest ratio whose metric is <= goal (bisection: the metric falls as the ratio grows)."""
    meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}

    def at(r: float):
        removed = choose(r)
        return evaluate(groups, shapes, metric, removed, meta), removed

    value, removed = at(0.0)
    if value <= goal:
        return removed
    hi = 1 - 1e-9
    value, best = at(hi)
    if value > goal:
        raise ValueError(
            f"target {goal:,.0f} is out of reach: pruning every group as far as allowed leaves {value:,}; "
            "raise the target, max_ratio, or prune more groups"
        )
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        v, rem = at(mid)
        if v <= goal:
            hi, best = mid, rem
        else:
            lo = mid
    return best


def width(group) -> int:
    """Tensor rows per channel of a group: 1, or the head dim where each channel is a whole head. Read
    from the producers' rows (a per-head bias table or a Linear reading a flattened map do not count)."""
    outs = [s.repeat for s in group.slots if s.role == OUT]
    return min(outs or [s.repeat for s in group.slots] or [1])


def equal_counts(groups, imps, removed: Sequence[Sequence[int]], members: Sequence[int]) -> dict[int, list[int]]:
    """Removed channels of tied groups (of one width, found by the run check: a forward reading one width
    from the other's tensor) so that each keeps as many rows: every member loses the fewest rows any of
    them loses, rounded down to whole units in every block of each member, its weakest channels. Members
    of different widths (tied through one block of some): `_equal_part_counts`."""
    w = {j: width(groups[j]) for j in members}
    rows = {j: groups[j].size * w[j] for j in members}
    if len(set(rows.values())) > 1:
        return _equal_part_counts(groups, imps, removed, members, w, rows)
    step = math.lcm(*(max(1, groups[j].unit) * groups[j].blocks * w[j] for j in members))
    n = min(len(removed[j]) * w[j] for j in members)
    n -= n % step
    return _removing_rows(groups, imps, removed, members, w, {j: n for j in members})


def _removing_rows(groups, imps, removed, members, w, n: dict[int, int]) -> dict[int, list[int]]:
    """Each member's removed channels for `n[j]` rows in all (its weakest units, evenly per block)."""
    out = {}
    for j in members:
        g = groups[j]
        if len(removed[j]) * w[j] == n[j] or imps[j] is None:
            out[j] = list(removed[j]) if len(removed[j]) * w[j] == n[j] else []
            continue
        uimp, u, cb = _units(g, imps[j])
        out[j] = _channels(_removed_from(_order(uimp, g.blocks), cb - n[j] // (w[j] * u * g.blocks)), u)
    return out


def _equal_part_counts(groups, imps, removed, members, w, rows) -> dict[int, list[int]]:
    """Tied groups of different widths where the forward reads one block of some (a part of an equal
    split: C2PSA's residual half, next to its attention's values, whose width it must equal): every
    member keeps as many rows per part of the common width, rounded to the nearest whole units of every
    member (at least one unit, where each asks for some), each keeping some rows; empty lists where no
    common width or count exists."""
    widths = [{rows[j]} | ({rows[j] // groups[j].blocks} if groups[j].blocks > 1 else set()) for j in members]
    common = set.intersection(*widths)
    if not common:
        return {j: [] for j in members}
    part = max(common)
    parts = {j: rows[j] // part for j in members}  # 1, or the member's blocks
    step = math.lcm(*(max(1, groups[j].unit) * w[j] * (groups[j].blocks // parts[j]) for j in members))
    asked = min(len(removed[j]) * w[j] // parts[j] for j in members)
    n = max(round(asked / step), 1 if asked else 0) * step
    if n >= part:
        n = (part - 1) // step * step
    return _removing_rows(groups, imps, removed, members, w, {j: n * parts[j] for j in members})
