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
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .counting import MacCount, count_params, estimate_macs, mac_counting
from .graph import find_groups, resolve_ignored
from .graph.assemble import is_ignored
from .graph.group import IN, OUT, Group
from .graph.trace import call_with, unwrap
from .hf_checkpoint import config_snapshot, record_plan
from .importance import METHODS, Importance, compute_importance
from .plan_schema import PlanError, check_groups, parse
from .runcheck import RunCheckUnavailable, input_spec, inputs_from_spec, reference_output, run_check
from .slicing import Cut, apply_cuts, build_cuts, model_tensors, remap_groups, zero_channels
from .transaction import Transaction
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

    def validate(self) -> None:
        """Raise PlanError (a ValueError) if the plan itself is malformed or inconsistent (no model needed):
        see tritonprune.plan_schema for what is checked. Errors name the group and the slot."""
        if not isinstance(self.model_class, str):
            raise PlanError(f"plan: model_class must be a string, got {self.model_class!r}")
        if not isinstance(self.shapes, Mapping) or not all(
            isinstance(n, str) and isinstance(v, (list, tuple)) and all(_is_int(x) and x >= 0 for x in v)
            for n, v in self.shapes.items()
        ):
            raise PlanError("plan: shapes must map tensor names to lists of non-negative ints")
        check_groups(self.groups, self.removed, self.shapes)

    def check(self, model: nn.Module) -> dict[tuple[str, int], Cut]:
        """Raise ValueError (TypeError for a non-module) if the plan does not fit `model`; return its cuts."""
        model = unwrap(model)
        self.validate()
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
        """Soft pruning: zero the removed channels in place; shapes are unchanged.

        Every slot is validated before any is zeroed; on any error the touched tensors are restored."""
        self.check(model)
        touched = [s.name for g, r in self._removals() if r for s in g.slots]
        with Transaction(unwrap(model), values=touched):
            zero_channels(unwrap(model), self._removals())
        return model

    def apply(
        self, model: nn.Module, optimizer: Any = None, *, example_inputs: Any = None, check_run: bool = True
    ) -> nn.Module:
        """Physically remove the channels; slice `optimizer`'s state and hand it the new parameters.

        Everything is validated first. Unless `check_run=False`, the pruned model is first run on fake
        tensors (no compute) with `example_inputs`, or with the example-input shapes `prune` recorded in
        the plan; if it would not run, ValueError names the module whose shapes break and the groups to
        leave out, and nothing is changed. On any error the model and optimizer are left as they were."""
        cuts = self.check(model)
        inner = unwrap(model)
        optimizer = resolve_optimizer(optimizer)  # through accelerate/Lightning wrappers
        if check_run:
            inputs = example_inputs
            if inputs is None and self.info.get("example_inputs") is not None:
                inputs = inputs_from_spec(self.info["example_inputs"], _device_of(inner))
            if inputs is not None:
                self._refuse_if_broken(inner, inputs)
        before = config_snapshot(inner)
        with Transaction(inner, optimizer):
            apply_cuts(inner, cuts, optimizer)
            record_plan(inner, self, before)  # for tritonprune.save_pretrained
        return model

    def _refuse_if_broken(self, model: nn.Module, inputs: Any) -> None:
        try:
            ref = reference_output(model, inputs)
        except RunCheckUnavailable as e:
            warnings.warn(f"tritonprune: the pruned model could not be checked before slicing: {e}", stacklevel=3)
            return
        if run_check(model, inputs, self._removals(), reference=ref) is None:
            return
        _, dropped = find_breaking_groups(model, inputs, list(self.groups), list(self.removed), ref)
        lines = [
            f"group {d['group']} ({d['origin']!r}) breaks {_where(model, d['module'])}: {d['error']}" for d in dropped
        ]
        mods = sorted({d["origin"] or d["module"] for d in dropped})
        raise ValueError(
            "this plan gives a model that does not run its example inputs; nothing was changed.\n  "
            + "\n  ".join(lines)
            + f"\nPrune again with these modules in ignored_layers: {mods}"
        )

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
        """Build a plan from `to_dict` output; the whole schema and every group are validated
        (PlanError, a ValueError, naming the group and the slot)."""
        model_class, groups, removed, shapes, info = parse(d)
        return cls(model_class, groups, removed, shapes, info)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunePlan:
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise PlanError(f"{path}: not a JSON plan ({e})") from e
        return cls.from_dict(d)


