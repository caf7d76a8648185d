"""Which channels to remove: per group, by importance, in whole units (heads, round_to blocks); the
kept counts of a target size by search."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..graph.group import OUT, Group
from .slicing import build_cuts


def _kept_per_block(cb: int, target: int, kmin: int, round_to: int | None, blocks: int) -> int:
    """Final kept count per block from a target, the floor, and round_to (`blocks`: channels per kept unit row)."""
    k = min(cb, max(target, kmin))
    if round_to and round_to > 1 and k < cb:
        q = round_to // math.gcd(round_to, blocks)  # kept total = blocks * k must be a multiple of round_to
        down = k - k % q
        if down >= kmin and down >= 1:
            k = down
        elif down + q <= cb:
            k = down + q
        else:
            k = cb
    return k


def _order(imp: torch.Tensor, blocks: int) -> torch.Tensor:
    """Per block, channel positions from weakest to strongest ([blocks, Cb], stable)."""
    return torch.sort(imp.view(blocks, -1), dim=1, stable=True).indices


def _removed_from(order: torch.Tensor, kept: int) -> list[int]:
    blocks, cb = order.shape
    n = cb - kept
    base = (torch.arange(blocks) * cb)[:, None]
    return sorted((order[:, :n] + base).flatten().tolist())


def _ratio_of(group: Group, layer_ratios: Mapping[str, float]) -> float | None:
    mods = [s.module for s in group.slots if s.role == OUT] or group.modules
    best, best_len = None, -1
    for m in mods:
        for key, r in layer_ratios.items():
            if key == m or m.startswith(key + "."):
                if len(key) > best_len or (len(key) == best_len and r > best):
                    best, best_len = r, len(key)
    return best


def _units(g: Group, imp: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Scores of the removable units (`g.unit` contiguous channels, e.g. whole heads), unit size, units per block."""
    u = max(1, g.unit)
    if g.size % u or (g.size // u) % g.blocks:
        raise ValueError(
            f"group {g.origin!r}: size {g.size} does not split into {g.blocks} blocks of whole units of {u}"
        )
    return (imp.view(-1, u).mean(1) if u > 1 else imp), u, g.size // u // g.blocks


def _channels(removed_units: list[int], u: int) -> list[int]:
    return [c * u + r for c in removed_units for r in range(u)] if u > 1 else removed_units


def select(
    groups: Sequence[Group],
    imps: Sequence[torch.Tensor | None],
    ratio: float,
    global_pruning: bool = False,
    layer_ratios: Mapping[str, float] | None = None,
    max_ratio: float = 1.0,
    round_to: int | None = None,
) -> list[list[int]]:
    """Removed channels per group (see the module docstring for the rules).

    Counting is done in units (`Group.unit` channels removed together) per block (`Group.blocks`).
    """
    layer_ratios = layer_ratios or {}
    removed: list[list[int]] = [[] for _ in groups]
    pool = []  # (index, order, unit scores, units per block, floor, unit) of groups ranked globally
    for i, (g, imp) in enumerate(zip(groups, imps)):
        if imp is None or g.size == 0:
            continue
        uimp, u, cb = _units(g, imp)
        b = g.blocks
        kmin = max(1, math.ceil(cb * (1 - max_ratio) - 1e-9))
        order = _order(uimp, b)
        r = _ratio_of(g, layer_ratios)
        if r is None and global_pruning:
            pool.append((i, order, uimp, cb, kmin, u))
            continue
        r = ratio if r is None else r
        target = math.floor(cb * (1 - r) + 1e-9)
        removed[i] = _channels(_removed_from(order, _kept_per_block(cb, target, kmin, round_to, b * u)), u)
    if pool:
        units = []  # (score, rank in group, pool position): one unit from every block
        for pos, (_, order, uimp, _, _, _) in enumerate(pool):
            scores = torch.gather(uimp.view(order.shape[0], -1), 1, order).mean(0)
            units += [(float(s), k, pos) for k, s in enumerate(scores.tolist())]
        units.sort()
        total = sum(groups[i].size for i, *_ in pool)
        goal = total - math.floor(total * (1 - ratio) + 1e-9)
        taken = [0] * len(pool)
        done = 0
        for _, k, pos in units:
            if done >= goal:
                break
            _, order, _, cb, kmin, u = pool[pos]
            if k == taken[pos] and cb - taken[pos] > kmin:
                taken[pos] += 1
                done += order.shape[0] * u
        for pos, (i, order, _, cb, kmin, u) in enumerate(pool):
            k = _kept_per_block(cb, cb - taken[pos], kmin, round_to, order.shape[0] * u)
            removed[i] = _channels(_removed_from(order, k), u)
    return removed


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
