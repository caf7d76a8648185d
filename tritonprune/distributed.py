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
function's docstring and the README's "Distributed training" section for the DDP and FSDP2 recipes.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .graph.group import BATCHNORM, Group, Slot
from .layout import GroupBuffers
from .module_copy import copy_tree

__all__ = [
    "ShardedLayout",
    "find_groups",
    "is_sharded",
    "unsharded_copy",
    "unsharded_skeleton",
    "broadcast_plan",
    "prune_distributed",
]


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
    from .graph import find_groups as _find_groups
    from .graph.trace import unwrap

    if not is_sharded(model):
        return _find_groups(model, example_inputs, ignored_layers=ignored_layers, **kwargs)
    inner = unwrap(model)
    names = {id(m): n for n, m in inner.named_modules()}
    ignored = [names.get(id(x), x) if isinstance(x, nn.Module) else x for x in ignored_layers]
    skeleton = unsharded_skeleton(inner)
    return _find_groups(skeleton, _to_meta(example_inputs), ignored_layers=ignored, **kwargs)


# ----------------------------------------------------------------------------- sharded layout


class _Proxies:
    """What GroupBuffers.build reads from a model: `named_parameters()`, here the local row pieces."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


class _Piece:
    """Local rows [lo, hi) (global row numbers) of one parameter, as a plain Parameter aliasing the shard."""

    __slots__ = ("name", "param", "lo", "hi", "r0", "proxy", "grad_view")

    def __init__(self, name: str, param: torch.Tensor, lo: int, hi: int, r0: int, local: torch.Tensor):
        self.name, self.param, self.lo, self.hi, self.r0 = name, param, lo, hi, r0
        self.proxy = nn.Parameter(local.narrow(0, lo - r0, hi - lo), requires_grad=False)
        self.grad_view: torch.Tensor | None = None


def _rows_slots(slot: Slot, name: str, lo: int, hi: int) -> list[Slot]:
    """A dim-0 slot restricted to global rows [lo, hi), re-based to row 0 of the piece.

    Channel i owns rows start + i*repeat .. + repeat; a channel cut by a shard boundary becomes a
    1-channel slot with a shorter repeat (its partial sums are completed by the all-reduce)."""
    R, out = slot.repeat, []
    i_first = max(0, (lo - slot.start) // R)
    i_end = min(slot.length, -(-(hi - slot.start) // R))
    full: list[int] = []
    for i in range(i_first, i_end):
        a, b = max(lo, slot.start + i * R), min(hi, slot.start + (i + 1) * R)
        if b <= a:
            continue
        if b - a == R:
            full.append(i)
            continue
        out.append(dataclasses.replace(slot, name=name, offset=slot.offset + i, length=1, start=a - lo, repeat=b - a))
    if full:  # channels wholly inside the piece are consecutive
        i0 = full[0]
        out.append(dataclasses.replace(slot, name=name, offset=slot.offset + i0, length=len(full),
                                start=slot.start + i0 * R - lo))
    return out


class ShardedLayout:
    """The engine's view of an FSDP2 model: GroupBuffers over local shards and the per-step all-reduce.

    Every grouped DTensor parameter must be placed `Shard(0)` on one mesh dim (`Replicate` on the others);
    its local rows are cut into pieces at the conv-group boundaries of blocked slots (grouped-conv
    in-columns), each piece a plain Parameter aliasing the shard, so the backends work unchanged. Plain
    (replicated) parameters count in importance on sharding-group rank 0 only and are updated
    everywhere.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.group = None  # the sharding process group
        self._pieces: list[_Piece] = []
        self._orig: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (param, local data_ptr)
        self._proxy_of: dict[int, list[int]] = {}  # id(param) -> ids of its proxies

    # ------------------------------------------------------------------------------------ build

    def _shard_info(self, name: str, p: torch.Tensor) -> tuple[Any, int, int, torch.Tensor]:
        """(process group, first global row, local rows, local tensor) of a DTensor parameter."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shard_dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
        ok = (len(shard_dims) == 1 and p.placements[shard_dims[0]].dim == 0
              and all(isinstance(pl, (Replicate, Shard)) for pl in p.placements))
        if not ok:
            raise ValueError(
                f"tritonprune.distributed: parameter {name} has placements {p.placements}; only Shard(0) on one "
                "mesh dim (FSDP2's default, optionally with Replicate for HSDP) is supported"
            )
        with torch.no_grad():
            local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise ValueError(
                f"tritonprune.distributed: {name}: local shard has shape {tuple(local.shape)}, expected {tuple(shape)} "
                "from its placements"
            )
        return p.device_mesh.get_group(shard_dims[0]), int(offset[0]), int(shape[0]), local

    def build(self, groups: Sequence[Group], select: Callable[[Slot], tuple[bool, bool]]) -> GroupBuffers:
        """GroupBuffers over the local shards; channel offsets are the unsharded model's."""
        DTensor = _dtensor_cls()
        named = dict(self.model.named_parameters())
        used: dict[str, list[Slot]] = {}
        flags_of: dict[Slot, tuple[bool, bool]] = {}
        for gi, g in enumerate(groups):
            for s in g.slots:
                if s.is_buffer:
                    continue
                imp, upd = select(s)
                if imp or upd:
                    if s.name not in named:
                        raise ValueError(
                            f"tritonprune.distributed: group #{gi} names parameter {s.name!r}, which the model "
                            "does not have; pass the groups of this model (tritonprune.distributed.find_groups)"
                        )
                    used.setdefault(s.name, []).append(s)
                    flags_of[s] = (imp, upd)

        pgs = []
        infos: dict[str, tuple[int, int, torch.Tensor, bool]] = {}  # name -> (r0, rows, local, sharded)
        for name in used:
            p = named[name]
            if isinstance(p, DTensor):
                pg, r0, rows, local = self._shard_info(name, p)
                pgs.append(pg)
                infos[name] = (r0, rows, local, True)
            else:
                infos[name] = (0, p.shape[0] if p.dim() else 1, p.detach(), False)
        self.group = pgs[0] if pgs else None
        for pg in pgs[1:]:
            if dist.get_process_group_ranks(pg) != dist.get_process_group_ranks(self.group):
                raise ValueError("tritonprune.distributed: grouped parameters are sharded over different process "
                                 "groups; shard the model over one mesh")
        lead = self.group is None or dist.get_rank(self.group) == 0

        self._pieces, self._orig, self._proxy_of = [], {}, {}
        local_of: dict[Slot, list[tuple[Slot, _Piece]]] = {}
        for name, slots in used.items():
            p = named[name]
            r0, rows, local, sharded = infos[name]
            self._orig[name] = (p, local.data_ptr())
            cuts = {r0, r0 + rows}
            for s in slots:
                if s.blocks > 1:
                    if s.dim == 0:
                        raise ValueError(f"tritonprune.distributed: {name}: blocked slots along dim 0 are not supported")
                    per = p.shape[0] // s.blocks
                    cuts.update(j * per for j in range(1, s.blocks) if r0 < j * per < r0 + rows)
            cuts_sorted = sorted(cuts)
            for lo, hi in zip(cuts_sorted, cuts_sorted[1:]):
                piece = _Piece(f"{name}#{lo}:{hi}", p, lo, hi, r0, local)
                self._pieces.append(piece)
                self._proxy_of.setdefault(id(p), []).append(id(piece.proxy))
                for s in slots:
                    for ls in self._local_slots(s, piece, p):
                        imp, upd = flags_of[s]
                        flags_of[ls] = (imp and (sharded or lead), upd)
                        local_of.setdefault(s, []).append((ls, piece))

        local_groups = [
            Group(size=g.size, slots=tuple(ls for s in g.slots for ls, _ in local_of.get(s, ())),
                  blocks=g.blocks, origin=g.origin, unit=g.unit, exact=g.exact, index=g.index)
            for g in groups
        ]
        proxies = {pc.name: pc.proxy for pc in self._pieces}
        bufs = GroupBuffers.build(_Proxies(proxies), local_groups, lambda s: flags_of[s])
        # GroupLasso's per-channel BatchNorm slot count must be the unsharded one; it is counted from the
        # global groups, with no collective, so a rebuild on one rank only cannot unpair the all-reduces
        bn = torch.zeros(bufs.n_channels, dtype=torch.float32)
        start = 0
        for g in groups:
            for s in g.slots:
                if s in flags_of and flags_of[s][0] and s.kind == BATCHNORM:
                    bn[start + s.offset : start + s.offset + s.length] += 1
            start += g.size
        bufs.n_importance_slots_bn = bn.to(bufs.device)
        return bufs

    @staticmethod
    def _local_slots(s: Slot, piece: _Piece, p: torch.Tensor) -> list[Slot]:
        if s.dim == 0:
            return _rows_slots(s, piece.name, piece.lo, piece.hi)
        if s.blocks > 1:  # the piece lies inside conv group j: its in-channels j*per_block ..
            per_rows, per_block = p.shape[0] // s.blocks, s.length // s.blocks
            j = piece.lo // per_rows
            return [dataclasses.replace(s, name=piece.name, offset=s.offset + j * per_block, length=per_block, blocks=1)]
        return [dataclasses.replace(s, name=piece.name)]

    # ------------------------------------------------------------------------------------- steps

    def is_stale(self, bufs: GroupBuffers) -> bool:
        """True when a parameter or its local storage was replaced (pruning, re-sharding, lazy init)."""
        DTensor = _dtensor_cls()
        named = dict(self.model.named_parameters())
        for name, (p, ptr) in self._orig.items():
            q = named.get(name)
            if q is not p:
                return True
            with torch.no_grad():
                local = q.to_local() if isinstance(q, DTensor) else q
            if local.numel() and local.data_ptr() != ptr:  # empty shards may move freely
                return True
        return False

    def attach_grads(self, bufs: GroupBuffers) -> None:
        """Give every proxy the matching rows of its shard's current .grad (a view: writes go through)."""
        DTensor = _dtensor_cls()
        for pc in self._pieces:
            g = pc.param.grad
            if g is None:
                pc.grad_view = pc.proxy.grad = None
                continue
            if isinstance(g, DTensor):
                with torch.no_grad():
                    g = g.to_local()
            pc.grad_view = g.narrow(0, pc.lo - pc.r0, pc.hi - pc.lo)
            pc.proxy.grad = pc.grad_view

    def write_back(self, bufs: GroupBuffers) -> None:
        """Copy into the shard's .grad where GroupBuffers replaced a proxy's grad (other strides)."""
        for pc in self._pieces:
            if pc.grad_view is not None and pc.proxy.grad is not pc.grad_view:
                pc.grad_view.copy_(pc.proxy.grad)

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Complete the per-channel partial sums: the step's only collective (SUM over the shard group)."""
        if self.group is not None:
            dist.all_reduce(sums, group=self.group)
        return sums

    def local_lr(self, lr_of_param: Mapping[int, float]) -> dict[int, float]:
        """lr by id(proxy) from lr by id(sharded parameter)."""
        out: dict[int, float] = {}
        for pid, lr in lr_of_param.items():
            for x in self._proxy_of.get(pid, ()):
                out[x] = lr
        return out


# ------------------------------------------------------------------------------------- pruning


def broadcast_plan(plan: Any, src: int = 0, group: Any = None) -> Any:
    """The PrunePlan of rank `src` on every rank (sent as `plan.to_dict()`; other ranks pass None)."""
    from .prune import PrunePlan

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
    from .graph.trace import unwrap
    from .prune import prune

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
