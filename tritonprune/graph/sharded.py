"""Groups of an FSDP2-sharded model: trace its unsharded meta-device skeleton (no memory, no collective).

A forward of the sharded model would run FSDP2's all-gather hooks (a collective, the full weights); the
skeleton has the same module classes and the full shapes from the DTensor metadata, so the groups are the
unsharded model's, as the engine expects (its forward runs on meta tensors: no memory, no compute).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .group import Group
from .module_copy import copy_tree


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True if any parameter of `model` is a DTensor (FSDP2 / DTensor-sharded).

    Imports nothing: DTensors exist only once torch.distributed.tensor was imported (seconds to import)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(p, mod.DTensor) for p in model.parameters())


# ------------------------------------------------------------------------------ unsharded copies


def unsharded_skeleton(model: nn.Module) -> nn.Module:
    """A meta-device copy of `model` with full (unsharded) shapes and no FSDP hooks; for tracing only.

    No memory and no collective: shapes come from the DTensor metadata."""
    return copy_tree(model, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))


def unsharded_copy(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """A plain module with the full weights of a sharded `model` (user classes, no FSDP hooks).

    Collective: every rank of the sharding group must call it (each DTensor is all-gathered). Tensors go
    to `device` (default: where they are). The result shares no tensor with `model`; use it to prune
    and re-shard (see `prune_distributed`)."""
    DTensor = _dtensor_cls() if dist.is_available() else ()

    def full(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()
        return x.to(device) if device is not None else x

    return copy_tree(model, full)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, tuple):
        return tuple(_to_meta(v) for v in x)
    if isinstance(x, list):
        return [_to_meta(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def find_groups(model: nn.Module, example_inputs: Any, ignored_layers: Iterable[Any] = (), **kwargs: Any) -> list[Group]:
    """`tritonprune.find_groups` for any model: plain, DDP, or FSDP2-sharded.

    A sharded model is traced as its meta-device skeleton (`unsharded_skeleton`) with meta copies of
    `example_inputs`, so no rank needs the full weights; the groups name the parameters with their
    unsharded shapes, as the engine expects. `ignored_layers` may be modules of `model` or names.
    """
    from . import find_groups as _find_groups
    from .trace import unwrap

    if not is_sharded(model):
        return _find_groups(model, example_inputs, ignored_layers=ignored_layers, **kwargs)
    inner = unwrap(model)
    names = {id(m): n for n, m in inner.named_modules()}
    ignored = [names.get(id(x), x) if isinstance(x, nn.Module) else x for x in ignored_layers]
    skeleton = unsharded_skeleton(inner)
    return _find_groups(skeleton, _to_meta(example_inputs), ignored_layers=ignored, **kwargs)