def _where(model: nn.Module, module: str) -> str:
    return f"module {module!r}" if module else f"the forward of {type(model).__name__} itself (the root module)"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")


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


def _number(x: Any, what: str) -> float:
    """A real, finite number (not a bool, string or tensor), or ValueError naming the argument."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{what} must be a number, got {x!r} ({type(x).__name__})")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return x


def _check_ratio(r: Any, what: str) -> float:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0 <= r < 1) or math.isnan(r):
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


def _check_arguments(ratio, target_params, target_macs, max_ratio, round_to, steps, importance):
    if target_params is not None and target_macs is not None:
        raise ValueError("give target_params or target_macs, not both")
    for what, t in (("target_params", target_params), ("target_macs", target_macs)):
        if t is not None:
            if ratio is not None:
                raise ValueError(f"give a ratio or a target ({what}), not both")
            if _number(t, what) <= 0:
                raise ValueError(f"{what} must be a positive number, got {t!r}")
    ratio = _check_ratio(0.5 if ratio is None else ratio, "ratio")
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, numbers.Real) or not (0 < max_ratio <= 1):
        raise ValueError(f"max_ratio must be a number in (0, 1], got {max_ratio!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not callable(importance) and importance not in METHODS:
        raise ValueError(f"importance {importance!r} is not one of {METHODS} or a callable group -> tensor")
    return ratio


def _check_layer_ratios(model: nn.Module, layer_ratios: Mapping[str, Any]) -> dict[str, float]:
    modules = dict(model.named_modules())
    out = {}
    for k, r in layer_ratios.items():
        if k not in modules:
            raise ValueError(f"layer_ratios: {k!r} is not a module of the model (see model.named_modules())")
        out[k] = _check_ratio(r, f"layer_ratios[{k!r}]")
    return out


def _check_layer_ratios_match(groups: Sequence[Group], layer_ratios: Mapping[str, float]) -> None:
    for k in layer_ratios:
        if not any(_ratio_of(g, {k: 0.0}) is not None for g in groups):
            raise ValueError(
                f"layer_ratios: module {k!r} produces no prunable channels (no group's channels come from it or "
                "from a module inside it; it may be ignored, reach an output, or hold no weights)"
            )


def find_breaking_groups(
    model: nn.Module,
    example_inputs: Any,
    groups: Sequence[Group],
    removed: Sequence[Sequence[int]],
    reference: Any = None,
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Drop the groups whose pruning stops `model` from running `example_inputs` (checked on fake
    tensors, see tritonprune.runcheck): returns the removed lists with those groups emptied, and one
    record per dropped group ({"group", "origin", "module", "error"}).

    While the planned model fails: every group touching the failing module (or a module inside or
    around it) is tried alone, and those that fail alone are dropped; if none does (the failure needs
    several groups together), the shortest failing prefix of the remaining groups is found by bisection
    and its last group is dropped. Each round drops at least one group, so it ends."""
    ref = reference_output(model, example_inputs) if reference is None else reference
    removed = [list(r) for r in removed]
    active = [i for i, r in enumerate(removed) if r]

    def check(idx: Sequence[int]):
        return run_check(model, example_inputs, [(groups[i], removed[i]) for i in idx], reference=ref)

    dropped: list[dict[str, Any]] = []

    def drop(i: int, why) -> None:
        dropped.append({"group": i, "origin": groups[i].origin, "module": why.module, "error": why.error})
        removed[i] = []
        active.remove(i)

    failure = check(active)
    while failure is not None and active:
        near = [i for i in active if _near(groups[i], failure.module)]
        found = False
        for i in near:
            alone = check([i])
            if alone is not None:
                drop(i, alone)
                found = True
        if not found:
            lo, hi = 0, len(active)  # active[:lo] runs, active[:hi] fails
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if check(active[:mid]) is None:
                    lo = mid
                else:
                    hi = mid
            drop(active[hi - 1], check(active[:hi]) or failure)
        failure = check(active)
    return removed, dropped


