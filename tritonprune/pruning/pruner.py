"""`tritonprune.prune`: trace, rank, select, check on a copy, slice; the model and optimizer restored on any error.

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
  the parameter count / estimated MACs to at most the target; `ratio` is then not used. A target in
  (0, 1) is a fraction of the model's size before pruning (0.5: at most half the parameters); a count
  is an integer >= 1 (2_000_000, or 2e6).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..graph import find_groups, resolve_ignored
from ..graph.assemble import is_ignored
from ..graph.fingerprint import fingerprint
from ..graph.group import IN, Group
from ..graph.outputs import as_json as outputs_as_json
from ..graph.trace import call_with, unwrap
from ..wrappers import check_optimizer_owns, resolve_optimizer
from .counting import MacCount, count_macs, count_params, estimate_macs, mac_counting
from .history import applied_plans, replace_since
from .importance import METHODS, Importance, compute_importance
from .plan import PrunePlan, _class_name, _numel_after, _where
from .runcheck import Checked, RunCheckUnavailable, find_breaking_groups, input_spec, reference_output
from .selection import _ratio_of, _search, equal_counts, evaluate, iterative_ratios, kind_key, select
from .slicing import model_tensors
from .transaction import Transaction


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


def _check_target(t: Any, what: str) -> None:
    """A fraction of the model's current size in (0, 1), or a count: an integer >= 1 (2e6 counts too)."""
    x = _number(t, what)
    if 0 < x < 1 or (x >= 1 and x.is_integer()):
        return
    raise ValueError(
        f"{what}={t!r}: give a fraction of the current size in (0, 1) ({what}=0.5 keeps at most half) "
        f"or a count, an integer >= 1 ({what}=2_000_000)"
    )


def _absolute_target(t: float, total: float) -> float:
    """The count a target stands for: a fraction in (0, 1) of `total`, else `t` itself."""
    return float(t) * total if float(t) < 1 else float(t)


def _check_arguments(ratio, target_params, target_macs, max_ratio, round_to, steps, importance):
    if target_params is not None and target_macs is not None:
        raise ValueError("give target_params or target_macs, not both")
    for what, t in (("target_params", target_params), ("target_macs", target_macs)):
        if t is not None:
            if ratio is not None:
                raise ValueError(f"give a ratio or a target ({what}), not both")
            _check_target(t, what)
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


MAX_STEPS = 1000  # rounds of iterative pruning; each traces, scores and slices the model once


def _check_steps(steps: int, groups: Sequence[Group]) -> None:
    """No more rounds than channels that can go (a round that removes nothing is wasted), nor MAX_STEPS."""
    removable = sum(g.size - g.blocks * g.unit for g in groups)
    limit = min(MAX_STEPS, max(1, removable))
    if steps > limit:
        raise ValueError(
            f"steps={steps} is more rounds than the {removable} channels the groups can lose"
            if limit < MAX_STEPS else f"steps={steps} exceeds the cap of {MAX_STEPS} rounds"
        )


def _check_flags_and_seed(seed: Any, **flags: Any) -> None:
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"tritonprune.prune: {name} must be True or False, got {v!r} ({type(v).__name__})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"tritonprune.prune: seed must be an int in [-2**63, 2**64) or None, got {seed!r}")


def _check_group_list(groups: Any, who: str) -> list[Group]:
    if isinstance(groups, (str, bytes, Group)) or not isinstance(groups, Iterable):
        raise TypeError(f"{who}: expected a list of tritonprune Groups, got {type(groups).__name__}")
    groups = list(groups)
    bad = next((i for i, g in enumerate(groups) if not isinstance(g, Group)), None)
    if bad is not None:
        raise TypeError(f"{who}: groups[{bad}] is a {type(groups[bad]).__name__}, not a tritonprune Group; pass "
                        "tpr.find_groups(model, example_inputs)")
    return groups


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


