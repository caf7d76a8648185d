"""From channel components to Groups: channels with the same footprint in the same tensors form a group."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from . import group as g
from .channels import IdSpace, Registered

_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant, as a signed int64


def assemble(space: IdSpace, ignored: set[str]) -> list[g.Group]:
    labels = space.components()
    bad = torch.zeros(space.count, dtype=torch.bool)
    if space.excluded:
        bad[labels[torch.cat(space.excluded)]] = True
    regs = list(space.registered.values())
    for reg in regs:
        if reg.role != g.IN and _is_ignored(reg.module, ignored):
            bad[labels[reg.ids]] = True  # an ignored layer keeps its own channels; its inputs may shrink

    # one row per (registered dim, position) of a channel that may be pruned
    lab_rows, reg_rows, pos_rows = [], [], []
    for ri, reg in enumerate(regs):
        lab = labels[reg.ids]
        keep = ~bad[lab]
        if keep.any():
            pos = torch.arange(reg.size)[keep]
            lab_rows.append(lab[keep])
            reg_rows.append(torch.full_like(pos, ri))
            pos_rows.append(pos)
    if not lab_rows:
        return []
    lab_all, reg_all, pos_all = torch.cat(lab_rows), torch.cat(reg_rows), torch.cat(pos_rows)

    # footprint of a channel = which registered dims it touches and how many positions in each
    n_regs = len(regs)
    pair, counts = torch.unique(lab_all * n_regs + reg_all, return_counts=True)
    pair_lab, pair_reg = pair // n_regs, pair % n_regs
    gen = torch.Generator().manual_seed(0)
    salt1 = torch.randint(1, 2**62, (n_regs,), generator=gen)
    salt2 = torch.randint(1, 2**62, (n_regs,), generator=gen)
    sig1 = torch.zeros(space.count, dtype=torch.long)
    sig2 = torch.zeros(space.count, dtype=torch.long)
    sig1.index_add_(0, pair_lab, salt1[pair_reg] * (counts * 1000003 + 7))
    sig2.index_add_(0, pair_lab, (salt2[pair_reg] ^ counts) * _MIX)
    chans = torch.unique(pair_lab)
    sigs = torch.stack([sig1[chans], sig2[chans]], 1)
    _, group_of_chan = torch.unique(sigs, dim=0, return_inverse=True)
    group_of_label = torch.full((space.count,), -1, dtype=torch.long)
    group_of_label[chans] = group_of_chan
    group_sizes = torch.bincount(group_of_chan).tolist()

    # rows sorted by (group, registered dim, position)
    grp_rows = group_of_label[lab_all]
    max_pos = int(pos_all.max()) + 1
    key = (grp_rows * n_regs + reg_all) * max_pos + pos_all
    order = torch.argsort(key)
    lab_all, reg_all, pos_all, grp_rows = lab_all[order], reg_all[order], pos_all[order], grp_rows[order]
    seg_key, seg_len = torch.unique_consecutive(grp_rows * n_regs + reg_all, return_counts=True)
    bounds = [0] + torch.cumsum(seg_len, 0).tolist()

    built: dict[int, dict] = {}
    failed: dict[int, str] = {}
    for s, key_s in enumerate(seg_key.tolist()):
        gi, ri = divmod(key_s, n_regs)
        if gi in failed:
            continue
        lo, hi = bounds[s], bounds[s + 1]
        labs, pos = lab_all[lo:hi], pos_all[lo:hi]
        reg = regs[ri]
        entry = built.setdefault(gi, {"order": None, "slots": [], "first": ri})
        slot, chan_order, why = _slot_for(reg, labs, pos, group_sizes[gi])
        if slot is None:
            failed[gi] = why
            continue
        if entry["order"] is None:
            entry["order"] = chan_order
        elif not torch.equal(entry["order"], chan_order):
            failed[gi] = f"channels of {reg.name} are permuted relative to {regs[entry['first']].name}"
            continue
        entry["slots"].append((ri, slot))

    blocks, merges = _apply_requirements(space, labels, bad, group_of_label, built, failed)

    groups = []
    merged_member = {m for members in merges.values() for m in members[1:]}
    for gi, entry in sorted(built.items(), key=lambda kv: kv[1]["first"]):
        if gi in merged_member:
            continue
        members = merges.get(gi, [gi])
        slots, size = [], 0
        for m in members:
            for _, slot in sorted(built[m]["slots"], key=lambda rs: rs[0]):
                slots.append(replace(slot, offset=size))
            size += int(built[m]["order"].numel())
        why = next((failed[m] for m in members if m in failed), None)
        if why is not None:
            warnings.warn(f"tritonprune: channels of {slots[0].module or slots[0].name} are not pruned: {why}",
                          stacklevel=3)
            continue
        if all(s.is_buffer for s in slots):
            continue
        origin = next((s.module for s in slots if s.role == g.OUT), slots[0].module or slots[0].name)
        groups.append(g.Group(size=size, slots=tuple(slots), blocks=blocks.get(gi, 1), origin=origin,
                              index=len(groups)))
    return groups


def _apply_requirements(space, labels, bad, group_of_label, built, failed):
    """Equal-block requirements (grouped convs, GroupNorm, chunk).

    Blocks inside one group must be contiguous runs of its channels. Blocks that fall into different
    groups (chunk parts feeding different layers) merge those groups into one, each part a block.
    """
    blocks: dict[int, int] = {}
    merges: dict[int, list[int]] = {}
    spanning = []

    def index_in(gi: int, lab: torch.Tensor) -> torch.Tensor:
        order = built[gi]["order"]
        index = torch.full((space.count,), -1, dtype=torch.long)
        index[order] = torch.arange(order.numel())
        return index[lab]

    for ids, nb in space.requirements:
        lab = labels[ids]
        if bad[lab].any():
            continue
        gis = group_of_label[lab]
        runs, run_len = torch.unique_consecutive(gis, return_counts=True)
        runs = runs.tolist()
        if any(gi in failed or gi not in built for gi in runs):
            continue
        if len(runs) > 1:
            spanning.append((lab, nb, runs, run_len.tolist()))
            continue
        gi = runs[0]
        if built[gi]["order"].numel() != lab.numel() or not torch.equal(index_in(gi, lab), torch.arange(lab.numel())):
            failed[gi] = f"{nb} equal blocks required by a grouped op do not line up with the group"
            continue
        combined = g.block_count(blocks.get(gi, 1), nb)
        if combined == 0:
            failed[gi] = f"incompatible block counts {blocks.get(gi, 1)} and {nb}"
            continue
        blocks[gi] = combined

    merged: set[int] = set()
    for lab, nb, runs, run_len in spanning:
        why = None
        if len(runs) != nb or len(set(runs)) != nb or len(set(run_len)) != 1:
            why = f"{nb} equal parts of a chunk do not each form a group"
        elif merged & set(runs):
            why = "channels are split by two different chunks"
        else:
            pos = 0
            for gi, n in zip(runs, run_len):
                part = lab[pos : pos + n]
                pos += n
                if built[gi]["order"].numel() != n or not torch.equal(index_in(gi, part), torch.arange(n)):
                    why = f"a part of a {nb}-way chunk is only partly in a group"
        if why is None:
            inner = 1
            for gi in runs:
                inner = g.block_count(inner, blocks.get(gi, 1))
            if inner == 0 or any(blocks.get(gi, 1) != inner for gi in runs):
                why = "chunk parts have different block structure"
        if why is not None:
            for gi in runs:
                failed[gi] = why
            continue
        merged.update(runs)
        merges[runs[0]] = runs
        blocks[runs[0]] = nb * inner
    return blocks, merges


def _is_ignored(module: str, ignored: set[str]) -> bool:
    return any(module == m or module.startswith(m + ".") for m in ignored) if ignored else False


def _slot_for(reg: Registered, labs: torch.Tensor, pos: torch.Tensor, size: int):
    """A Slot if the group's channels occupy an affine range of this dim, plus their channel order."""
    n_rows = labs.numel()
    # positions are sorted; a channel owning `repeat` consecutive positions shows up `repeat` times
    change = torch.ones(n_rows, dtype=torch.bool)
    change[1:] = labs[1:] != labs[:-1]
    starts = torch.nonzero(change).flatten()
    n = starts.numel()
    if n_rows % n:
        return None, None, f"{reg.name} owns an uneven number of positions per channel"
    repeat = n_rows // n
    chan_order = labs[starts]
    if n != size or not torch.equal(labs, chan_order.repeat_interleave(repeat)):
        return None, None, f"{reg.name} interleaves channels"
    start = int(pos[0])
    if not torch.equal(pos, torch.arange(start, start + n_rows)):
        return None, None, f"{reg.name} holds the channels at scattered positions"
    if reg.blocks > 1 and (start != 0 or repeat != 1 or n_rows != reg.size):
        return None, None, f"{reg.name} is a grouped conv whose conv groups are only partly in the group"
    slot = g.Slot(
        name=reg.name, module=reg.module, kind=reg.kind, role=reg.role, dim=reg.dim, offset=0, length=n,
        start=start, repeat=repeat, blocks=reg.blocks, is_bias=reg.is_bias, is_buffer=reg.is_buffer,
    )
    return slot, chan_order, ""
