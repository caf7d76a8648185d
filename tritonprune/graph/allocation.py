"""Which channels to remove from importance scores: shared by pruning (`tpr.prune`) and the targeted
regularizer (`tpr.GrowingReg`), so both pick the same channels for the same target.

Rules (the `select` arguments):
- local (default): every group loses `ratio` of its channels, its weakest ones;
- `global_pruning`: all scored groups are ranked together (importance normalized per group);
- isomorphic (`kinds` given): groups are ranked together only with groups of the same structure (same
  `kind_key`: the residual stream of a transformer, its heads, its MLP units, each conv stage), each
  kind at its own ratio (`kind_ratios[label]`, else `ratio`): Fang et al., "Isomorphic Pruning", ECCV 2024;
- `layer_ratios` pin the ratio of the groups of named modules (selected on their own);
- whole units (attention heads) are kept in the count nearest the request (4 heads at ratio 0.3 keep 3,
  not 2); `round_to` rounds the kept count down to a multiple (up where down would keep nothing);
  `notes` collects the groups where units / round_to moved the count away from the request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .group import CONV, CONV_T, EMBEDDING, LAYERNORM, OUT, Group

LABELS = ("residual", "heads", "mlp", "conv")


def kind_label(group: Group) -> str:
    """The structure a group is: 'heads' (removed in whole units), 'residual' (written by several
    producers, or normalized by a LayerNorm / read from an embedding: a residual stream), 'conv'
    (conv channels), else 'mlp' (hidden units of linear layers)."""
    if group.unit > 1:
        return "heads"
    producers = {s.module for s in group.slots if s.role == OUT}
    if len(producers) > 1 or any(s.kind in (LAYERNORM, EMBEDDING) for s in group.slots):
        return "residual"
    if any(s.kind in (CONV, CONV_T) for s in group.slots):
        return "conv"
    return "mlp"


def kind_key(group: Group, shapes: Mapping[str, Sequence[int]]) -> tuple:
    """Structure signature: groups with equal keys are isomorphic (same label, size, units, and the same
    slot kinds/roles on tensors of the same shape apart from the pruned dim), e.g. the MLPs of the
    layers of a transformer. Ranking across isomorphic groups compares like with like."""
    slots = []
    for s in group.slots:
        shp = list(shapes.get(s.name, ()))
        if s.dim < len(shp):
            shp[s.dim] = -1
        slots.append((s.kind, s.role, s.is_bias, s.is_buffer, s.length, s.repeat, s.blocks, tuple(shp)))
    return (kind_label(group), group.size, group.unit, group.blocks, tuple(sorted(slots)))


def _kept_per_block(cb: int, target: float, kmin: int, round_to: int | None, blocks: int,
                    nearest: bool = False) -> int:
    """Kept units per block from a target (floored; rounded to the nearest count with `nearest`, for
    whole units such as heads), the floor `kmin`, and round_to (`blocks`: channels per kept unit row):
    rounded down to a multiple, up if down would break kmin, all of them if neither is possible."""
    k = math.floor(target + 0.5 - 1e-9) if nearest else math.floor(target + 1e-9)
    k = min(cb, max(k, kmin))
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


def ratio_of(group: Group, layer_ratios: Mapping[str, float]) -> float | None:
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
    kinds: Sequence[object] | None = None,
    kind_ratios: Mapping[str, float] | None = None,
    notes: list | None = None,
) -> list[list[int]]:
    """Removed channels per group (see the module docstring for the rules).

    Counting is done in units (`Group.unit` channels removed together) per block (`Group.blocks`).
    `kinds`: one key per group (`kind_key`), turns on isomorphic ranking; `kind_ratios` maps labels
    (`kind_label`) to ratios. `notes`, if a list, receives `(group index, requested ratio, removed
    fraction)` for each locally selected group whose rounding to whole units, equal counts per block (norm
    groups) or round_to moved its count.
    """
    layer_ratios = layer_ratios or {}
    kind_ratios = kind_ratios or {}
    removed: list[list[int]] = [[] for _ in groups]
    pools: dict[object, list] = {}  # key -> [(index, order, unit scores, units per block, floor, unit)]
    pool_ratio: dict[object, float] = {}
    for i, (g, imp) in enumerate(zip(groups, imps)):
        if imp is None or g.size == 0:
            continue
        uimp, u, cb = _units(g, imp)
        b = g.blocks
        kmin = max(1, math.ceil(cb * (1 - max_ratio) - 1e-9))
        order = _order(uimp, b)
        r = ratio_of(g, layer_ratios)
        if r is None and (global_pruning or kinds is not None):
            key = kinds[i] if kinds is not None else None
            pools.setdefault(key, []).append((i, order, uimp, cb, kmin, u))
            label = key[0] if isinstance(key, tuple) and key and key[0] in LABELS else None
            pool_ratio[key] = kind_ratios.get(label, ratio) if label is not None else ratio
            continue
        r = ratio if r is None else r
        k = _kept_per_block(cb, cb * (1 - r), kmin, round_to, b * u, nearest=u > 1)
        if notes is not None and k * b * u != math.floor(g.size * (1 - r) + 1e-9) and (u > 1 or b > 1 or round_to):
            notes.append((i, r, 1 - k / cb))
        removed[i] = _channels(_removed_from(order, k), u)
    for key, pool in pools.items():
        r = pool_ratio[key]
        if len(pool) == 1:  # a kind of its own: local selection at the kind's ratio
            i, order, _, cb, kmin, u = pool[0]
            k = _kept_per_block(cb, cb * (1 - r), kmin, round_to, order.shape[0] * u, nearest=u > 1)
            removed[i] = _channels(_removed_from(order, k), u)
            continue
        units = []  # (score, rank in group, pool position): one unit from every block
        for pos, (_, order, uimp, _, _, _) in enumerate(pool):
            scores = torch.gather(uimp.view(order.shape[0], -1), 1, order).mean(0)
            units += [(float(s), k, pos) for k, s in enumerate(scores.tolist())]
        units.sort()
        total = sum(groups[i].size for i, *_ in pool)
        goal = total - math.floor(total * (1 - r) + 1e-9)
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