class _Ties:
    """Groups the run check found tied (they run only keeping equal counts: a forward reads one's width
    from the other's tensor), and the selection with their counts made equal."""

    def __init__(self, groups, imps):
        self.groups, self.imps = groups, imps
        self.members: list[tuple[int, ...]] = []  # filled by runcheck.find_breaking_groups

    def equalize(self, members, removed):
        return equal_counts(self.groups, self.imps, removed, members)

    def apply(self, removed):
        removed = [list(r) for r in removed]
        for t in self.members:
            for j, r in self.equalize(list(t), removed).items():
                removed[j] = r
        return removed


def _drop_broken(work, example_inputs, groups, removed, ref, excluded, reselect, ties, learned, meets_goal=None):
    """Select, check on fake tensors, drop the groups that break the model, select again without
    them; returns the final removed lists. `excluded` collects the dropped groups' records. Groups
    the check finds tied keep equal counts in every reselection (`ties`); with a target
    (`meets_goal`), a selection that ties moved above it is searched again with the ties known.
    `learned` is filled by the check of the lists returned (runcheck.Checked)."""
    searched_with = 0  # ties known to the last search
    while True:
        asked = removed
        removed, dropped = find_breaking_groups(work, example_inputs, groups, ties.apply(removed), ref,
                                                learned, equalize=ties.equalize, ties=ties.members)
        if not dropped:
            if meets_goal is not None and len(ties.members) > searched_with and not meets_goal(removed):
                searched_with = len(ties.members)
                removed = reselect()  # the search's choices are tied now (see prune's choose)
                continue
            _warn_grown_ties(groups, ties.members, asked, removed)
            return removed
        for d in dropped:
            excluded[d["group"]] = d
        try:
            removed = reselect()  # each pass excludes at least one more group, so this ends
        except ValueError as e:  # a target out of reach without the groups left out: say which
            left = "; ".join(f"group {d['group']} ({d['origin']!r}): {d['error']}" for d in excluded.values())
            raise ValueError(f"{e}; reachable only with groups that break the model, left out: {left}") from None


def _warn_grown_ties(groups, ties, asked, removed) -> None:
    """Tied groups rounded to a common count (whole heads next to a residual width) remove more than
    their selection asked, or nothing: say so, naming them."""
    grown = [j for t in ties for j in t if len(removed[j]) > len(asked[j]) or (asked[j] and not removed[j])]
    if grown:
        warnings.warn(
            "tritonprune.prune: these groups only run with another's count (a forward reads one's width from the "
            "other's tensor), rounded to whole heads or blocks of each, away from the requested ratio:\n  "
            + "\n  ".join(f"group {j} ({groups[j].origin!r}): selected {len(asked[j])} of {groups[j].size} channels, "
                           f"removes {len(removed[j])}" for j in grown),
            stacklevel=4,
        )


