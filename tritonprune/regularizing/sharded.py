"""The flattened group buffers of an FSDP2-sharded model: each rank packs its local rows.

Every Slot is restricted to the rows this rank holds (out-rows: the slot's channel range intersected with
the local rows; in-columns and norm weights: all their columns, on the local rows), with the group channel
offsets of the unsharded model, so the flat channel space is the same on every rank. Per-channel sums are
partial; one all-reduce of the flat float32 sum buffer per step completes them (see tritonprune.distributed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..graph.group import BATCHNORM, Group, Slot
from ..graph.sharded import _dtensor_cls
from ..kernels.layout import GroupBuffers

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

