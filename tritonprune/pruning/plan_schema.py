"""Validation of PrunePlans: the JSON schema and the consistency of every group, without a model.

A plan is refused, with an error naming the group (index and origin) and the slot, for: a missing or
unknown key; a value of the wrong type (ints must be ints, not floats, strings or bools); negative
offsets or starts; a slot reaching past its group's channels or past its tensor (per the plan's
recorded shapes); a slot naming a tensor the plan does not list, or a tensor of another module; two
slots claiming the same indices of one tensor dim; a group whose channels are not all owned by some
slot; duplicated or out-of-range removed channels, every channel removed, unequal counts per block,
or part of a unit (head) removed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..graph.group import AFFINE, IN, OUT, STAT, Group, HeadInput, Slot

ROLES = (OUT, IN, AFFINE, STAT)
TOP_KEYS = {"format", "version", "model_class", "groups", "shapes", "info"}
GROUP_KEYS = {"size", "blocks", "unit", "exact", "origin", "removed", "slots", "inputs", "readers"}
INPUT_KEYS = {"module", "arg", "dim", "heads", "channels"}
GROUP_REQUIRED = {"size", "removed", "slots"}
_TYPES = {"str": str, "int": int, "bool": bool}

FORMAT = "tritonprune.PrunePlan"
VERSION = 1


class PlanError(ValueError):
    """A plan that is malformed or inconsistent (a ValueError)."""


def _slot_fields() -> dict[str, tuple[type, bool]]:
    """Slot field -> (type, required), from the dataclass itself."""
    out = {}
    for f in dataclasses.fields(Slot):
        t = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        out[f.name] = (t, f.default is dataclasses.MISSING)
    return out


def _is(v: Any, t: type) -> bool:
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)


def _where(gi: int, origin: Any = None, si: int | None = None, name: Any = None) -> str:
    w = f"plan group {gi}" + (f" ({origin!r})" if origin else "")
    if si is not None:
        w += f", slot {si}" + (f" ({name})" if isinstance(name, str) else "")
    return w


def _keys(d: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise PlanError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = sorted(required - set(d))
    if missing:
        raise PlanError(f"{where}: missing key(s) {missing}")
    unknown = sorted(set(d) - allowed, key=str)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}")


def _typed(v: Any, t: type, where: str, key: str) -> Any:
    if not _is(v, t):
        raise PlanError(f"{where}: {key} must be {t.__name__}, got {v!r} ({type(v).__name__})")
    return v


def parse(d: Any) -> tuple[str, list[Group], list[list[int]], dict[str, list[int]], dict[str, Any]]:
    """(model_class, groups, removed, shapes, info) of a plan dict; raises PlanError on any flaw."""
    if not isinstance(d, Mapping):
        raise PlanError(f"a plan must be a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise PlanError(f"not a tritonprune plan (format {d.get('format')!r})")
    if d.get("version") != VERSION or isinstance(d.get("version"), bool):
        raise PlanError(f"plan version {d.get('version')!r} is not supported (expected {VERSION})")
    _keys(d, TOP_KEYS, TOP_KEYS - {"info"}, "plan")
    model_class = _typed(d["model_class"], str, "plan", "model_class")
    info = d.get("info", {})
    if not isinstance(info, Mapping):
        raise PlanError(f"plan: info must be an object, got {type(info).__name__}")
    shapes_in = d["shapes"]
    if not isinstance(shapes_in, Mapping):
        raise PlanError(f"plan: shapes must be an object of tensor name -> shape, got {type(shapes_in).__name__}")
    shapes: dict[str, list[int]] = {}
    for n, s in shapes_in.items():
        if not isinstance(n, str) or not isinstance(s, (list, tuple)):
            raise PlanError(f"plan shapes[{n!r}]: expected a list of ints, got {s!r}")
        if not all(_is(x, int) and x >= 0 for x in s):
            raise PlanError(f"plan shapes[{n!r}]: sizes must be non-negative ints, got {s!r}")
        shapes[n] = list(s)
    groups_in = d["groups"]
    if not isinstance(groups_in, (list, tuple)):
        raise PlanError(f"plan: groups must be a list, got {type(groups_in).__name__}")
    fields = _slot_fields()
    groups, removed = [], []
    for gi, g in enumerate(groups_in):
        where = _where(gi, g.get("origin") if isinstance(g, Mapping) else None)
        _keys(g, GROUP_KEYS, GROUP_REQUIRED, where)
        size = _typed(g["size"], int, where, "size")
        blocks = _typed(g.get("blocks", 1), int, where, "blocks")
        unit = _typed(g.get("unit", 1), int, where, "unit")
        exact = _typed(g.get("exact", True), bool, where, "exact")
        origin = _typed(g.get("origin", ""), str, where, "origin")
        readers = g.get("readers", [])
        if not isinstance(readers, (list, tuple)):
            raise PlanError(f"{where}: readers must be a list of module names, got {type(readers).__name__}")
        for x in readers:
            _typed(x, str, where, "every reader")
        rem = g["removed"]
        if not isinstance(rem, (list, tuple)):
            raise PlanError(f"{where}: removed must be a list of channel indices, got {type(rem).__name__}")
        for x in rem:
            _typed(x, int, where, "every removed index")
        slots_in = g["slots"]
        if not isinstance(slots_in, (list, tuple)):
            raise PlanError(f"{where}: slots must be a list, got {type(slots_in).__name__}")
        slots = []
        for si, s in enumerate(slots_in):
            sw = _where(gi, origin, si, s.get("name") if isinstance(s, Mapping) else None)
            _keys(s, set(fields), {k for k, (_, req) in fields.items() if req}, sw)
            for k, v in s.items():
                _typed(v, fields[k][0], sw, k)
            slots.append(Slot(**s))
        inputs = tuple(_head_input(h, size, f"{where}, input {i}") for i, h in enumerate(g.get("inputs", [])))
        groups.append(
            Group(size=size, slots=tuple(slots), blocks=blocks, unit=unit, exact=exact, origin=origin, index=gi,
                  inputs=inputs, readers=tuple(readers))
        )
        removed.append(list(rem))
    check_groups(groups, removed, shapes)
    return model_class, groups, [sorted(r) for r in removed], shapes, dict(info)


def _head_input(h: Any, size: int, where: str) -> HeadInput:
    """One module argument narrowed to the kept heads (optional key `inputs`; plans before it have none)."""
    _keys(h, INPUT_KEYS, INPUT_KEYS, where)
    for k in ("module", "arg"):
        _typed(h[k], str, where, k)
    for k in ("dim", "heads"):
        if not _is(h[k], int) or h[k] < 0:
            raise PlanError(f"{where}: {k} must be a non-negative int, got {h[k]!r}")
    chans = h["channels"]
    if not isinstance(chans, (list, tuple)) or len(chans) != h["heads"] or len(set(chans)) != len(chans) \
            or not all(_is(c, int) and 0 <= c < size for c in chans):
        raise PlanError(f"{where}: channels must list {h['heads']} distinct group channels in [0, {size}), got {chans!r}")
    return HeadInput(h["module"], h["arg"], h["dim"], h["heads"], tuple(chans))


def check_groups(groups: Sequence[Group], removed: Sequence[Sequence[int]], shapes: Mapping[str, Sequence[int]]) -> None:
    """Consistency of every group and its removed channels against the plan's tensor shapes."""
    if len(groups) != len(removed):
        raise PlanError(f"plan: {len(groups)} groups but {len(removed)} removed lists")
    claimed: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for gi, (g, rem) in enumerate(zip(groups, removed)):
        where = _where(gi, g.origin)
        for key in ("size", "blocks", "unit"):
            v = getattr(g, key)
            if not _is(v, int) or v < 1:
                raise PlanError(f"{where}: {key} must be a positive int, got {v!r}")
        if (g.size // g.unit) * g.unit != g.size or (g.size // g.unit) % g.blocks:
            raise PlanError(
                f"{where}: size {g.size} does not split into {g.blocks} blocks of whole units of {g.unit}"
            )
        _check_removed(g, rem, where)
        if not g.slots:
            raise PlanError(f"{where}: a group needs at least one slot")
        spans = []
        for si, s in enumerate(g.slots):
            sw = _where(gi, g.origin, si, s.name)
            lo, hi = _check_slot(g, s, shapes, sw)
            spans.append((s.offset, s.offset + s.length))
            for olo, ohi, ow in claimed.get((s.name, s.dim), ()):
                if lo < ohi and olo < hi:
                    raise PlanError(
                        f"{sw}: indices {lo}..{hi - 1} of dim {s.dim} are also claimed by {ow}; "
                        "two slots cannot own the same indices"
                    )
            claimed.setdefault((s.name, s.dim), []).append((lo, hi, sw))
        reach = 0  # channels [0, reach) are owned by some slot
        for lo, hi in sorted(spans):
            if lo > reach:
                break
            reach = max(reach, hi)
        if reach < g.size:
            raise PlanError(
                f"{where}: channel {reach} of {g.size} is owned by no slot (slot lengths do not add up to size)"
            )


def _check_removed(g: Group, rem: Sequence[int], where: str) -> None:
    bad = [x for x in rem if not _is(x, int)]
    if bad:
        raise PlanError(f"{where}: removed indices must be ints, got {bad[0]!r}")
    if len(set(rem)) != len(rem):
        dup = sorted({x for x in rem if list(rem).count(x) > 1})
        raise PlanError(f"{where}: removed channel(s) {dup[:5]} listed twice")
    out = [x for x in rem if not 0 <= x < g.size]
    if out:
        raise PlanError(f"{where}: removed channel {out[0]} is out of range [0, {g.size})")
    if len(rem) == g.size:
        raise PlanError(f"{where}: a plan may not remove every channel of a group")
    cb = g.size // g.blocks
    if g.blocks > 1:
        per = [0] * g.blocks
        for x in rem:
            per[x // cb] += 1
        if len(set(per)) > 1:
            raise PlanError(
                f"{where}: removes {per} channels from its {g.blocks} blocks; grouped layers need the same "
                "count removed from every block"
            )
    if g.unit > 1:
        units: dict[int, int] = {}
        for x in rem:
            units[x // g.unit] = units.get(x // g.unit, 0) + 1
        if any(n != g.unit for n in units.values()):
            raise PlanError(f"{where}: channels must be removed in whole runs of {g.unit} (whole heads)")


def _check_slot(g: Group, s: Slot, shapes: Mapping[str, Sequence[int]], sw: str) -> tuple[int, int]:
    """Raise on a slot that does not fit; return the index range [lo, hi) it owns along its dim."""
    for key in ("name", "module", "kind", "role"):
        if not isinstance(getattr(s, key), str):
            raise PlanError(f"{sw}: {key} must be a string, got {getattr(s, key)!r}")
    for key, low in (("dim", 0), ("offset", 0), ("length", 1), ("start", 0), ("repeat", 1), ("blocks", 1)):
        v = getattr(s, key)
        if not _is(v, int) or v < low:
            raise PlanError(f"{sw}: {key} must be an int >= {low}, got {v!r}")
    for key in ("is_bias", "is_buffer"):
        if not isinstance(getattr(s, key), bool):
            raise PlanError(f"{sw}: {key} must be true or false, got {getattr(s, key)!r}")
    if s.role not in ROLES:
        raise PlanError(f"{sw}: role {s.role!r} is not one of {ROLES}")
    owner = s.name.rpartition(".")[0]
    if owner != s.module:
        raise PlanError(f"{sw}: tensor {s.name!r} does not belong to the slot's module {s.module!r}")
    if s.offset + s.length > g.size:
        raise PlanError(
            f"{sw}: covers group channels {s.offset}..{s.offset + s.length - 1}, the group has {g.size}"
        )
    if s.name not in shapes:
        raise PlanError(f"{sw}: tensor {s.name!r} is not listed in the plan's shapes")
    shape = shapes[s.name]
    if s.dim >= len(shape):
        raise PlanError(f"{sw}: dim {s.dim} does not exist in shape {tuple(shape)}")
    n = shape[s.dim]
    if s.blocks > 1:
        per = s.length // s.blocks
        if s.length % s.blocks or s.dim == 0 or s.repeat != 1 or shape[0] % s.blocks or s.start + per > n:
            raise PlanError(
                f"{sw}: a blocked slot ({s.blocks} blocks of {s.length / s.blocks:g} on dim {s.dim}, repeat {s.repeat}) "
                f"does not fit shape {tuple(shape)}"
            )
        if g.blocks % s.blocks and s.blocks % g.blocks:
            raise PlanError(f"{sw}: {s.blocks} blocks do not nest in the group's {g.blocks}")
        return s.start, s.start + per
    hi = s.start + s.length * s.repeat
    if hi > n:
        raise PlanError(
            f"{sw}: covers indices {s.start}..{hi - 1} of dim {s.dim}, but shape {tuple(shape)} has {n}"
        )
    return s.start, hi