def _real_forward_failure(model: nn.Module, example_inputs: Any) -> str | None:
    """Last resort where fake tensors cannot run the model: one real forward in eval mode, training
    flags and buffers restored afterwards. The error text, or None."""
    from ..graph.trace import preserved

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
    target_params: float | None = None,
    target_macs: float | None = None,
    bias: bool = False,
    seed: int | None = None,
    allocation: str = "uniform",
    kind_ratios: Mapping[str, float] | None = None,
    free_outputs: Iterable[Any] = (),
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
    allocation: "uniform" (every group, or with `global_pruning` all groups together) or "isomorphic"
    (channels ranked only against structurally identical groups, each kind at its own ratio:
    `kind_ratios={"residual": 0.0, "heads": 0.5, "mlp": 0.75, "conv": ...}`, unnamed kinds at `ratio`,
    or at the searched ratio with a target). See tritonprune/graph/allocation.py.
    free_outputs: model outputs whose width may change (YOLO's `feats`), as in `find_groups`; the run
    check then accepts new sizes for them.

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
    _check_flags_and_seed(dry_run=dry_run, global_pruning=global_pruning, bias=bias, seed=seed)
    check_optimizer_owns(optimizer, model, "tritonprune.prune")
    if groups is not None:
        groups = _check_group_list(groups, "prune(groups=...)")
    if allocation not in ("uniform", "isomorphic"):
        raise ValueError(f"allocation must be 'uniform' or 'isomorphic', got {allocation!r}")
    kind_ratios = {k: _check_ratio(v, f"kind_ratios[{k!r}]") for k, v in dict(kind_ratios or {}).items()}
    if kind_ratios and allocation != "isomorphic":
        raise ValueError("kind_ratios needs allocation='isomorphic'")
    from ..graph.allocation import LABELS

    for k in kind_ratios:
        if k not in LABELS:
            raise ValueError(f"kind_ratios: {k!r} is not one of {LABELS}")
    target = target_params if target_params is not None else target_macs
    layer_ratios = _check_layer_ratios(model, dict(layer_ratios or {}))
    ignored_layers = list(ignored_layers)
    ignored = sorted(resolve_ignored(model, ignored_layers))
    free_outputs = tuple(free_outputs or ())

    if groups is None and not ignored_layers and hasattr(optimizer, "reset_groups"):
        recorded = getattr(optimizer, "groups_fingerprint", None)
        if recorded is not None and recorded != fingerprint(model):
            raise ValueError(
                "tritonprune.prune: the model's parameters or buffers changed (added, removed, reshaped or "
                "retyped) since the optimizer's groups were found, so they may no longer describe its channels; "
                "nothing was changed. Pass groups=tpr.find_groups(model, example_inputs), or update the optimizer "
                "with optimizer.reset_groups(tpr.find_groups(model, example_inputs))"
            )
        groups = list(optimizer.groups)  # prune what the RegularizedOptimizer regularized; no new trace
    elif groups is None:
        groups = find_groups(model, example_inputs, ignored_layers=ignored_layers, free_outputs=free_outputs)
    else:
        groups = [g for g in groups if not _touches(g, ignored)]
    groups = list(groups)
    _check_steps(steps, groups)
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
            ref = reference_output(model, example_inputs, context=counting, free_outputs=free_outputs)
            macs0 = counted()
        except RunCheckUnavailable as e:
            ref = e  # checked by a real forward after slicing instead; MACs unknown
    if target_macs is not None and macs0 is None:
        raise ValueError("target_macs needs example_inputs the model runs on fake tensors with")
    if target is not None:
        target = _absolute_target(target, params0 if target_params is not None else macs0.total)
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
    recorded = len(applied_plans(unwrap(model)))
    notes: list = []  # rounding of the last local selection (heads, round_to), warned about once
    found_ratio: list = []  # (ratio, selection) of each evaluated ratio of a target search
    removed_last = None
    try:
        for step in range(1, steps + 1):
            cur_tensors = model_tensors(work)
            cur_shapes = {n: list(cur_tensors[n].shape) for n in shapes0}
            imps = compute_importance(
                work, cur_groups, importance, normalizer=normalizer, bias=bias, generator=gen
            )
            kinds = [kind_key(g, cur_shapes) for g in cur_groups] if allocation == "isomorphic" else None
            ties = _Ties(cur_groups, imps)
            meets_goal = None
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

                def choose(r: float, groups=cur_groups, imps=imps, kinds=kinds, ties=ties) -> list[list[int]]:
                    live = [None if i in excluded else x for i, x in enumerate(imps)]
                    out = ties.apply(select(groups, live, r, global_pruning, layer_ratios, max_ratio, round_to,
                                            kinds, kind_ratios))
                    found_ratio.append((r, out))
                    return out

                def reselect(choose=choose, groups=cur_groups, shapes=cur_shapes, metric=metric, goal=goal):
                    return _search(choose, groups, shapes, metric, goal)

                def meets_goal(removed, groups=cur_groups, shapes=cur_shapes, metric=metric, goal=goal):
                    return evaluate(groups, shapes, metric, removed) <= goal
            else:
                r = iterative_ratios(ratio, steps)[step - 1]
                lr = {k: iterative_ratios(v, steps)[step - 1] for k, v in layer_ratios.items()}

                kr = {k: iterative_ratios(v, steps)[step - 1] for k, v in kind_ratios.items()}

                def reselect(r=r, lr=lr, kr=kr, imps=imps, groups=cur_groups, kinds=kinds):
                    live = [None if i in excluded else x for i, x in enumerate(imps)]
                    notes.clear()
                    return select(groups, live, r, global_pruning, lr, max_ratio, round_to, kinds, kr,
                                  notes if steps == 1 else None)

            found_ratio.clear()
            removed = reselect()
            checked = None  # what the run check of this round's cuts learned on its copy
            if ref is not None and not isinstance(ref, Exception) and any(removed):
                checked = Checked()
                removed = _drop_broken(work, example_inputs, cur_groups, removed, ref, excluded, reselect, ties,
                                       checked, meets_goal)
            removed_last = removed
            step_plan = PrunePlan(_class_name(model), list(cur_groups), removed, cur_shapes)
            for a, rem in zip(alive, removed):
                gone = set(rem)
                a[:] = [c for j, c in enumerate(a) if j not in gone]
            if steps > 1 or not dry_run:
                if step < steps:
                    cur_groups = step_plan.remap(cur_groups, work)
                step_plan.apply(work, optimizer if work is model else None, check_run=False, _checked=checked)
                if step < steps and checked is not None and checked.clone is not None:
                    # the check's clone, sliced by the same cuts, is the model as it is now: the next
                    # round's check slices it further instead of cloning the model again
                    ref.offer(work, checked.clone)
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

    if notes:
        warnings.warn(
            "tritonprune.prune: whole heads / norm groups / round_to moved these groups away from the requested "
            "ratio:\n  "
            + "\n  ".join(f"group {i} ({groups[i].origin!r}, {groups[i].size} channels"
                          f"{f', heads of {groups[i].unit}' if groups[i].unit > 1 else ''}"
                          f"{f', {groups[i].blocks} blocks kept equal' if groups[i].blocks > 1 else ''}): asked {r:.3g}, "
                          f"removes {got:.3g}" for i, r, got in notes),
            stacklevel=2,
        )
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
        "allocation": allocation,
        "steps": steps,
        "params_before": params0,
        "params_after": _params_after(shapes0, params0, cuts, param_names),
    }
    if kind_ratios:
        plan.info["kind_ratios"] = dict(kind_ratios)
    searched = [r for r, out in found_ratio if out == removed_last]  # the run check returns copies
    if target is not None and steps == 1 and searched:
        plan.info["searched_ratio"] = searched[0]  # the ratio the target gave (for GrowingReg(ratio=...))
    if excluded:
        plan.info["dropped"] = list(excluded.values())
    if free_outputs:
        plan.info["free_outputs"] = outputs_as_json(free_outputs)
    spec = input_spec(example_inputs) if example_inputs is not None else None
    if spec is not None:
        plan.info["example_inputs"] = spec
    if macs0 is not None:
        plan.info["macs_before"] = macs0.total
        plan.info["macs_after"] = _macs_after(shapes0, shapes0, macs0, cuts)
        if not dry_run and any(removed_all):
            # the estimate keeps activation-activation products (attention scores) at their old size:
            # count the pruned model itself, so the plan reports what it made: the last round's run check
            # counted it on its copy (sliced by the same cuts, attributes as the model got them), else a
            # forward of a copy of the model now
            if checked is not None and checked.macs is not None:
                plan.info["macs_after"] = checked.macs.total
            else:
                try:
                    plan.info["macs_after"] = count_macs(model, example_inputs, real_fallback=False).total
                except Exception:  # the estimate stays; counting must never fail a prune that succeeded
                    plan.info["macs_after_is_estimate"] = True
        elif any(removed_all) and macs0.unattributed:
            plan.info["macs_after_is_estimate"] = True  # dry run: attention products counted unpruned
        plan.info["macs_by_weight"] = dict(macs0.by_weight)
    if not dry_run:
        replace_since(unwrap(model), recorded, plan)  # save_pretrained writes this plan, info included
    return plan
