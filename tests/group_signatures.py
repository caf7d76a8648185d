"""Group signatures: what a list of groups says, as plain tuples, to compare two tracers' groups.

A group's signature holds its size, blocks, unit, exactness, origin and every slot's (name, module, kind,
role, dim, offset, length, start, repeat, blocks, is_bias, is_buffer), in order; a list of groups gives
the list of signatures, in order. Equal signatures mean the same channels are pruned the same way.
"""

from __future__ import annotations

import warnings

import tritonprune as tpr


def slot_signature(s) -> tuple:
    return (s.name, s.module, s.kind, s.role, s.dim, s.offset, s.length, s.start, s.repeat, s.blocks,
            s.is_bias, s.is_buffer)


def group_signature(g) -> tuple:
    return (g.size, g.blocks, g.unit, g.exact, g.origin, tuple(slot_signature(s) for s in g.slots))


def signatures(groups) -> list[tuple]:
    return [group_signature(g) for g in groups]


def both_tracers(model, example_inputs, **kwargs) -> tuple[list[tuple], list[tuple]]:
    """(export signatures, record signatures) of one model, warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = signatures(tpr.find_groups(model, example_inputs, tracer="export", **kwargs))
        new = signatures(tpr.find_groups(model, example_inputs, tracer="record", **kwargs))
    return old, new


def difference(old: list[tuple], new: list[tuple]) -> str:
    """A short description of how two signature lists differ ('' if equal)."""
    if old == new:
        return ""
    lines = [f"{len(old)} groups (export) vs {len(new)} (record)"]
    so, sn = set(old), set(new)
    for sig in [s for s in old if s not in sn][:3]:
        lines.append(f"  only export: size {sig[0]} origin {sig[4]} slots {[x[0] for x in sig[5]][:6]}")
    for sig in [s for s in new if s not in so][:3]:
        lines.append(f"  only record: size {sig[0]} origin {sig[4]} slots {[x[0] for x in sig[5]][:6]}")
    if so == sn:
        lines.append("  same groups, different order")
    return "\n".join(lines)
