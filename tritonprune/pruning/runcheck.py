"""Does a (planned) pruned model still run? A forward on fake tensors, with no compute and no side effects.

The model's module tree is copied with every parameter, buffer and tensor attribute replaced by a
meta tensor (the copy shares no storage with the model and costs no memory), the plan is sliced onto
the copy with the real slicing code (so module attributes, attention head counts and config fields are
updated exactly as `apply` would), and the copy then runs the example inputs under torch's
`FakeTensorMode`: shapes, dtypes and devices propagate, nothing is computed. Hooks are not copied
(user hooks could write to real state); config objects are copied, since slicing writes to them.

A forward-hook stack on the copy names the innermost module that was running when the forward
failed. The output is compared with the unpruned copy's: same pytree structure, and the same shape
and dtype for every tensor leaf.

    failure = run_check(model, example_inputs, plan)   # None: the pruned model runs (plan or (group, removed) pairs)
    failure.module, failure.error                      # where and why it broke
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..graph.fingerprint import fingerprint
from ..graph.group import Group
from ..graph.outputs import free_leaves, leaf_paths
from ..graph.outputs import normalize as normalize_outputs
from .counting import MacCount, mac_counting
from .fake_run import RunFailure, fake_forward, prepared_copy
from .module_attrs import Choices, Settled
from .module_attrs import input_spec as attr_input_spec
from .selection import width
from .slicing import apply_cuts, build_cuts, model_tensors

__all__ = ["RunCheckUnavailable", "reference_output", "Reference", "Checked", "run_check", "input_spec",
           "inputs_from_spec", "find_breaking_groups"]


@dataclass
class Reference:
    """The unpruned model's output structure on fake tensors: in eval mode, and in train mode when the
    model is in training mode (None otherwise, or when train mode cannot run on fake tensors)."""

    eval: tuple[Any, list[Any]]
    train: tuple[Any, list[Any]] | None = None
    free_outputs: tuple[Any, ...] = ()  # output entries whose width may change (graph/outputs.py)
    # the real clone the eval pass ran on, handed once to the first check of the same, unchanged model
    # (a clone costs as much memory traffic as the model's size); see `_spare_copy`
    spare: tuple[int, str, nn.Module] | None = field(default=None, repr=False, compare=False)

    def offer(self, model: nn.Module, clone: nn.Module) -> None:
        """`clone` (a real clone that ran in eval mode only) stands for `model` as it is now: the next
        check of `model`, if it is still unchanged, slices it instead of cloning again (prune's rounds)."""
        self.spare = (id(model), fingerprint(model), clone)

    def _spare_copy(self, model: nn.Module) -> nn.Module | None:
        """The unsliced clone of `model` the reference ran on, once, if `model` is the model it was made
        from with the same tensor names and shapes (a `Reference` is reused across prune's rounds)."""
        spare, self.spare = self.spare, None
        if spare is not None and spare[0] == id(model) and spare[1] == fingerprint(model):
            return spare[2]
        return None


@dataclass
class Checked:
    """What a passing run check learned about the pruned copy it ran, for the real slicing to reuse: the
    attribute values slicing settled on (module_attrs.Settled) and the MACs of its eval forward."""

    attrs: Settled | None = None
    macs: MacCount | None = None
    clone: nn.Module | None = None  # the sliced real clone it ran, if it ran in eval mode only


def run_check(
    model: nn.Module,
    example_inputs: Any,
    removals: Iterable[tuple[Any, Any]] | Any = None,
    *,
    reference: Reference | None = None,
    learned: Checked | None = None,
) -> RunFailure | None:
    """None if `model` with `removals` (a PrunePlan, or (group, removed channels) pairs)
    sliced off still runs `example_inputs` with the same output structure as the unpruned model (in
    eval mode, and in train mode too when the model is training); else where and why it does not.
    `model` is not touched. `reference` (from `reference_output`) saves the unpruned forwards when
    checking many plans of one model. `learned`, if given, is filled when the check passes (`Checked`).

    Raises ValueError if the removals do not fit the model (validation, as `apply` does), and
    RunCheckUnavailable if even the unpruned model cannot run on fake tensors (the check cannot
    tell anything then)."""
    ref = reference_output(model, example_inputs) if reference is None else reference
    removals = list(removals._removals() if hasattr(removals, "_removals") else removals or ())
    # model-code attributes slicing is sure of are verified by this check's own forward; if it fails, the
    # copy is sliced again with slicing's own verification, so the answer is the one that verification gives
    got, deferred = _check(model, example_inputs, removals, ref, learned, defer=True)
    if got is not None and deferred:
        got, _ = _check(model, example_inputs, removals, ref, learned, defer=False)
    return got


def _check(model, example_inputs, removals, ref: Reference, learned: Checked | None, defer: bool):
    c = ref._spare_copy(model) or prepared_copy(model)
    choices = Choices(defer=attr_input_spec(example_inputs) if defer else None)
    if removals:
        cuts = build_cuts(removals, model_tensors(c))
        try:
            apply_cuts(c, cuts, choices=choices)
        except ValueError as e:
            return RunFailure("", f"slicing refused: {e}"), False
    counting, counted = mac_counting()
    for train, expected in ((False, ref.eval), (True, ref.train)):
        if expected is None:
            continue
        got = fake_forward(c, example_inputs, train=train, context=None if train or learned is None else counting)
        if isinstance(got, RunFailure):
            return got, choices.deferred
        diff = _compare(expected, got, ref.free_outputs)
        if diff is not None:
            return diff, choices.deferred
    if learned is not None:
        learned.attrs = choices.settled
        learned.macs = counted()
        learned.clone = c if getattr(c, "_tritonprune_real", False) and ref.train is None else None
    return None, choices.deferred


class RunCheckUnavailable(RuntimeError):
    """The unpruned model itself does not run on fake tensors (data-dependent code, custom ops)."""


def reference_output(
    model: nn.Module, example_inputs: Any, *, context: Callable[[nn.Module], Any] | None = None,
    free_outputs: Any = (),
) -> Reference:
    """Output structure of the unpruned model on fake tensors; raises RunCheckUnavailable if it does
    not run in eval mode. `context` as in `fake_forward`, for the eval pass (prune counts MACs in it).
    The leaves named by `free_outputs` may change their sizes (not their dtype or number of dims)."""
    c = prepared_copy(model)
    got = fake_forward(c, example_inputs, context=context)
    if isinstance(got, RunFailure):
        raise RunCheckUnavailable(f"the unpruned model does not run on fake tensors ({got})")
    train = None
    if model.training:
        t = fake_forward(c, example_inputs, train=True)
        train = None if isinstance(t, RunFailure) else t
    ref = Reference(got, train, normalize_outputs(free_outputs))
    if getattr(c, "_tritonprune_real", False) and not model.training:
        # a real clone that ran in eval mode only (no statistics moved) serves the first check as its copy;
        # a meta copy holds fake tensors once run and is cheap to make again
        ref.offer(model, c)
    return ref


def _compare(ref: tuple[Any, list[Any]], got: tuple[Any, list[Any]], free_outputs: tuple = ()) -> RunFailure | None:
    (spec0, sig0), (spec1, sig1) = ref, got
    if spec0 != spec1:
        return RunFailure("", f"the output structure changed: {spec0} -> {spec1}")
    free = free_leaves(leaf_paths(spec0), free_outputs) if free_outputs else [False] * len(sig0)
    for i, (a, b) in enumerate(zip(sig0, sig1)):
        if free[i] and isinstance(a, tuple) and isinstance(b, tuple) and len(a[0]) == len(b[0]) and a[1] == b[1]:
            continue  # a free output: its sizes may change
        if a != b:
            return RunFailure("", f"output leaf {i} changed from {a} to {b}")
    return None


def find_breaking_groups(
    model: nn.Module,
    example_inputs: Any,
    groups: Sequence[Group],
    removed: Sequence[Sequence[int]],
    reference: Any = None,
    learned: Checked | None = None,
    *,
    equalize: Callable[[list[int], Sequence[Sequence[int]]], dict[int, list[int]]] | None = None,
    ties: list[tuple[int, ...]] | None = None,
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Drop the groups whose pruning stops `model` from running `example_inputs` (checked on fake
    tensors, see run_check): returns the removed lists with those groups emptied, and one
    record per dropped group ({"group", "origin", "module", "error"}).

    While the planned model fails: every group touching the failing module (or a module inside or
    around it) is tried alone, and those that fail alone are dropped; if none does (the failure needs
    several groups together), the shortest failing prefix of the remaining groups is found by bisection
    and its last group is dropped. Each round drops at least one group, so it ends.

    With `equalize` (members, removed -> removed lists of those members keeping equally many channels),
    a group failing alone is first tried tied to the groups of its width (rows) near where it fails, growing
    the tie with the groups near each new failure: a forward that reads a width from its input
    (`reshape(B, C, -1)` of a spatial-reduction conv, `reshape(B, N, C)` after attention) runs when
    both widths keep the same count. A tie that runs is kept (appended to `ties`, its members' removed
    lists equalized) instead of dropping its groups; members of a tie are checked and dropped together.
    `learned`: filled by the check of the removed lists returned (run_check), when they run."""
    ref = reference_output(model, example_inputs) if reference is None else reference
    if learned is not None:
        learned.attrs = learned.macs = learned.clone = None
    removed = [list(r) for r in removed]
    active = [i for i, r in enumerate(removed) if r]
    ties = [] if ties is None else ties
    tie_of = {j: t for t in ties for j in t}  # ties found by an earlier call stay tied

    def with_ties(idx: Sequence[int]) -> list[int]:
        out = dict.fromkeys(idx)
        for i in idx:
            out.update(dict.fromkeys(tie_of.get(i, ())))
        return [i for i in out if i in active]

    def check(idx: Sequence[int], learn: Checked | None = None):
        with warnings.catch_warnings():
            # what the slicing of a trial says (an attribute no choice settles while a group still breaks
            # the model) is not about the plan; the real slicing says it again where it still holds
            warnings.simplefilter("ignore")
            return run_check(model, example_inputs, [(groups[i], removed[i]) for i in with_ties(idx)],
                             reference=ref, learned=learn)

    dropped: list[dict[str, Any]] = []

    def drop(i: int, why) -> None:
        for j in with_ties([i]):
            dropped.append({"group": j, "origin": groups[j].origin, "module": why.module, "error": why.error})
            removed[j] = []
            active.remove(j)

    def tie(i: int, why) -> bool:
        # groups of the same width first; where none ties, groups one of whose equal blocks has that
        # width, or whose width is one block of this one (a part of an equal split read elsewhere)
        return equalize is not None and i not in tie_of and (tie_by(i, why, _same_rows) or tie_by(i, why, _part_rows))

    def tie_by(i: int, why, match: Callable[[Group, Group], bool]) -> bool:
        members, fail = [i], why
        for _ in range(MAX_TIE):
            more = [j for j in active if j not in members and j not in tie_of and match(groups[j], groups[i])
                    and _near(groups[j], fail.module)]
            if not more or not fail.module:
                return False
            members += more
            trial = equalize(members, removed)
            if not any(trial[j] for j in members):
                # whole units leave no common count above zero at this ratio: tied, nothing removed (not
                # broken: a larger ratio, or a target's search with the tie known, cuts them together)
                key = tuple(sorted(members))
                ties.append(key)
                for j in members:
                    removed[j] = []
                    tie_of[j] = key
                    active.remove(j)
                return True
            if not all(trial[j] for j in members):
                return False  # whole units of some member leave no common count
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # as in check()
                fail = run_check(model, example_inputs, [(groups[j], trial[j]) for j in members], reference=ref)
            if fail is None:
                key = tuple(sorted(members))
                ties.append(key)
                for j in members:
                    removed[j] = trial[j]
                    tie_of[j] = key
                return True
        return False

    failure = check(active, learned)
    while failure is not None and active:
        near = [i for i in active if _near(groups[i], failure.module)]
        found = False
        for i in near:
            if i not in active:
                continue  # dropped with its tie in this round
            alone = check([i])
            if alone is not None:
                if not tie(i, alone):
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
        failure = check(active, learned)
    return removed, dropped


MAX_TIE = 64  # groups one tie may grow through (a residual stream reaching that many attention layers)


def _rows(group: Group) -> int:
    """Tensor rows a group spans (a group of whole heads as channels spans heads x head dim)."""
    return group.size * width(group)


def _same_rows(a: Group, b: Group) -> bool:
    return _rows(a) == _rows(b)


def _part_rows(a: Group, b: Group) -> bool:
    """One of the widths each group can be read at (its rows, or one of its equal blocks) is shared."""
    def widths(g: Group) -> set[int]:
        return {_rows(g)} | ({_rows(g) // g.blocks} if g.blocks > 1 else set())
    return bool(widths(a) & widths(b))


def _near(group: Group, module: str) -> bool:
    """The group has a tensor in `module`, in a module inside it, or in a module containing it."""
    if not module:
        return True
    for m in group.modules:
        if m == module or m.startswith(module + ".") or module.startswith(m + ".") or m == "":
            return True
    return False



# ------------------------------------------------------------------------ example inputs in a plan


def input_spec(example_inputs: Any) -> Any | None:
    """A JSON-able description of `example_inputs` (tensor shapes and dtypes, plain values kept), so a
    saved plan can check the model it is applied to; None if some leaf cannot be described."""

    def describe(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {"__tensor__": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return {"__seq__": [describe(v) for v in x], "tuple": isinstance(x, tuple)}
        if isinstance(x, Mapping) and all(isinstance(k, str) for k in x):
            return {"__dict__": {k: describe(v) for k, v in x.items()}}
        raise TypeError(type(x).__name__)

    try:
        return describe(example_inputs)
    except TypeError:
        return None


def inputs_from_spec(spec: Any, device: torch.device | str = "cpu") -> Any:
    """Meta-device example inputs rebuilt from `input_spec` (values are never needed by the check)."""
    if isinstance(spec, dict) and "__tensor__" in spec:
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"plan info: unknown input dtype {spec.get('dtype')!r}")
        return torch.zeros(spec["__tensor__"], dtype=dtype, device=device)
    if isinstance(spec, dict) and "__seq__" in spec:
        items = [inputs_from_spec(v, device) for v in spec["__seq__"]]
        return tuple(items) if spec.get("tuple") else items
    if isinstance(spec, dict) and "__dict__" in spec:
        return {k: inputs_from_spec(v, device) for k, v in spec["__dict__"].items()}
    return spec
