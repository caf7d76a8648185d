"""Prune the same channels on every rank: one rank plans, the plan is broadcast as plain data."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from ..graph.sharded import is_sharded
from ..graph.trace import unwrap
from .plan import PrunePlan
from .pruner import prune

# ------------------------------------------------------------------------------------- pruning


def broadcast_plan(plan: Any, src: int = 0, group: Any = None) -> Any:
    """The PrunePlan of rank `src` on every rank (sent as `plan.to_dict()`; other ranks pass None)."""
    box = [plan.to_dict() if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return PrunePlan.from_dict(box[0])


def prune_distributed(model: nn.Module, example_inputs: Any = None, *, optimizer: Any = None, src: int = 0,
                      group: Any = None, **prune_kwargs: Any) -> Any:
    """Prune the same channels on every rank: rank `src` plans, the plan is broadcast, every rank applies it.

    Call it on every rank, with the same arguments, at the same point of training. `prune_kwargs` are
    those of `tritonprune.prune` (ratio, importance, global_pruning, round_to, groups, ...); `optimizer`
    (a RegularizedOptimizer or any torch optimizer) has its state sliced and, for a RegularizedOptimizer,
    its groups updated. Returns the PrunePlan (identical on every rank).

    - DDP: pass the DDP model (or its `.module`). DDP holds the old parameters, so re-wrap after
      pruning: ``model = DDP(model.module, device_ids=...)``.
    - FSDP2: shapes cannot change under a sharded model. Gather, prune, re-shard:
      ``full = unsharded_copy(model)`` (collective), ``prune_distributed(full, x, ratio=...)``,
      ``fully_shard(...)`` on `full`, then build a new optimizer (and RegularizedOptimizer) on it.
    - A plain module replicated by hand works as well.
    """
    if is_sharded(model):
        raise ValueError(
            "tritonprune.distributed.prune_distributed: the model is sharded (FSDP2); gather it first with "
            "unsharded_copy(model), prune the copy, then fully_shard it again"
        )
    inner = unwrap(model)
    plan = None
    if dist.get_rank() == src:
        plan = prune(inner, example_inputs, optimizer=optimizer, dry_run=True, **prune_kwargs)
    plan = broadcast_plan(plan, src=src, group=group)
    plan.apply(inner, optimizer=optimizer)
    return plan

