"""tritonprune under torch.distributed: DDP, FSDP2 (`fully_shard`) and pruning with a broadcast plan.

DDP needs nothing from this module: `RegularizedOptimizer(opt, ddp_model, example_inputs)` looks through
the wrapper (parameter names are the inner module's) and `step()` runs after `backward()`, i.e. after
DDP's gradient all-reduce, on identical gradients and weights on every rank, so every rank adds the
same term.

FSDP2 (`torch.distributed.fsdp.fully_shard`, parameters are DTensors placed `Shard(0)`):

- `find_groups(model, example_inputs)` traces a sharded model through an unsharded *meta-device*
  skeleton (same module classes, full shapes from the DTensor metadata, no memory, no collective):
  torch.export cannot run FSDP2's all-gather hooks. The groups are the unsharded model's.
- `ShardedLayout` (used by the engine by itself when it sees DTensor parameters) packs the *local*
  shards: every Slot is restricted to the rows this rank holds (out-rows: the slot's channel range
  intersected with the local rows; in-columns and norm weights: all their columns, on the local rows),
  with the group channel offsets of the unsharded model, so the flat channel space is the same on every
  rank. Per-channel sums are partial; one all-reduce of the flat float32 sum buffer (a few KB) per
  step completes them, after which every rank computes the same gamma as an unsharded run and updates
  its own rows. Uneven shards (rows not divisible by the world size, ranks with no rows) are fine.
- HSDP meshes (`Replicate`, `Shard(0)`) reduce over the sharding dim only.

Pruning (`prune_distributed`): rank `src` plans, the plan is broadcast as plain data
(`PrunePlan.to_dict`), every rank applies the same plan. Wrappers must be rebuilt afterwards, see the
function's docstring and docs/distributed.md for the DDP and FSDP2 recipes.
"""

from .graph.sharded import find_groups, is_sharded, unsharded_copy, unsharded_skeleton
from .pruning.distributed import broadcast_plan, prune_distributed
from .regularizing.sharded import ShardedLayout

__all__ = [
    "ShardedLayout",
    "find_groups",
    "is_sharded",
    "unsharded_copy",
    "unsharded_skeleton",
    "broadcast_plan",
    "prune_distributed",
]
