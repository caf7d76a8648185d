"""Model outputs whose width may change (`free_outputs`): naming them, and matching them to output leaves.

Every channel reaching a model output is normally kept, since the caller reads the output at its
width. Some models return intermediate features next to their prediction (Ultralytics YOLO's eval
output carries the neck's feature maps, `feats`); the user can say those may shrink. An entry names
output leaves by their pytree path (what `torch.utils._pytree.tree_flatten_with_path` gives):

- a tuple of keys/indices, e.g. `(1, "feats")`: the leaves under that path prefix;
- an int `i`: the leaves under position `i` of a tuple/list output;
- a str `"feats"`: the leaves under a dict key or attribute of that name, at any depth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch.utils import _pytree as pytree

Path = tuple[Any, ...]


def key_of(k: Any) -> Any:
    """A pytree key entry as the plain key or index it stands for."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def leaf_paths(spec: pytree.TreeSpec) -> list[Path]:
    """The path of every leaf of an output with pytree structure `spec`, in flattening order."""
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    flat, _ = pytree.tree_flatten_with_path(dummy)
    return [tuple(key_of(k) for k in path) for path, _ in flat]


def normalize(free_outputs: Iterable[Any] | None) -> tuple[Any, ...]:
    entries = tuple(free_outputs or ())
    for e in entries:
        if not isinstance(e, (str, int, tuple)) or isinstance(e, bool):
            raise TypeError(f"free_outputs: {e!r} is not an output name (str), position (int) or path (tuple)")
    return entries


def as_json(entries: Iterable[Any]) -> list[Any]:
    """The entries as a plan's JSON keeps them (a path tuple as a list); `from_json` reads them back."""
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def from_json(items: Iterable[Any]) -> tuple[Any, ...]:
    return normalize(tuple(e) if isinstance(e, list) else e for e in items)


def matches(entry: Any, path: Path) -> bool:
    if isinstance(entry, str):
        return entry in path
    prefix = entry if isinstance(entry, tuple) else (entry,)
    return path[: len(prefix)] == prefix


def free_leaves(paths: Sequence[Path], entries: Sequence[Any]) -> list[bool]:
    """For each leaf path, whether some entry frees it; raises ValueError naming an entry that frees nothing."""
    for e in entries:
        if not any(matches(e, p) for p in paths):
            shown = ", ".join(str(p) for p in paths[:12]) + (", ..." if len(paths) > 12 else "")
            raise ValueError(f"free_outputs: {e!r} names no output of the model; its output leaves are at {shown}")
    return [any(matches(e, p) for e in entries) for p in paths]
