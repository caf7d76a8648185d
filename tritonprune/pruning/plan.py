"""PrunePlan: the channels to remove, as plain data, checked against the model it is applied to.

A PrunePlan lists, for each group, the group channels to remove. Groups name tensors by their
qualified names and the plan records the model's class and the shape of every tensor it touches, so
it is plain JSON, applies to any freshly built model of the same class, and
imated MACs to at most the target; `ratio` is then not used.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .._files import read_json, to_json, write_text
from ..graph.group import (
    AFFINE,
    BATCHNORM,
    CONV,
    CONV_T,
    EMBEDDING,
    GROUPNORM,
    IN,
    LAYERNORM,
    LINEAR,
    OUT,
    STAT,
    Group,
)
from ..graph.outputs import from_json as outputs_from_json
from ..graph.trace import unwrap
from ..wrappers import check_optimizer_owns, resolve_optimizer
from .history import config_snapshot, record_plan
from .module_attrs import Choices
from .plan_schema import FORMAT, VERSION, PlanError, check_groups, parse
from .runcheck import (
    Checked,
    RunCheckUnavailable,
    find_breaking_groups,
    inputs_from_spec,
    reference_output,
    run_check,
)
from .slicing import Cut, apply_cuts, build_cuts, model_tensors, prepare_cuts, remap_groups, zero_channels
from .transaction import Transaction


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
        _check_slot_metadata(model, self.groups)
        return build_cuts(self._removals(), tensors)

    # ------------------------------------------------------------------ actions
    def zero_(self, model: nn.Module) -> nn.Module:
        """Soft pruning: zero the removed channels in place; shapes are unchanged.

        Every slot is validated before any is zeroed, exactly as `apply` validates (the slicing is computed,
        then discarded); on any error the touched tensors are restored."""
        cuts = self.check(model)
        with warnings.catch_warnings():  # apply's notes on attributes it would set do not concern zero_
            warnings.simplefilter("ignore")
            prepare_cuts(unwrap(model), cuts)  # what apply would refuse, zero_ refuses
        touched = [s.name for g, r in self._removals() if r for s in g.slots]
        with Transaction(unwrap(model), values=touched):
            zero_channels(unwrap(model), self._removals())
        return model

    def apply(
        self, model: nn.Module, optimizer: Any = None, *, example_inputs: Any = None, check_run: bool = True,
        _checked: Checked | None = None,
    ) -> nn.Module:
        """Physically remove the channels; slice `optimizer`'s state and hand it the new parameters.

        Everything is validated first. Unless `check_run=False`, the pruned model is first run on fake
        tensors (no compute) with `example_inputs`, or with the example-input shapes `prune` recorded in
        the plan; if it would not run, ValueError names the module whose shapes break and the groups to
        leave out, and nothing is changed. On any error the model and optimizer are left as they were.
        (`_checked`: what `prune`'s run check of these very cuts on a copy of this model learned.)"""
        cuts = self.check(model)
        inner = unwrap(model)
        optimizer = resolve_optimizer(optimizer)  # through accelerate/Lightning wrappers
        check_optimizer_owns(optimizer, inner, "PrunePlan.apply")
        if check_run:
            inputs = example_inputs
            if inputs is None and self.info.get("example_inputs") is not None:
                inputs = inputs_from_spec(self.info["example_inputs"], _device_of(inner))
            if inputs is not None:
                _checked = self._refuse_if_broken(inner, inputs)
        # the attribute values the check settled on a copy are reused where module_attrs proves the
        # slicing identical (same tensors, cuts, candidates and inputs); otherwise verified again here
        choices = Choices(reuse=_checked.attrs if _checked is not None else None)
        before = config_snapshot(inner)
        with Transaction(inner, optimizer):
            apply_cuts(inner, cuts, optimizer, choices)
            record_plan(inner, self, before)  # for tritonprune.save_pretrained
        return model

    def _refuse_if_broken(self, model: nn.Module, inputs: Any) -> Checked | None:
        try:
            free = outputs_from_json(self.info.get("free_outputs", ()))
            ref = reference_output(model, inputs, free_outputs=free)
        except RunCheckUnavailable as e:
            warnings.warn(f"tritonprune: the pruned model could not be checked before slicing: {e}", stacklevel=3)
            return None
        learned = Checked()
        if run_check(model, inputs, self._removals(), reference=ref, learned=learned) is None:
            return learned
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
                    **({"inputs": [dict(asdict(h), channels=list(h.channels)) for h in g.inputs]} if g.inputs else {}),
                    **({"readers": list(g.readers)} if g.readers else {}),
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
        """Write the plan as JSON, atomically: checked to encode first, then a temporary file in the same
        folder replaces `path` (a link at `path` is replaced, never written through). On any error the
        previous file at `path` is left as it was."""
        self.validate()
        write_text(path, to_json(self.to_dict(), f"plan for {os.fspath(path)}"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunePlan:
        """Read a plan written by `save`; PlanError (a ValueError) naming the file for any flaw."""
        try:
            d = read_json(path)
        except ValueError as e:
            raise PlanError(f"not a JSON plan: {e}") from None
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{os.fspath(path)}: {e}") from None


# what tracing gives the slots of a standard module's own tensors: (kinds, role of each local tensor name);
# a weight's role follows its dim (OUT or IN) and is only checked to be one of those
_STANDARD: list[tuple[type, set[str], dict[str, str]]] = [
    (nn.modules.conv._ConvNd, {CONV, CONV_T}, {"weight": "", "bias": OUT}),
    (nn.Linear, {LINEAR, EMBEDDING}, {"weight": "", "bias": OUT}),
    (nn.modules.batchnorm._BatchNorm, {BATCHNORM}, {"weight": AFFINE, "bias": AFFINE, "running_mean": STAT,
                                                     "running_var": STAT}),
    (nn.LayerNorm, {LAYERNORM}, {"weight": AFFINE, "bias": AFFINE}),
    (nn.GroupNorm, {GROUPNORM}, {"weight": AFFINE, "bias": AFFINE}),
]


def _check_slot_metadata(model: nn.Module, groups: Sequence[Group]) -> None:
    """The metadata of every slot against the model (a hand-edited plan could otherwise turn off the
    regularization or importance of a layer): is_buffer always; kind, role and is_bias for the tensors of
    standard layers (conv, linear, batch/layer/group norm), whose slots tracing always labels the same way."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    modules = dict(model.named_modules())
    for gi, g in enumerate(groups):
        for si, s in enumerate(g.slots):
            where = f"plan group {gi} ({g.origin!r}), slot {si} ({s.name})"
            if s.is_buffer == (s.name in params):
                actual = "a buffer" if s.is_buffer is False else "a parameter"
                raise ValueError(f"{where}: is_buffer={s.is_buffer}, but the model's {s.name} is {actual}; the plan "
                                 "was edited or made for another model")
            m = modules.get(s.module)
            local = s.name.rpartition(".")[2]
            for cls, kinds, roles in _STANDARD:
                if not isinstance(m, cls) or local not in roles or getattr(m, local, None) is None:
                    continue
                role = roles[local]
                bad = (f"kind {s.kind!r} (a {type(m).__name__} gives {sorted(kinds)})" if s.kind not in kinds
                       else f"is_bias={s.is_bias}" if s.is_bias != (local == "bias")
                       else f"role {s.role!r} (expected {role!r})" if role and s.role != role and s.kind != EMBEDDING
                       else f"role {s.role!r} (expected 'out' or 'in')" if not role and s.role not in (OUT, IN)
                       and s.kind != EMBEDDING else None)
                if bad:
                    raise ValueError(f"{where}: {bad} does not match the model's {type(m).__name__}; the plan was "
                                     "edited or made for another model")
                break


def _where(model: nn.Module, module: str) -> str:
    return f"module {module!r}" if module else f"the forward of {type(model).__name__} itself (the root module)"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")


# ---------------------------------------------------------------------------------------- selection
