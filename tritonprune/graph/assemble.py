"""From channel components to Groups: channels with the same footprint in the same tensors form a group."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from . import group as g
from .channels import IdSpace, Registered

_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant, as a signed int64
MAX_SLOTS_PER_TENSOR = 256  # more pieces than this in one tensor dim: treat as scattered


def assemble(space: IdSpace, ignored: set[str]) -> list[g.Group]:
    labels = space.components()
    bad = torch.zeros(space.count, dtype=torch.bool)
    if space.excluded:
        bad[labels[torch.cat(space.excluded)]] = True
    regs = list(space.registered.values())
    for reg in regs:
        if reg.role != g.IN and is_ignored(reg.module, ignored):
            bad[labels[reg.ids]] = True  # an ignored layer keeps its own channels; its inputs may shrink
    _check_balanced(space, labels, bad)
    mixed = torch.zeros(space.count, dtype=torch.bool)
    if space.mixing:
        mixed[labels[torch.cat(space.mixing)]] = True

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
    pair, counts = torch.unique_consecutive(torch.sort(lab_all * n_regs + reg_all).values, return_counts=True)
    pair_lab, pair_reg = pair // n_regs, pair % n_regs
    gen = torch.Generator().manual_seed(0)
    salt1 = torch.randint(1, 2**62, (n_regs,), generator=gen)
    salt2 = torch.randint(1, 2**62, (n_regs,), generator=gen)
    sig1 = torch.zeros(space.count, dtype=torch.long)
    sig2 = torch.zeros(space.count, dtype=torch.long)
    sig1.index_add_(0, pair_lab, salt1[pair_reg] * (counts * 1000003 + 7))
    sig2.index_add_(0, pair_lab, (salt2[pair_reg] ^ counts) * _MIX)
    chans = torch.unique(pair_lab)
    # one 64-bit key per footprint (two independent sums folded; a 1-D unique is much faster)
    _, group_of_chan = torch.unique(sig1[chans] ^ (sig2[chans] * 31 + 17), return_inverse=True)
    group_of_label = torch.full((space.count,), -1, dtype=torch.long)
    group_of_label[chans] = group_of_chan

    # rows sorted by (group, registered dim, position)
    grp_rows = group_of_label[lab_all]
    max_pos = int(pos_all.max()) + 1
    order = torch.argsort((grp_rows * n_regs + reg_all) * max_pos + pos_all)
    lab_all, reg_all, pos_all, grp_rows = lab_all[order], reg_all[order], pos_all[order], grp_rows[order]
    seg_key, seg_len = torch.unique_consecutive(grp_rows * n_regs + reg_all, return_counts=True)
    bounds = [0, *torch.cumsum(seg_len, 0).tolist()]

    # channel order of a group: first appearance in its first registered dim
    index_of = torch.full((space.count,), -1, dtype=torch.long)
    built: dict[int, dict] = {}
    failed: dict[int, str] = {}
    for s, key_s in enumerate(seg_key.tolist()):
        gi, ri = divmod(key_s, n_regs)
        if gi in failed:
            continue
        labs, pos = lab_all[bounds[s] : bounds[s + 1]], pos_all[bounds[s] : bounds[s + 1]]
        entry = built.get(gi)
        if entry is None:
            order_labs = _first_appearance(labs)
            index_of[order_labs] = torch.arange(order_labs.numel())
            entry = built[gi] = {"order": order_labs, "slots": [], "first": ri}
        slots, why = _slots_for(regs[ri], labs, pos, index_of, entry["order"].numel())
        if slots is None:
            failed[gi] = why
            continue
        entry["slots"].extend((ri, slot) for slot in slots)

    blocks, units, merges = _apply_requirements(space, labels, bad, group_of_label, built, index_of, failed)

    groups = []
    merged_member = {m for members in merges.values() for m in members[1:]}
    for gi, _ in sorted(built.items(), key=lambda kv: kv[1]["first"]):
        if gi in merged_member:
            continue
        members = merges.get(gi, [gi])
        slots, size = [], 0
        for m in members:
            for _, slot in sorted(built[m]["slots"], key=lambda rs: (rs[0], rs[1].offset)):
                slots.append(replace(slot, offset=slot.offset + size))
            size += int(built[m]["order"].numel())
        why = next((failed[m] for m in members if m in failed), None)
        if why is not None:
            warnings.warn(f"tritonprune: channels of {slots[0].module or slots[0].name} are not pruned: {why}",
                          stacklevel=3)
            continue
        if all(s.is_buffer for s in slots):
            continue
        origin = next((s.module for s in slots if s.role == g.OUT), slots[0].module or slots[0].name)
        exact = not any(bool(mixed[built[m]["order"]].any()) for m in members)
        groups.append(g.Group(size=size, slots=tuple(slots), blocks=blocks.get(gi, 1), origin=origin,
                              unit=units.get(gi, 1), exact=exact, index=len(groups)))
    return groups


def is_ignored(module: str, ignored: set[str]) -> bool:
    """`module` is an ignored layer or inside one."""
    return any(module == m or module.startswith(m + ".") for m in ignored) if ignored else False


def _first_appearance(labs: torch.Tensor) -> torch.Tensor:
    """Distinct labels in the order they first appear."""
    ordered, perm = torch.sort(labs, stable=True)
    first = torch.ones(labs.numel(), dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return labs[perm[first].sort().values]


def _unique_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for r in rows:
        if not any(torch.equal(r, q) for q in seen):
            seen.append(r)
    return seen


def _check_balanced(space: IdSpace, labels: torch.Tensor, bad: torch.Tensor) -> None:
    """Ops that index a dim by position (select, equal split) need each channel equally in every part."""
    for parts, why in space.balanced:
        lab = labels[parts.clamp_min(0)]
        lab = torch.where(parts >= 0, lab, -1)
        uniq, inv = torch.unique(lab, return_inverse=True)
        counts = torch.zeros(parts.shape[0], uniq.numel(), dtype=torch.long)
        counts.scatter_add_(1, inv, torch.ones_like(inv))
        uneven = (counts != counts[:1]).any(0) & (uniq >= 0)
        if uneven.any():
            hit = uniq[uneven]
            fresh = hit[~bad[hit]]
            if fresh.numel():
                warnings.warn(f"tritonprune: {why}; the channels it touches are not pruned", stacklevel=4)
            bad[hit] = True


def _slots_for(reg: Registered, labs: torch.Tensor, pos: torch.Tensor, index_of: torch.Tensor, size: int):
    """Slots covering a group's positions in one registered dim: runs of consecutive group channels at
    consecutive positions, each channel owning `repeat` consecutive positions."""
    n_rows = labs.numel()
    change = torch.ones(n_rows, dtype=torch.bool)
    change[1:] = (labs[1:] != labs[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = torch.nonzero(change).flatten()
    lengths = torch.diff(torch.cat([starts, torch.tensor([n_rows])]))
    repeat = int(lengths[0])
    if not bool((lengths == repeat).all()):
        return None, f"{reg.name} owns an uneven number of positions per channel"
    idx = index_of[labs[starts]]
    if bool((idx < 0).any()):
        return None, f"{reg.name} holds channels outside the group"
    first_pos = pos[starts]
    breaks = torch.ones(idx.numel(), dtype=torch.bool)
    breaks[1:] = (idx[1:] != idx[:-1] + 1) | (first_pos[1:] != first_pos[:-1] + repeat)
    piece_starts = torch.nonzero(breaks).flatten()
    if piece_starts.numel() > MAX_SLOTS_PER_TENSOR:
        return None, f"channels of {reg.name} are scattered (permuted relative to the group)"
    piece_len = torch.diff(torch.cat([piece_starts, torch.tensor([idx.numel()])]))
    if reg.blocks > 1 and (piece_starts.numel() != 1 or int(first_pos[0]) != 0 or repeat != 1 or n_rows != reg.size):
        return None, f"{reg.name} is a grouped conv whose conv groups are only partly in the group"
    slots = []
    for ps, pl in zip(piece_starts.tolist(), piece_len.tolist()):
        slots.append(g.Slot(
            name=reg.name, module=reg.module, kind=reg.kind, role=reg.role, dim=reg.dim,
            offset=int(idx[ps]), length=pl, start=int(first_pos[ps]), repeat=repeat, blocks=reg.blocks,
            is_bias=reg.is_bias, is_buffer=reg.is_buffer,
        ))
    return slots, ""


def _apply_requirements(space, labels, bad, group_of_label, built, index_of, failed):
    """Equal-block and whole-unit requirements (grouped convs, GroupNorm, chunk, attention heads).

    Blocks or units inside one group must be contiguous runs of its channels. Chunk parts that fall
    into different groups (parts feeding different layers) merge those groups, each part a block.
    """
    blocks: dict[int, int] = {}
    units: dict[int, int] = {}
    merges: dict[int, list[int]] = {}
    spanning = []

    def in_order(gi: int, lab: torch.Tensor) -> bool:
        return built[gi]["order"].numel() == lab.numel() and torch.equal(index_of[lab], torch.arange(lab.numel()))

    for kind, reqs in (("blocks", space.requirements), ("unit", space.units), ("soft", space.soft_requirements)):
        target = units if kind == "unit" else blocks
        for ids, nb in reqs:
            lab = labels[ids]
            if bad[lab].any():
                continue
            if kind == "soft":
                rows = lab.reshape(nb, -1)
                if bool((rows == rows[:1]).all()):
                    continue  # the parts are copies of one channel set (packed q/k/v): sizes stay equal
                gi = int(group_of_label[lab[0]])
                if gi in units or gi in failed or gi not in built:
                    continue  # attention heads state their own structure
            gis = group_of_label[lab]
            runs, run_len = torch.unique_consecutive(gis, return_counts=True)
            runs = runs.tolist()
            if any(gi in failed or gi not in built for gi in runs):
                continue
            if len(runs) > 1:
                if kind != "unit":
                    spanning.append((lab, nb, runs, run_len.tolist()))
                else:
                    for gi in runs:
                        failed[gi] = "attention heads are split over several groups"
                continue
            gi = runs[0]
            uniq = _first_appearance(lab)
            if kind == "unit":
                # one row per head; repeated key/value heads (GQA) and rotary pairs repeat labels
                heads = _unique_rows(lab.reshape(-1, nb))
                per_head = [_first_appearance(h) for h in heads]
                if len({h.numel() for h in per_head}) != 1:
                    failed[gi] = "attention heads hold uneven channel copies"
                    continue
                uniq = torch.cat(per_head)
                nb = per_head[0].numel()
            if not in_order(gi, uniq):
                failed[gi] = f"{nb} equal parts required by a grouped op do not line up with the group"
                continue
            combined = g.block_count(target.get(gi, 1), nb)
            if combined == 0:
                failed[gi] = f"incompatible {kind} sizes {target.get(gi, 1)} and {nb}"
                continue
            target[gi] = combined

    merged: set[int] = set()
    for lab, nb, runs, run_len in spanning:
        why = None
        if len(runs) != nb or len(set(runs)) != nb or len(set(run_len)) != 1:
            why = f"{nb} equal parts of a chunk do not each form a group"
        elif merged & set(runs):
            why = "channels are split by two different chunks"
        elif any(gi in units for gi in runs):
            why = "a chunk splits attention heads"
        else:
            pos = 0
            for gi, n in zip(runs, run_len):
                if not in_order(gi, lab[pos : pos + n]):
                    why = f"a part of a {nb}-way chunk is only partly in a group"
                pos += n
        inner = 1
        if why is None:
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
    _check_fixed_lines(space, labels, bad, group_of_label, built, index_of, units, blocks, failed)
    for gi in set(blocks) & set(units):
        if (built[gi]["order"].numel() // blocks[gi]) % units[gi]:
            failed[gi] = "equal blocks and whole attention heads do not fit together"
    return blocks, units, merges


def _check_fixed_lines(space, labels, bad, group_of_label, built, index_of, units, blocks, failed) -> None:
    """A dim whose size the code fixes survives pruning only if each of its lines is a whole unit."""
    for lines, why in space.fixed_lines:
        lab = labels[lines.clamp_min(0)]
        valid = lines >= 0
        for row in range(lab.shape[0]):
            line = lab[row][valid[row]]
            if not line.numel() or bool(bad[line].any()):
                continue
            gis = group_of_label[line].unique().tolist()
            gis = [gi for gi in gis if gi >= 0 and gi in built]
            if len(gis) != 1:
                for gi in gis:
                    failed.setdefault(gi, why)
                continue
            gi = gis[0]
            unit = units.get(gi, 0)
            uniq = _first_appearance(line)
            idx = index_of[uniq]
            whole = (unit and uniq.numel() == unit and int(idx[0]) % unit == 0
                     and torch.equal(idx, idx[0] + torch.arange(unit)))
            if not whole:
                hint = " (prune whole heads: head_pruning='heads')" if gi in units or gi in blocks else ""
                failed.setdefault(gi, why + hint)
