"""PrunePlan and channel selection.

A PrunePlan lists, for each group, the group channels to remove. Groups name tensors by their
qualified names and the plan records the model's class and the shape of every tensor it touches, so
it is plain JSON, applies to any freshly built model of the same class, and refuses a model it does
not fit before modifying anything.

Selection (`prune`):
- ratio: the fraction of each group's channels to remove (per group), or, with `global_pruning`, of
  all channels of the scored groups together, ranked by importance normalized per group.
- layer_ratios: {module name: ratio}; a group takes the ratio of the most specific name that is, or
  contains, one of the modules producing its channels (modules with OUT slots; all its modules if it
  has none). Such groups are selected on their own even with global pruning.
- max_ratio: no group loses more than this fraction of its channels.
- round_to=N: each kept count is rounded down to a multiple of N (up if rounding down would break
  max_ratio or keep nothing); a group that cannot reach a multiple keeps all its channels.
- At least one channel is always kept per block; blocked groups (grouped convs, GroupNorm) lose the
  same count from every block, the weakest channels of each block.
- steps=k: k rounds, each pruning the already-pruned model, with the cumulative removed fraction
  reaching ratio*i/k of the original channels after round i (targets are interpolated the same way).
  Importance is recomputed each round. The returned plan is the composition, on the original model.
- target_params / target_macs: the smallest ratio (in the chosen local/global mode) whose plan brings
  the parameter count / estimated MACs to at most the target; `ratio` is then not used.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .counting import MacCount, count_macs, count_params, estimate_macs
from .graph import find_groups, resolve_ignored
from .graph.assemble import is_ignored
from .graph.group import IN, OUT, Group, Slot
from .graph.trace import unwrap
from .hf_checkpoint import config_snapshot, record_plan
from .importance import METHODS, Importance, compute_importance
from .slicing import Cut, apply_cuts, build_cuts, model_tensors, remap_groups, zero_channels
from .wrappers import resolve_optimizer

FORMAT = "tritonprune.PrunePlan"
VERSION = 1


def _class_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _new_numel(shape: Sequence[int], cuts: Mapping[int, Cut]) -> int:
    dims = list(shape)
    for dim, cut in cuts.items():
        dims[dim] = int((~cut.removed[0]).sum())
    return math.prod(dims)


def _numel_after(shapes: Mapping[str, Sequence[int]], cuts: Mapping[tuple[str, int], Cut]) -> dict[str, int]:
    by: dict[str, dict[int, Cut]] = {}
    for (name, dim), c in cuts.items():
        by.setdefault(name, {})[dim] = c
    return {n: _new_numel(shapes[n], c) for n, c in by.items()}


@dataclass
class PrunePlan:
    """Channels to remove per group, by tensor names. Build with `tritonprune.prune`."""

    model_class: str
    groups: list[Group]
    removed: list[list[int]]
    shapes: dict[str, list[int]]
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ checks
    def _removals(self):
        return list(zip(self.groups, self.removed))

    def check(self, model: nn.Module) -> dict[tuple[str, int], Cut]:
        """Raise ValueError (TypeError for a non-module) if the plan does not fit `model`; return its cuts."""
        model = unwrap(model)
        name = _class_name(model)
        if name != self.model_class:
            raise ValueError(f"this plan was made for a {self.model_class}, not a {name}")
        tensors = model_tensors(model)
        for tname, shape in self.shapes.items():
            if tname not in tensors:
                raise ValueError(
                    f"{tname}: the plan touches this tensor but the model has no such parameter or buffer"
                )
            if list(tensors[tname].shape) != list(shape):
                raise ValueError(
                    f"{tname}: the plan expects shape {tuple(shape)}, the model has {tuple(tensors[tname].shape)} "
                    "(already pruned, or another configuration)"
                )
        return build_cuts(self._removals(), tensors)

    # ------------------------------------------------------------------ actions
    def zero_(self, model: nn.Module) -> nn.Module:
        """Soft pruning: zero the removed channels in place; shapes are unchanged."""
        self.check(model)
        zero_channels(unwrap(model), self._removals())
        return model

    def apply(self, model: nn.Module, optimizer: Any = None) -> nn.Module:
        """Physically remove the channels; slice `optimizer`'s state and hand it the new parameters."""
        cuts = self.check(model)
        before = config_snapshot(unwrap(model))
        apply_cuts(unwrap(model), cuts, resolve_optimizer(optimizer))  # through accelerate/Lightning wrappers
        record_plan(unwrap(model), self, before)  # for tritonprune.save_pretrained
        return model

    def remap(self, groups: Iterable[Group], model: nn.Module | None = None) -> list[Group]:
        """`groups` (of the unpruned model) as they are after this plan is applied."""
        tensors = (
            {n: torch.empty(s, device="meta") for n, s in self.shapes.items()}
            if model is None
            else model_tensors(model)
        )
        return remap_groups(groups, build_cuts(self._removals(), tensors))

    # ------------------------------------------------------------------ reporting
    @property
    def num_removed(self) -> int:
        return sum(len(r) for r in self.removed)

    def _meta_cuts(self, removals=None) -> dict[tuple[str, int], Cut]:
        tensors = {n: torch.empty(s, device="meta") for n, s in self.shapes.items()}
        return build_cuts(self._removals() if removals is None else removals, tensors)

    def summary(self) -> str:
        """Per group: channels, then params and MACs of the layers it touches, before and after pruning
        that group alone (groups share layers, so these do not add up); then the model totals."""
        macs_w: dict[str, int] = self.info.get("macs_by_weight", {})
        lines = [
            f"PrunePlan for {self.model_class}: {len(self.groups)} groups, {self.num_removed} channels removed"
        ]
        lines.append(f"{'#':>4} {'group':<36} {'channels':>13} {'params':>21} {'MACs':>25}")
        for i, (g, r) in enumerate(zip(self.groups, self.removed)):
            cuts = self._meta_cuts([(g, r)])
            after = _numel_after(self.shapes, cuts)
            names = sorted({s.name for s in g.slots if not s.is_buffer})
            pb = sum(math.prod(self.shapes[n]) for n in names)
            pa = sum(after[n] for n in names)
            mb = sum(macs_w.get(n, 0) for n in names)
            ma = sum(round(macs_w.get(n, 0) * after[n] / max(1, math.prod(self.shapes[n]))) for n in names)
            label = (g.origin or (g.slots[0].module if g.slots else "?"))[:36]
            mac = f"{mb:>11,} -> {ma:<11,}" if macs_w else f"{'-':>25}"
            lines.append(f"{i:>4} {label:<36} {g.size:>5} -> {g.size - len(r):<5} {pb:>9,} -> {pa:<9,} {mac}")
        info = self.info
        if "params_before" in info:
            lines.append(f"params: {info['params_before']:,} -> {info['params_after']:,}")
        if info.get("macs_before") is not None:
            lines.append(
                f"MACs:   {info['macs_before']:,} -> {info['macs_after']:,} (estimated from weight sizes)"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PrunePlan({self.model_class}, groups={len(self.groups)}, removed={self.num_removed})"

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_class": self.model_class,
            "groups": [
                {
                    "size": g.size,
                    "blocks": g.blocks,
                    "unit": g.unit,
                    "exact": g.exact,
                    "origin": g.origin,
                    "removed": list(map(int, r)),
                    "slots": [asdict(s) for s in g.slots],
                }
                for g, r in zip(self.groups, self.removed)
            ],
            "shapes": {n: list(map(int, s)) for n, s in self.shapes.items()},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrunePlan:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a tritonprune plan (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"plan version {d.get('version')} is not supported (expected {VERSION})")
        groups, removed = [], []
        for i, g in enumerate(d["groups"]):
            slots = tuple(Slot(**s) for s in g["slots"])
            groups.append(
                Group(
                    size=g["size"],
                    slots=slots,
                    blocks=g.get("blocks", 1),
                    unit=g.get("unit", 1),
                    exact=g.get("exact", True),
                    origin=g.get("origin", ""),
                    index=i,
                )
            )
            removed.append(sorted(int(x) for x in g["removed"]))
        return cls(
            d["model_class"],
            groups,
            removed,
            {n: list(s) for n, s in d["shapes"].items()},
            dict(d.get("info", {})),
        )

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunePlan:
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ---------------------------------------------------------------------------------------- selection


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


def _check_ratio(r: Any, what: str) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 <= r < 1) or math.isnan(r):
        raise ValueError(f"{what} must be a number in [0, 1), got {r!r}")
    return float(r)


