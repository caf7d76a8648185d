"""Copies of a module tree with every tensor replaced, sharing nothing mutable with the original:
the meta-device skeletons of the run check and of FSDP2 tracing, and the full-weight copy of a sharded
model (tritonprune.distributed)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn as nn


def plain_class(m: nn.Module) -> type:
    """The user's class of a module that fully_shard re-classed (FSDP<Cls> derives from FSDPModule, Cls)."""
    cls = type(m)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return cls
    if not issubclass(cls, FSDPModule):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))


def is_config(v: Any) -> bool:
    """A Hugging Face config (or look-alike): slicing writes its head counts and hidden sizes."""
    return hasattr(v, "to_dict") and hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type))


def copy_tree(
    model: nn.Module, tensor_of: Callable[[torch.Tensor], torch.Tensor], leave_out: Collection[str] = ()
) -> nn.Module:
    """A copy of the module tree: the user's classes and attributes, no hooks, every parameter / buffer /
    tensor attribute replaced by `tensor_of(t)` (called once per tensor, so tied tensors stay tied;
    parameters stay parameters with their requires_grad), config objects deep-copied, plain containers
    copied. Nothing of `model` is modified or shared mutably. `leave_out`: attribute names the copy does
    without (bookkeeping no forward reads, such as the plans pruning recorded)."""
    modules: dict[int, nn.Module] = {}
    tensors: dict[int, torch.Tensor] = {}
    configs: dict[int, Any] = {}

    def swap(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in tensors:
            m = tensor_of(t)
            if isinstance(t, nn.Parameter):
                m = nn.Parameter(m, requires_grad=t.requires_grad)
            tensors[id(t)] = m
        return tensors[id(t)]

    def config(v: Any) -> Any:
        if id(v) not in configs:
            configs[id(v)] = copy.deepcopy(v)
        return configs[id(v)]

    def value(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return swap(v)
        if isinstance(v, nn.Module):  # a module held as a plain attribute: the copy must not reach the real one
            return visit(v)
        if is_config(v):
            return config(v)
        # containers are copied (a forward that caches into a dict, as timm's LeViT does with its
        # attention biases, must write into the copy's, not leave fake tensors in the real model's)
        if isinstance(v, dict) and type(v) in (dict, OrderedDict):
            return type(v)((k, value(x)) for k, x in v.items())
        if isinstance(v, (list, set)) and type(v) in (list, set):
            return type(v)(value(x) for x in v)
        if type(v) is tuple:
            return tuple(value(x) for x in v)
        return v

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in modules:  # a module used twice stays one module
            return modules[id(m)]
        c = object.__new__(plain_class(m))
        modules[id(m)] = c
        d = {}
        for k, v in m.__dict__.items():
            # fully_shard's registry stays behind (the copy can be sharded again), and so does `leave_out`
            if k.startswith("__composable_api") or k in leave_out:
                continue
            if "hook" in k and isinstance(v, dict):  # FSDP's all-gather hooks, and any other hooks
                d[k] = OrderedDict()
            elif k in ("_parameters", "_buffers"):
                d[k] = {n: None if t is None else swap(t) for n, t in v.items()}
            elif k == "_modules":
                d[k] = {n: None if s is None else visit(s) for n, s in v.items()}
            elif k == "_non_persistent_buffers_set":
                d[k] = set(v)
            else:
                d[k] = value(v)
        c.__dict__.update(d)
        return c

    from .trace import unwrap

    return visit(unwrap(model))