def _near(group: Group, module: str) -> bool:
    """The group has a tensor in `module`, in a module inside it, or in a module containing it."""
    if not module:
        return True
    for m in group.modules:
        if m == module or m.startswith(module + ".") or module.startswith(m + ".") or m == "":
            return True
    return False


def _drop_broken(work, example_inputs, groups, removed, ref, excluded, reselect):
    """Select, check on fake tensors, drop the groups that break the model, select again without
    them; returns the final removed lists. `excluded` collects the dropped groups' records."""
    while True:
        _, dropped = find_breaking_groups(work, example_inputs, groups, removed, ref)
        if not dropped:
            return removed
        for d in dropped:
            excluded[d["group"]] = d
        removed = reselect()  # each pass excludes at least one more group, so this ends


def _real_forward_failure(model: nn.Module, example_inputs: Any) -> str | None:
    """Last resort where fake tensors cannot run the model: one real forward in eval mode, training
    flags and buffers restored afterwards. The error text, or None."""
    from .graph.trace import preserved

    try:
        with preserved(model), torch.no_grad():
            model.eval()
            call_with(model, example_inputs)
    except Exception as e:  # the answer, not a crash
        return f"{type(e).__name__}: {e}"
    return None


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
    RegularizedOptimizer gets the groups of the pruned model. `dry_run=True` only returns the plan and
    does not touch the model (MACs are counted on fake tensors).
    importance: "l1" | "l2" | "bn_scale" | "taylor" | "random" | callable(group) -> tensor[group.size];
    normalizer: "mean" | "max" | None (per group, as in Torch-Pruning); seed: for "random".

    All or nothing: arguments and every round's target are validated first, and if a round fails the
    model and optimizer are restored. With `example_inputs`, each round's plan is first run on fake
    tensors; groups whose pruning would break the model are left out of the plan with a warning naming
    each group, the module that broke and the error (`plan.info["dropped"]`), and the rest is pruned.
    """
    model = unwrap(model)
    optimizer = resolve_optimizer(optimizer)  # the RegularizedOptimizer inside accelerate/Lightning wrappers
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(
            f"tritonprune.prune: parameter {meta!r} is on the meta device: choosing channels needs real weights. "
            "Load the weights first, or apply a saved plan with PrunePlan.load(path).apply(model)"
        )
    ratio = _check_arguments(ratio, target_params, target_macs, max_ratio, round_to, steps, importance)
    target = target_params if target_params is not None else target_macs
    layer_ratios = _check_layer_ratios(model, dict(layer_ratios or {}))
    ignored_layers = list(ignored_layers)
    ignored = sorted(resolve_ignored(model, ignored_layers))

    if groups is None and not ignored_layers and hasattr(optimizer, "reset_groups"):
        groups = list(optimizer.groups)  # prune what the RegularizedOptimizer regularized; no new trace
    elif groups is None:
        groups = find_groups(model, example_inputs, ignored_layers=ignored_layers)
    else:
        groups = [g for g in groups if not _touches(g, ignored)]
    groups = list(groups)
    _check_layer_ratios_match(groups, layer_ratios)
    if not groups:
        warnings.warn(
            f"tritonprune.prune: {type(model).__name__} has no prunable channel groups (every channel reaches an "
            "output, is ignored, or no layer has prunable weights); nothing is pruned",
            stacklevel=2,
        )

    tensors = model_tensors(model)
    shapes0 = {n: list(tensors[n].shape) for g in groups for n in dict.fromkeys(s.name for s in g.slots) if n in tensors}
    params0 = count_params(model)
    macs0, ref = None, None
    if example_inputs is not None:
        counting, counted = mac_counting()  # MACs are counted in the run check's reference pass
        try:
            ref = reference_output(model, example_inputs, context=counting)
            macs0 = counted()
        except RunCheckUnavailable as e:
            ref = e  # checked by a real forward after slicing instead; MACs unknown
    if target_macs is not None and macs0 is None:
        raise ValueError("target_macs needs example_inputs the model runs on fake tensors with")
    param_names = {s.name for g in groups for s in g.slots if not s.is_buffer}
    if target is not None and steps > 1 and max_ratio == 1 and not layer_ratios and groups:
        # every round's goal is on the way to the last one: refuse an unreachable target before round 1
        def metric0(cuts):
            if target_params is not None:
                return _params_after(shapes0, params0, cuts, param_names)
            return _macs_after(shapes0, shapes0, macs0, cuts)

        ones = [torch.ones(g.size) for g in groups]
        _search(lambda r: select(groups, ones, r, global_pruning, {}, 1.0, round_to), groups, shapes0, metric0,
                target)

    work = copy.deepcopy(model) if dry_run and steps > 1 else model
    excluded: dict[int, dict[str, Any]] = {}
    alive = [list(range(g.size)) for g in groups]  # original channel ids still present, per group
    cur_groups = groups
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    txn = Transaction(model, optimizer) if not dry_run else None
    try:
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
                    live = [None if i in excluded else x for i, x in enumerate(imps)]
                    return select(groups, live, r, global_pruning, layer_ratios, max_ratio, round_to)

                def reselect(choose=choose, groups=cur_groups, shapes=cur_shapes, metric=metric, goal=goal):
                    return _search(choose, groups, shapes, metric, goal)
            else:
                r = iterative_ratios(ratio, steps)[step - 1]
                lr = {k: iterative_ratios(v, steps)[step - 1] for k, v in layer_ratios.items()}

                def reselect(r=r, lr=lr, imps=imps, groups=cur_groups):
                    live = [None if i in excluded else x for i, x in enumerate(imps)]
                    return select(groups, live, r, global_pruning, lr, max_ratio, round_to)

            removed = reselect()
            if ref is not None and not isinstance(ref, Exception) and any(removed):
                removed = _drop_broken(work, example_inputs, cur_groups, removed, ref, excluded, reselect)
            step_plan = PrunePlan(_class_name(model), list(cur_groups), removed, cur_shapes)
            for a, rem in zip(alive, removed):
                gone = set(rem)
                a[:] = [c for j, c in enumerate(a) if j not in gone]
            if steps > 1 or not dry_run:
                if step < steps:
                    cur_groups = step_plan.remap(cur_groups, work)
                step_plan.apply(work, optimizer if work is model else None, check_run=False)
                if isinstance(ref, Exception) and any(removed):
                    err = _real_forward_failure(work, example_inputs)
                    if err is not None:
                        raise ValueError(
                            f"tritonprune.prune: the pruned model no longer runs its example inputs ({err}); "
                            "the model and optimizer were restored. Put the modules named in the error in "
                            "ignored_layers"
                        )
    except BaseException:
        if txn is not None:
            txn.restore()
        raise

    if excluded:
        warnings.warn(
            "tritonprune.prune: left these groups out of the plan, pruning them would break the model:\n  "
            + "\n  ".join(
                f"group {d['group']} ({d['origin']!r}) breaks {_where(model, d['module'])}: {d['error']}"
                for d in excluded.values()
            )
            + "\nthe other groups were pruned",
            stacklevel=2,
        )
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
    if excluded:
        plan.info["dropped"] = list(excluded.values())
    spec = input_spec(example_inputs) if example_inputs is not None else None
    if spec is not None:
        plan.info["example_inputs"] = spec
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
