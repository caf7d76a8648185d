"""All or nothing for mutating calls (`prune`, `PrunePlan.apply`, `PrunePlan.zero_`).

Slicing never edits a tensor in place: it puts new Parameters and buffers into the modules, sets
module attributes (sizes, head counts, even `__class__`), config fields, and replaces entries of the
optimizer's `param_groups` and `state`. So a snapshot of references is enough to undo it, and it costs
no copy of any weight:

- every module: its class and a shallow copy of its `__dict__` (with `_parameters`, `_buffers`,
  `_modules` and the forward pre-hooks copied one level down),
- every config object a module holds (Hugging Face `config`): a shallow copy of its `__dict__`,
- the optimizer: each param group's dict and params list, the `state` mapping, and a
  RegularizedOptimizer's groups,
- tensors changed in place (soft pruning zeroes channels): a copy of just those, named by the caller.

    with Transaction(model, optimizer, values=names_zero_will_touch):
        ...mutate...            # any exception restores everything, then propagates
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..graph.module_copy import is_config

# copied one level down: slicing adds to them in place (forward pre-hooks: the kept-heads hook)
_NESTED = ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def _configs(obj: Any, seen: dict[int, Any]) -> None:
    """`obj` and the config objects it holds (nested configs of composite models), once each."""
    if id(obj) in seen:
        return
    seen[id(obj)] = obj
    for v in vars(obj).values():
        if is_config(v):
            _configs(v, seen)


class Transaction:
    """A snapshot of `model` (and `optimizer`) taken at construction; `restore()` puts it back.

    As a context manager it restores on any exception. `values` names tensors (parameter / buffer
    names) whose contents will be changed in place; they are copied."""

    def __init__(self, model: nn.Module, optimizer: Any = None, values: Iterable[str] = ()):
        self.model = model
        self.modules: list[tuple[nn.Module, type, dict[str, Any]]] = []
        configs: dict[int, Any] = {}
        for m in model.modules():
            d = dict(m.__dict__)
            for k in _NESTED:
                if k in d:
                    d[k] = d[k].copy()
            self.modules.append((m, type(m), d))
            for v in m.__dict__.values():
                if is_config(v):
                    _configs(v, configs)
        self.configs = [(c, dict(vars(c))) for c in configs.values()]
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        self.values = []
        for n in dict.fromkeys(values):
            t = tensors.get(n)
            if t is not None:
                self.values.append((t, t.detach().clone()))
        self.optimizer = optimizer
        self.opt_groups: list[tuple[dict[str, Any], dict[str, Any], list[Any]]] = []
        self.opt_list: list[dict[str, Any]] = []
        self.opt_state: dict[Any, Any] | None = None
        self.reg_groups = None
        if optimizer is not None:
            self.opt_groups = [(g, dict(g), list(g["params"])) for g in optimizer.param_groups]
            self.opt_list = list(optimizer.param_groups)
            self.opt_state = dict(optimizer.state)
            if hasattr(optimizer, "reset_groups"):
                self.reg_groups = list(optimizer.groups)

    def restore(self) -> None:
        for m, cls, d in self.modules:
            if type(m) is not cls:
                m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(d)
        for c, d in self.configs:
            vars(c).clear()
            vars(c).update(d)
        with torch.no_grad():
            for t, saved in self.values:
                t.copy_(saved)
        opt = self.optimizer
        if opt is not None:
            for g, d, params in self.opt_groups:
                d["params"][:] = params  # slicing edits the params list in place
                g.clear()
                g.update(d)
            opt.param_groups[:] = self.opt_list
            state = opt.state
            state.clear()
            state.update(self.opt_state)
            if self.reg_groups is not None:
                opt.reset_groups(self.reg_groups)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.restore()
        return False
