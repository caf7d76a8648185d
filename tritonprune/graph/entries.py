"""Values a module receives from outside that carry its heads along a dim: narrowed at its entry.

Bloom computes its ALiBi bias once, in the model, for the model's head count, as one `(batch * heads,
1, keys)` tensor, and every attention layer adds it to its `(batch * heads, queries, keys)` scores
(`baddbmm`). The bias has no channel identity, so the scores' dim 0, which carries the layer's head
ids, would keep its size and no head could go. But the bias is a forward argument of the attention
module: the module can read the rows of its kept heads only. The walker records that (`need`: which
module, which argument, along which dim, how many heads per period, which head ids in order) instead of
fixing the dim; assemble.py turns it into a `HeadInput` of the group, and pruning installs a
`KeptHeads` forward pre-hook on the module (pruning/kept_heads.py). The parent keeps computing the bias
for the original head count, so every kept head keeps its own values (apply == zero_).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import fx, nn

from .channels import channel_vector


@functools.lru_cache(maxsize=256)
def _parameter_names(cls: type) -> tuple[str, ...] | None:
    """The names of `cls.forward`'s positional parameters (after self), None where they cannot be read."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def entry_arguments(module: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, tensor) of every tensor `module` was called with, positional ones named by its
    forward's signature (left out where it cannot say)."""
    out = [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    names = _parameter_names(type(module)) if any(isinstance(a, torch.Tensor) for a in args) else ()
    if names is not None:
        out += [(n, a) for n, a in zip(names, args) if isinstance(a, torch.Tensor)]
    return out


MEETS_CONSTANT = ("channels meet values without channel identity (a model input, a constant or a table such as "
                  "rotary cos/sin), whose size stays")


@dataclass(frozen=True)
class EntryNeed:
    """The walker's record of one argument to narrow (completed with channel indices by assemble.py).
    `fixed`: the fixed-dim requirement the op states otherwise ((lines, why) as IdSpace.fix_dim keeps
    them); assemble.py falls back to it where the rows are not whole heads of one group (a rotary table
    along the head dim of a single head)."""

    module: str
    arg: str
    dim: int
    heads: int
    fixed: tuple = ()


def adapt_entry(w, node: fx.Node, arg: object, ids: torch.Tensor, arg_shape: tuple[int, ...] | None) -> bool:
    """`ids` (channels of `node`'s other operands, aligned with `arg`) meet `arg`, a value without channel
    identity. True where `arg` is a forward argument of the running module and the channels run along one
    dim of it as whole periods of head ids (batch x heads): recorded as a need instead of a fixed dim."""
    entries = getattr(w.ep, "entries", None)
    if not entries or not isinstance(arg, fx.Node) or arg_shape is None or len(arg_shape) != ids.dim():
        return False
    module = w.module_of(node)
    name = entries.get((module, arg))
    if not name:
        return False
    dims = [d for d in range(ids.dim()) if ids.shape[d] > 1 and arg_shape[d] > 1]
    if len(dims) != 1 or arg_shape[dims[0]] != ids.shape[dims[0]]:
        return False
    d = dims[0]
    line = channel_vector(ids, d, arg_shape[d])
    if line is None or bool((line < 0).any()):
        return False
    n = line.numel()
    for p in range(2, n + 1):
        if n % p == 0 and bool((line.view(-1, p) == line[:p]).all()):
            if line[:p].unique().numel() != p:
                return False
            own = w.shape(arg)  # `arg_shape` is aligned to the op's output: the dim of the argument itself
            lines = ids.movedim(d, -1).reshape(-1, ids.shape[d])[:1].clone()
            fixed = (lines, f"{MEETS_CONSTANT} (op {node.target} in module {module!r})")
            w.space.adapt(line[:p].clone(), EntryNeed(module, name, d - (len(arg_shape) - len(own)), p, fixed))
            return True
    return False