def _touches(group: Group, ignored: Sequence[str]) -> bool:
    """A hand-built group is dropped if an ignored module produces or normalizes its channels."""
    return any(s.role != IN and is_ignored(s.module, set(ignored)) for s in group.slots)


def _params_after(shapes: Mapping[str, Sequence[int]], base: int, cuts, param_names: set[str]) -> int:
    after = _numel_after(shapes, cuts)
    return base - sum(math.prod(shapes[n]) - a for n, a in after.items() if n in param_names)


def _macs_after(
    shapes: Mapping[str, Sequence[int]], shapes0: Mapping[str, Sequence[int]], macs0: MacCount, cuts
) -> int:
    now = {n: math.prod(s) for n, s in shapes.items()}
    now.update(_numel_after(shapes, cuts))
    return estimate_macs(macs0, {n: math.prod(s) for n, s in shapes0.items()}, now)


def prune(
    model: nn.Module,
    example_inputs: Any = None,
    ratio: float | None = None,
    optimizer: Any = None,
    importance: Importance = "l2",
    global_pruning: bool = False,
    round_to: int | None = None,
    ignored_layers: Iterable[Any] = (),
    dry_run: bool = False,
    groups: Sequence[Group] | None = None,
    *,
    normalizer: str | None = "mean",
    layer_ratios: Mapping[str, float] | None = None,
    max_ratio: float = 1.0,
    steps: int = 1,
    target_params: int | None = None,
    target_macs: int | None = None,
    bias: bool = False,
    seed: int | None = None,
) -> PrunePlan:
    """Choose channels to remove and (unless `dry_run`) remove them; returns the PrunePlan.

    `ratio` defaults to 0.5; see the module docstring for layer_ratios, max_ratio, round_to, steps and
    the targets. `groups` skips `find_groups` (hand-built groups, or groups found earlier on this model);
    without it, the groups of a RegularizedOptimizer passed as `optimizer` are used (unless
    `ignored_layers` is given), else `find_groups(model, example_inputs, ignored_layers)`.
    `optimizer` (any torch optimizer or a RegularizedOptimizer) has its state sliced along, and a
    RegularizedOptimizer gets the groups of the pruned model. `dry_run=True` only returns the plan.
    importance: "l1" | "l2" | "bn_scale" | "taylor" | "random" | callable(group) -> tensor[group.size];
    normalizer: "mean" | "max" | None (per group, as in Torch-Pruning); seed: for "random".
    """
    model = unwrap(model)
    optimizer = resolve_optimizer(optimizer)  # the RegularizedOptimizer inside accelerate/Lightning wrappers
    if target_params is not None and target_macs is not None:
        raise ValueError("give target_params or target_macs, not both")
    target = target_params if target_params is not None else target_macs
    if target is not None:
        if ratio is not None:
            raise ValueError("give a ratio or a target (target_params / target_macs), not both")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
            raise ValueError(f"the target must be a positive number, got {target!r}")
    ratio = _check_ratio(0.5 if ratio is None else ratio, "ratio")
    layer_ratios = dict(layer_ratios or {})
    modules = dict(model.named_modules())
    for k, r in layer_ratios.items():
        if k not in modules:
            raise ValueError(f"layer_ratios: {k!r} is not a module of the model (see model.named_modules())")
        _check_ratio(r, f"layer_ratios[{k!r}]")
    if not (0 < max_ratio <= 1):
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not callable(importance) and importance not in METHODS:
        raise ValueError(f"importance {importance!r} is not one of {METHODS} or a callable group -> tensor")
    ignored_layers = list(ignored_layers)
    ignored = sorted(resolve_ignored(model, ignored_layers))

    if groups is None and not ignored_layers and hasattr(optimizer, "reset_groups"):
        groups = list(optimizer.groups)  # prune what the RegularizedOptimizer regularized; no new trace
    elif groups is None:
        groups = find_groups(model, example_inputs, ignored_layers=ignored_layers)
    else:
        groups = [g for g in groups if not _touches(g, ignored)]
    groups = list(groups)

    work = copy.deepcopy(model) if dry_run and steps > 1 else model
    tensors = model_tensors(model)
    shapes0 = {n: list(tensors[n].shape) for g in groups for n in {s.name for s in g.slots} if n in tensors}
    params0 = count_params(model)
    macs0 = None
    if example_inputs is not None:
        try:
            macs0 = count_macs(model, example_inputs)
        except Exception:  # counting is a report; a model it cannot run through is still prunable
            macs0 = None
    if target_macs is not None and macs0 is None:
        raise ValueError("target_macs needs example_inputs the model runs on")
    param_names = {s.name for g in groups for s in g.slots if not s.is_buffer}

    alive = [list(range(g.size)) for g in groups]  # original channel ids still present, per group
    cur_groups = groups
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for step in range(1, steps + 1):
        cur_tensors = model_tensors(work)
        cur_shapes = {n: list(cur_tensors[n].shape) for n in shapes0}
        imps = compute_importance(
            work, cur_groups, importance, normalizer=normalizer, bias=bias, generator=gen
        )
        if target is not None:
            if target_params is not None:
                base = count_params(work)
                goal = params0 - (params0 - target) * step / steps

                def metric(cuts, shapes=cur_shapes, base=base):
                    return _params_after(shapes, base, cuts, param_names)
            else:
                goal = macs0.total - (macs0.total - target) * step / steps

                def metric(cuts, shapes=cur_shapes):
                    return _macs_after(shapes, shapes0, macs0, cuts)

            def choose(r: float, groups=cur_groups, imps=imps) -> list[list[int]]:
                return select(groups, imps, r, global_pruning, layer_ratios, max_ratio, round_to)

            removed = _search(choose, cur_groups, cur_shapes, metric, goal)
        else:
            r = iterative_ratios(ratio, steps)[step - 1]
            lr = {k: iterative_ratios(v, steps)[step - 1] for k, v in layer_ratios.items()}
            removed = select(cur_groups, imps, r, global_pruning, lr, max_ratio, round_to)
        step_plan = PrunePlan(_class_name(model), list(cur_groups), removed, cur_shapes)
        for a, rem in zip(alive, removed):
            gone = set(rem)
            a[:] = [c for j, c in enumerate(a) if j not in gone]
        if steps > 1 or not dry_run:
            if step < steps:
                cur_groups = step_plan.remap(cur_groups, work)
            step_plan.apply(work, optimizer if work is model else None)

    removed_all = [sorted(set(range(g.size)) - set(a)) for g, a in zip(groups, alive)]
    plan = PrunePlan(_class_name(model), groups, removed_all, shapes0)
    cuts = plan._meta_cuts()
    plan.info = {
        "ratio": None if target is not None else ratio,
        "importance": importance
        if isinstance(importance, str)
        else getattr(importance, "__name__", "callable"),
        "global_pruning": bool(global_pruning),
        "steps": steps,
        "params_before": params0,
        "params_after": _params_after(shapes0, params0, cuts, param_names),
    }
    if macs0 is not None:
        plan.info["macs_before"] = macs0.total
        plan.info["macs_after"] = _macs_after(shapes0, shapes0, macs0, cuts)
        plan.info["macs_by_weight"] = dict(macs0.by_weight)
    return plan


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
