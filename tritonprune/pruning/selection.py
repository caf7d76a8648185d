"""Which channels to remove: the ranking rules live in graph/allocation.py (shared with the targeted
regularizer, which must pick the same channels); here the kept counts of a target size by search."""

from __future__ import annotations

import torch

from ..graph.allocation import kind_key, kind_label, ratio_of, select
from .slicing import build_cuts

_ratio_of = ratio_of
__all__ = ["select", "kind_key", "kind_label", "iterative_ratios"]


def iterative_ratios(ratio: float, steps: int) -> list[float]:
    """Per-call ratios so that `steps` successive prune calls remove `ratio` of the original channels,
    the cumulative removed fraction growing linearly (ratio*i/steps after call i)."""
    out = []
    for i in range(1, steps + 1):
        before, after = 1 - ratio * (i - 1) / steps, 1 - ratio * i / steps
        out.append(1 - after / before)
    return out


# --------------------------------------------------------------------------------------- prune()


def _search(choose, groups, shapes, metric, goal) -> list[list[int]]:
    """The selection of the smallest ratio whose metric is <= goal (bisection: the metric falls as the ratio grows)."""
    meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}

    def evaluate(r: float):
        removed = choose(r)
        return metric(build_cuts(list(zip(groups, removed)), meta)), removed

    value, removed = evaluate(0.0)
    if value <= goal:
        return removed
    hi = 1 - 1e-9
    value, best = evaluate(hi)
    if value > goal:
        raise ValueError(
            f"target {goal:,.0f} is out of reach: pruning every group as far as allowed leaves {value:,}; "
            "raise the target, max_ratio, or prune more groups"
        )
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        v, rem = evaluate(mid)
        if v <= goal:
            hi, best = mid, rem
        else:
            lo = mid
    return best
