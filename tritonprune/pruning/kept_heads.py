"""The forward pre-hook that narrows a module's argument to its kept heads (see graph/entries.py).

Bloom's model computes one ALiBi tensor of `(batch * heads, 1, keys)` for the original head count and
passes it to every attention layer; a layer that lost heads reads the rows of the heads it kept. The
hook is a small module-level class (so deepcopy, torch.save of the whole model and EMA copies work),
registered with `with_kwargs=True`; a second prune of the same module composes the index maps (the
kept heads are always numbered in the original count).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


class KeptHeads:
    """Narrows argument `arg` of the module along `dim` ((batch x heads) rows, batch-major) to `kept` of
    `heads` head rows per batch entry."""

    def __init__(self, arg: str, dim: int, heads: int, kept: Sequence[int]):
        self.arg, self.dim, self.heads, self.kept = arg, int(dim), int(heads), tuple(int(k) for k in kept)

    def __repr__(self) -> str:
        return f"KeptHeads({self.arg!r}, dim={self.dim}, heads={self.heads}, kept={list(self.kept)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeptHeads) and vars(self) == vars(other)

    __hash__ = None  # mutable-looking state compared by value

    def narrow(self, t: torch.Tensor, module: nn.Module) -> torch.Tensor:
        n = t.shape[self.dim]
        if n % self.heads:
            raise RuntimeError(
                f"{type(module).__name__}: argument {self.arg!r} has {n} rows along dim {self.dim}, not a multiple of "
                f"the {self.heads} heads it was pruned from (tritonprune keeps heads {list(self.kept)} of it)")
        idx = torch.tensor(self.kept, device=t.device)
        return t.unflatten(self.dim, (n // self.heads, self.heads)).index_select(self.dim + 1, idx).flatten(self.dim, self.dim + 1)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if isinstance(kwargs.get(self.arg), torch.Tensor):
            kwargs = dict(kwargs)
            kwargs[self.arg] = self.narrow(kwargs[self.arg], module)
            return args, kwargs
        pos = _position(type(module), self.arg)
        if pos is not None and pos < len(args) and isinstance(args[pos], torch.Tensor):
            args = (*args[:pos], self.narrow(args[pos], module), *args[pos + 1:])
            return args, kwargs
        return None


@functools.lru_cache(maxsize=256)
def _position(cls: type, name: str) -> int | None:
    try:
        params = list(inspect.signature(cls.forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None


def installed(module: nn.Module) -> dict[str, tuple[int, KeptHeads]]:
    """The KeptHeads hooks of `module`: argument -> (hook id, hook)."""
    return {h.arg: (hid, h) for hid, h in module._forward_pre_hooks.items() if isinstance(h, KeptHeads)}


def plan_hooks(model: nn.Module, wanted: Sequence[tuple[Any, Sequence[int]]]) -> list[tuple[nn.Module, int | None, KeptHeads]]:
    """The hooks to install for `wanted` (HeadInput, kept heads of it), composed with the ones the modules
    already have; raises ValueError (nothing modified) where a module or argument does not fit."""
    modules = dict(model.named_modules())
    out: dict[tuple[str, str], tuple[nn.Module, int | None, KeptHeads]] = {}
    for hi, kept in wanted:
        m = modules.get(hi.module)
        if m is None:
            raise ValueError(f"{hi.module}: no such module; the plan was made for another model")
        if not kept:
            raise ValueError(f"{hi.module}: the cut removes every head that argument {hi.arg!r} carries")
        if (hi.module, hi.arg) in out:
            raise ValueError(f"{hi.module}: argument {hi.arg!r} is narrowed by two groups")
        hid, old = installed(m).get(hi.arg, (None, None))
        if old is None:
            hook = KeptHeads(hi.arg, hi.dim, hi.heads, kept)
        elif len(old.kept) != hi.heads or old.dim != hi.dim:
            raise ValueError(f"{hi.module}: argument {hi.arg!r} already keeps {len(old.kept)} heads along dim "
                             f"{old.dim}, the plan expects {hi.heads} along dim {hi.dim}; the plan was made for another model")
        else:
            hook = KeptHeads(hi.arg, hi.dim, old.heads, [old.kept[k] for k in kept])
        out[(hi.module, hi.arg)] = (m, hid, hook)
    return list(out.values())


def install(hooks: Sequence[tuple[nn.Module, int | None, KeptHeads]]) -> None:
    """Install what `plan_hooks` computed: a composed hook replaces the old one at its place."""
    for m, hid, hook in hooks:
        if hid is None:
            m.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            m._forward_pre_hooks[hid] = hook


def hooks_of(model: nn.Module) -> Mapping[str, list[KeptHeads]]:
    """Module name -> its KeptHeads hooks (what a plain from_pretrained cannot rebuild)."""
    return {n: [h for _, h in installed(m).values()] for n, m in model.named_modules() if installed(m)}
