"""From channel components to Groups: channels with the same footprint in the same tensors form a group."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch

from . import group as g
from .channels import IdSpace, known_ids

_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant, as a signed int64
MAX_SLOTS_PER_TENSOR = 256  # more pieces than this in one tensor dim: treat as scattered


def assemble(space: IdSpace, ignored: set[str]) -> list[g.Group]:
    labels = space.components()
    bad = torch.zeros(space.count, dtype=torch.bool)
    if space.excluded:
        bad[labels[known_ids(space.excluded)]] = True
    regs = list(space.registered.values())
    for reg in regs:
        if reg.role != g.IN and is_ignored(reg.module, ignored):
            bad[labels[reg.ids]] = True  # an ignored layer keeps its own channels; its inputs may shrink
    _check_balanced(space, labels, bad)
    mixed = torch.zeros(space.count, dtype=torch.bool)
    if space.mixing:
        mixed[labels[known_ids(space.mixing)]] = True

    # one row per (class of registered dims, position) of a channel that may be pruned (all at once):
    # registered dims whose channels are the same labels in the same order (a conv's output, its bias, the
    # BatchNorm after it, the next conv's input) form one class and share their rows (a tenth of the rows)
    if not regs:
        return []
    classes = _classes(regs, labels)
    n_cls = len(classes)
    sizes = torch.tensor([regs[members[0]].size for members in classes], dtype=torch.long)
    firsts = torch.tensor([regs[members[0]].first for members in classes], dtype=torch.long)
    cls_all = torch.repeat_interleave(torch.arange(n_cls), sizes)
    pos_all = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    lab_all = labels[firsts[cls_all] + pos_all]  # a registered dim's ids are first, first + 1, ...
    keep = ~bad[lab_all]
    if not bool(keep.any()):
        return []
    lab_all, cls_all, pos_all = lab_all[keep], cls_all[keep], pos_all[keep]

    # footprint of a channel = which registered dims it touches and how many positions in each
    n_regs = len(regs)
    pair, counts = torch.unique_consecutive(torch.sort(lab_all * n_cls + cls_all).values, return_counts=True)
    pair_lab, pair_cls = pair // n_cls, pair % n_cls
    gen = torch.Generator().manual_seed(0)
    salt1 = torch.randint(1, 2**62, (n_regs,), generator=gen)
    salt2 = torch.randint(1, 2**62, (n_regs,), generator=gen)
    sig1 = torch.zeros(space.count, dtype=torch.long)
    sig2 = torch.zeros(space.count, dtype=torch.long)
    # the sums over the registered dims of each class (int64 arithmetic wraps: the same sums as per dim)
    member_cls = torch.repeat_interleave(torch.arange(n_cls), torch.tensor([len(m) for m in classes]))
    members = torch.tensor([r for m in classes for r in m], dtype=torch.long)
    cls_salt1 = torch.zeros(n_cls, dtype=torch.long).index_add_(0, member_cls, salt1[members])
    sig1.index_add_(0, pair_lab, cls_salt1[pair_cls] * (counts * 1000003 + 7))
    sig2.index_add_(0, pair_lab, _xor_sums(pair_cls, counts, classes, member_cls, members, salt2) * _MIX)
    chans = torch.unique_consecutive(pair_lab)  # pairs are sorted by label
    # one 64-bit key per footprint (two independent sums folded; a 1-D unique is much faster)
    _, group_of_chan = torch.unique(sig1[chans] ^ (sig2[chans] * 31 + 17), return_inverse=True)
    group_of_label = torch.full((space.count,), -1, dtype=torch.long)
    group_of_label[chans] = group_of_chan

    # rows sorted by (group, class, position): a class ranks by its first registered dim
    grp_rows = group_of_label[lab_all]
    max_pos = int(pos_all.max()) + 1
    order = torch.argsort((grp_rows * n_cls + cls_all) * max_pos + pos_all)
    lab_all, cls_all, pos_all, grp_rows = lab_all[order], cls_all[order], pos_all[order], grp_rows[order]
    seg_key, seg_len = torch.unique_consecutive(grp_rows * n_cls + cls_all, return_counts=True)

    seg_grp, seg_cls = seg_key // n_cls, seg_key % n_cls
    index_of, orders = _channel_order(lab_all, grp_rows, seg_grp, seg_len, space.count)
    built, failed = _build_slots(regs, classes, lab_all, pos_all, seg_grp, seg_cls, seg_len, index_of, orders)

    blocks, units, merges, inputs = _apply_requirements(space, labels, bad, group_of_label, built, index_of, failed)

    mixed_group = _any_per_group(mixed, group_of_label, len(orders))
    readers = _readers(space, labels, group_of_label)
    groups = []
    merged_member = {m for members in merges.values() for m in members[1:]}
    for gi, _ in sorted(built.items(), key=lambda kv: kv[1]["first"]):
        if gi in merged_member:
            continue
        members = merges.get(gi, [gi])
        slots, size, head_inputs = [], 0, []
        for m in members:
            for _, slot in sorted(built[m]["slots"], key=lambda rs: (rs[0], rs[1].offset)):
                slots.append(replace(slot, offset=slot.offset + size) if size else slot)
            head_inputs += [replace(h, channels=tuple(c + size for c in h.channels)) for h in inputs.get(m, ())]
            size += int(built[m]["order"].numel())
        why = next((failed[m] for m in members if m in failed), None)
        if why is not None:
            warnings.warn(f"tritonprune: channels of {slots[0].module or slots[0].name} are not pruned: {why}",
                          stacklevel=3)
            continue
        if all(s.is_buffer for s in slots):
            continue
        origin = next((s.module for s in slots if s.role == g.OUT), slots[0].module or slots[0].name)
        exact = not any(mixed_group[m] for m in members)
        read_by = tuple(sorted({r for m in members for r in readers.get(m, ())}))
        groups.append(g.Group(size=size, slots=tuple(slots), blocks=blocks.get(gi, 1), origin=origin,
                              unit=units.get(gi, 1), exact=exact, index=len(groups), inputs=tuple(head_inputs), readers=read_by))
    return groups


def _readers(space: IdSpace, labels: torch.Tensor, group_of_label: torch.Tensor) -> dict[int, set[str]]:
    """Per group: the modules whose integer attributes size an op on its channels (IdSpace.readers)."""
    out: dict[int, set[str]] = {}
    for ids, module in space.readers:
        for gi in group_of_label[labels[ids]].unique().tolist():
            if gi >= 0:
                out.setdefault(gi, set()).add(module)
    return out


def _classes(regs: list, labels: torch.Tensor) -> list[list[int]]:
    """Registered dims with the same channel labels in the same order, as lists of their indices (each
    list ascending; the lists ordered by their first index)."""
    firsts = torch.tensor([reg.first for reg in regs], dtype=torch.long)
    sizes = torch.tensor([reg.size for reg in regs], dtype=torch.long)
    ends = labels[firsts + sizes - 1].tolist()
    starts = labels[firsts].tolist()
    classes: list[list[int]] = []
    candidates: dict[tuple[int, int, int], list[int]] = {}  # (size, first label, last label) -> classes
    for ri, reg in enumerate(regs):
        key = (reg.size, starts[ri], ends[ri])
        seen = candidates.setdefault(key, [])
        for ci in seen:
            rep = regs[classes[ci][0]]
            if reg.size == 1 or torch.equal(labels[reg.first:reg.first + reg.size],
                                            labels[rep.first:rep.first + rep.size]):
                classes[ci].append(ri)
                break
        else:
            seen.append(len(classes))
            classes.append([ri])
    return classes


def _xor_sums(pair_cls, counts, classes, member_cls, members, salt):
    """Per (label, class) pair: the sum over the class's registered dims of salt[dim] ^ count."""
    n_cls = len(classes)
    combo, inverse = torch.unique(pair_cls * (int(counts.max()) + 1) + counts, return_inverse=True)
    combo_cls, combo_count = combo // (int(counts.max()) + 1), combo % (int(counts.max()) + 1)
    # every (combo, member of its class) at once
    n_members = torch.bincount(member_cls, minlength=n_cls)
    per_combo = n_members[combo_cls]
    combo_of = torch.repeat_interleave(torch.arange(combo.numel()), per_combo)
    starts = torch.cumsum(n_members, 0) - n_members
    within = torch.arange(int(per_combo.sum())) - torch.repeat_interleave(torch.cumsum(per_combo, 0) - per_combo, per_combo)
    reg = members[starts[combo_cls[combo_of]] + within]
    sums = torch.zeros(combo.numel(), dtype=torch.long).index_add_(0, combo_of, salt[reg] ^ combo_count[combo_of])
    return sums[inverse]


def is_ignored(module: str, ignored: set[str]) -> bool:
    """`module` is an ignored layer or inside one."""
    return any(module == m or module.startswith(m + ".") for m in ignored) if ignored else False


def _first_appearance(labs: torch.Tensor) -> torch.Tensor:
    """Distinct labels in the order they first appear."""
    if labs.numel() <= 64:  # a few tensor ops cost more than a short list
        return torch.tensor(list(dict.fromkeys(labs.tolist())), dtype=torch.long)
    ordered, perm = torch.sort(labs, stable=True)
    first = torch.ones(labs.numel(), dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return labs[perm[first].sort().values]


def _check_balanced(space: IdSpace, labels: torch.Tensor, bad: torch.Tensor) -> None:
    """Ops that index a dim by position (select, equal split) need each channel equally in every part."""
    for k, (parts, why) in enumerate(space.balanced):
        lab = labels[parts.clamp_min(0)]
        lab = torch.where(parts >= 0, lab, -1)
        uniq, inv = torch.unique(lab, return_inverse=True)
        counts = torch.zeros(parts.shape[0], uniq.numel(), dtype=torch.long)
        counts.scatter_add_(1, inv, torch.ones_like(inv))
        uneven = (counts != counts[:1]).any(0) & (uniq >= 0)
        if uneven.any():
            if k in space.balanced_selects:
                # q/k/v taken by position from one tensor, the parts in different groups (CaiT's talking
                # heads: q/k heads and v heads meet different projections): find_groups walks again with
                # the parts joined position by position, so they lose the same heads
                space.uneven_selects.add(space.balanced_selects[k])
            if k in space.balanced_sized_by and parts.shape[1] > 1 and not bool(bad[lab[lab >= 0]].any()):
                # parts sized by one attribute of the module running the op: every part loses the same
                # count (a chunk's equal blocks; groups in several parts merge), the attribute follows;
                # a part that must stay whole (an output, an ignored layer) keeps them all whole
                space.require_blocks(parts, parts.shape[0])
                space.readers.append((parts.reshape(-1), space.balanced_sized_by[k]))
                continue
            hit = uniq[uneven]
            fresh = hit[~bad[hit]]
            if fresh.numel():
                warnings.warn(f"tritonprune: {why}; the channels it touches are not pruned", stacklevel=4)
            bad[hit] = True


def _any_per_group(flag: torch.Tensor, group_of_label: torch.Tensor, n_groups: int) -> list[bool]:
    """For each group, whether `flag` is set on any of its channel labels."""
    hit = group_of_label[flag & (group_of_label >= 0)]
    out = torch.zeros(n_groups, dtype=torch.bool)
    out[hit] = True
    return out.tolist()


def _channel_order(lab, grp, seg_grp, seg_len, count):
    """Channel order of every group: first appearance in its first registered dim (its first segment).

    Returns `index_of` (label -> index in its group, -1 elsewhere) and the labels of each group in order.
    Rows are sorted by (group, registered dim, position), so the rows of first segments, in row order,
    list each group's channels in the order they appear there."""
    n_groups = int(seg_grp[-1]) + 1 if seg_grp.numel() else 0
    seg_first = torch.ones(seg_grp.numel(), dtype=torch.bool)
    seg_first[1:] = seg_grp[1:] != seg_grp[:-1]
    in_first = torch.repeat_interleave(seg_first, seg_len)
    rows = torch.nonzero(in_first).flatten()
    labs = lab[rows]
    # the first row of each label: a stable sort by label keeps row order within a label
    ordered, perm = torch.sort(labs, stable=True)
    first = torch.ones(ordered.numel(), dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    firsts = torch.sort(rows[perm[first]]).values  # rows of first appearances, in row order
    order_labs = lab[firsts]
    g = grp[firsts]
    sizes = torch.bincount(g, minlength=n_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    index_of = torch.full((count,), -1, dtype=torch.long)
    index_of[order_labs] = torch.arange(order_labs.numel()) - starts[g]
    return index_of, list(torch.split(order_labs, sizes.tolist()))


def _build_slots(regs, classes, lab, pos, seg_grp, seg_cls, seg_len, index_of, orders):
    """Slots of every (group, registered dim) segment, all segments at once: runs of consecutive group
    channels at consecutive positions, each channel owning `repeat` consecutive positions. The rows are
    those of classes of registered dims (see _classes): each member of a class gets the same slots.

    Returns `built` (group -> its channel order, (registered dim, Slot) pairs and first registered dim)
    and `failed` (group -> why its channels cannot be pruned: the first failing segment's reason)."""
    n_rows, n_seg = lab.numel(), seg_grp.numel()
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    seg_of_row = torch.repeat_interleave(torch.arange(n_seg), seg_len)
    new_seg = torch.zeros(n_rows, dtype=torch.bool)
    new_seg[seg_start] = True
    # runs: one channel's consecutive positions
    change = new_seg.clone()
    change[1:] |= (lab[1:] != lab[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = torch.nonzero(change).flatten()
    run_len = torch.diff(torch.cat([starts, torch.tensor([n_rows])]))
    run_seg = seg_of_row[starts]
    run_first = new_seg[starts]
    repeat = run_len[run_first]  # per segment: the length of its first run
    uneven = torch.zeros(n_seg, dtype=torch.bool)
    uneven[run_seg[run_len != repeat[run_seg]]] = True
    idx = index_of[lab[starts]]
    outside = torch.zeros(n_seg, dtype=torch.bool)
    outside[run_seg[idx < 0]] = True
    # pieces: runs of consecutive group channels at consecutive positions
    first_pos = pos[starts]
    breaks = run_first.clone()
    breaks[1:] |= (idx[1:] != idx[:-1] + 1) | (first_pos[1:] != first_pos[:-1] + repeat[run_seg[1:]])
    piece_starts = torch.nonzero(breaks).flatten()
    piece_len = torch.diff(torch.cat([piece_starts, torch.tensor([idx.numel()])]))
    piece_seg = run_seg[piece_starts]
    n_pieces = torch.bincount(piece_seg, minlength=n_seg)

    built: dict[int, dict] = {}
    failed: dict[int, str] = {}
    seg_first_pos = first_pos[run_first]
    cols = [seg_len.tolist(), repeat.tolist(), uneven.tolist(), outside.tolist(), n_pieces.tolist(),
            seg_first_pos.tolist()]
    piece_cuts = torch.cumsum(n_pieces, 0).tolist()
    p_off, p_start, p_len = idx[piece_starts].tolist(), first_pos[piece_starts].tolist(), piece_len.tolist()
    # one (group, registered dim) segment per member of each class segment, in (group, dim) order
    segs = sorted((gi, ri, s) for s, (gi, ci) in enumerate(zip(seg_grp.tolist(), seg_cls.tolist()))
                  for ri in classes[ci])
    for gi, ri, s in segs:
        n, rep, bad_len, bad_out, np_, fp = (c[s] for c in cols)
        lo, hi = piece_cuts[s - 1] if s else 0, piece_cuts[s]
        entry = built.get(gi)
        if entry is None:
            entry = built[gi] = {"order": orders[gi], "slots": [], "first": ri}
        if gi in failed:
            continue
        reg = regs[ri]
        why = None
        if bad_len:
            why = f"{reg.name} owns an uneven number of positions per channel"
        elif bad_out:
            why = f"{reg.name} holds channels outside the group"
        elif np_ > MAX_SLOTS_PER_TENSOR:
            why = f"channels of {reg.name} are scattered (permuted relative to the group)"
        elif reg.blocks > 1 and (np_ != 1 or fp != 0 or rep != 1 or n != reg.size):
            why = f"{reg.name} is a grouped conv whose conv groups are only partly in the group"
        if why is not None:
            failed[gi] = why
            continue
        entry["slots"].extend((ri, g.Slot(
            name=reg.name, module=reg.module, kind=reg.kind, role=reg.role, dim=reg.dim,
            offset=p_off[k], length=p_len[k], start=p_start[k], repeat=rep, blocks=reg.blocks,
            is_bias=reg.is_bias, is_buffer=reg.is_buffer)) for k in range(lo, hi))
    return built, failed



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
        return in_group_order(built, index_of, gi, lab)

    for kind, reqs in (("blocks", space.requirements), ("unit", space.units), ("soft", space.soft_requirements)):
        target = units if kind == "unit" else blocks
        for ri, (ids, nb) in enumerate(reqs):
            lab = labels[ids]
            if bad[lab].any():
                continue
            if kind == "blocks" and lab.numel() % nb == 0 and nb > 1 and bool((lab.reshape(nb, -1) == lab.reshape(nb, -1)[:1]).all()):
                continue  # every part holds the same channels (q, k, v of a head as one channel): parts stay equal
            if kind == "soft":
                gi = int(group_of_label[lab[0]])
                if gi in units or gi in failed or gi not in built:
                    continue  # attention heads state their own structure (checked first: the cheapest)
                rows = lab.reshape(nb, -1)
                if bool((rows == rows[:1]).all()):
                    continue  # the parts are copies of one channel set (packed q/k/v): sizes stay equal
                if bool((rows == rows[:, :1]).all()):
                    continue  # each part is one channel (a whole head): removing it removes the part
            gis = group_of_label[lab]
            runs, run_len = torch.unique_consecutive(gis, return_counts=True)
            runs = runs.tolist()
            if any(gi in failed or gi not in built for gi in runs):
                continue
            if len(runs) > 1:
                if kind != "unit":
                    spanning.append((lab, nb, runs, run_len.tolist()))
                else:
                    space.split_units.add(space.unit_sources[ri] if ri < len(space.unit_sources) else "")
                    for gi in runs:
                        failed[gi] = "attention heads are split over several groups"
                continue
            gi = runs[0]
            if kind == "unit":
                # one row per head; repeated key/value heads (GQA) and rotary pairs repeat labels
                # (heads are few and short: plain lists)
                heads = list(dict.fromkeys(map(tuple, lab.reshape(-1, nb).tolist())))
                per_head = [list(dict.fromkeys(h)) for h in heads]
                if len({len(h) for h in per_head}) != 1:
                    failed[gi] = "attention heads hold uneven channel copies"
                    continue
                uniq = torch.tensor([v for h in per_head for v in h], dtype=torch.long)
                nb = len(per_head[0])
            else:
                uniq = _first_appearance(lab)
            if not in_order(gi, uniq):
                failed[gi] = f"{nb} equal parts required by a grouped op do not line up with the group"
                continue
            combined = g.block_count(target.get(gi, 1), nb)
            if combined and built[gi]["order"].numel() % combined:
                failed[gi] = f"{combined} equal parts required by a grouped op do not divide the {built[gi]['order'].numel()} channels"
                continue
            if combined == 0:
                failed[gi] = f"incompatible {kind} sizes {target.get(gi, 1)} and {nb}"
                continue
            target[gi] = combined

    _merge_spanning(spanning, built, index_of, units, blocks, merges, failed)
    inputs, fixed = _head_inputs(space, labels, bad, group_of_label, built, index_of, units)
    _check_fixed_lines(space.fixed_lines + fixed, labels, bad, group_of_label, built, index_of, units, blocks, failed)
    for gi in set(blocks) & set(units):
        if (built[gi]["order"].numel() // blocks[gi]) % units[gi]:
            failed[gi] = "equal blocks and whole attention heads do not fit together"
    return blocks, units, merges, inputs


def _head_inputs(space, labels, bad, group_of_label, built, index_of, units):
    """Module arguments narrowed to the kept heads (graph/entries.py), by group: each head row of the
    argument must be a whole head of one group (one channel, or one unit). Where not, the op's fixed dim
    applies as without the argument's narrowing (returned as fixed lines)."""
    out: dict[int, list[g.HeadInput]] = {}
    fixed = []
    for heads, need in space.adaptors:
        lab = labels[heads]
        if bool(bad[lab].any()):
            continue
        gis = set(group_of_label[lab].tolist())
        gi = next(iter(gis))
        chans = index_of[lab].tolist()
        if len(gis) != 1 or gi < 0 or gi not in built \
                or len({c // units.get(gi, 1) for c in chans}) != len(chans):
            fixed.append(need.fixed)
            continue
        hi = g.HeadInput(need.module, need.arg, need.dim, need.heads, tuple(chans))
        if hi not in out.setdefault(gi, []):
            out[gi].append(hi)
    return out, fixed


def _merge_spanning(spanning, built, index_of, units, blocks, merges, failed) -> None:
    """Equal parts (chunk parts, GroupNorm groups) whose channels fall into several groups: merge the groups.

    The parts stay equal if every segment between two boundaries (of a part or of a group) loses the
    same count. With `seg` the gcd of the part size and the groups' run lengths, every part and every
    group is made of whole segments of that size; the groups are merged, each cut into segments (finer
    than its own blocks where it has some), and the merged group removes the same count from each
    segment. A chunk of whole groups is the case where segments are the parts; a GroupNorm over a
    `cat` of a skip connection and an upsampled map (a UNet) is one whose groups do not align with
    the norm's. Groups meeting in several such ops merge into one.
    """
    parent: dict[int, int] = {}

    def root(gi: int) -> int:
        while parent.setdefault(gi, gi) != gi:
            gi = parent[gi]
        return gi

    seg: dict[int, int] = {}  # root -> segment size so far
    for lab, nb, runs, run_len in spanning:
        why = None
        if len(set(runs)) != len(runs) or lab.numel() % nb:
            why = f"{nb} equal parts of a chunk do not each form a group"
        elif any(gi in units for gi in runs):
            why = "a chunk splits attention heads"
        else:
            pos = 0
            for gi, n in zip(runs, run_len):
                if not in_group_order(built, index_of, gi, lab[pos : pos + n]):
                    why = f"a part of a {nb}-way chunk is only partly in a group"
                pos += n
        if why is not None:
            for gi in runs:
                failed[gi] = why
            continue
        size = math.gcd(lab.numel() // nb, *run_len)
        top = root(runs[0])
        for gi in runs[1:]:
            other = root(gi)
            if other != top:
                parent[other] = top
                size = math.gcd(size, seg.pop(other, size))
        seg[top] = math.gcd(seg.get(top, size), size)
    members: dict[int, list[int]] = {}
    for gi in parent:  # in the order groups were first met
        members.setdefault(root(gi), []).append(gi)
    for top, gis in members.items():
        size = seg[top]
        for gi in gis:
            n = int(built[gi]["order"].numel())
            size = math.gcd(size, n // blocks.get(gi, 1))
        why = next((failed[gi] for gi in gis if gi in failed), None)
        if why is None and size == 1:
            # segments of one channel: the parts would stay equal only if nothing or everything went
            why = "equal parts (GroupNorm groups, chunk parts) cut across the groups at single channels"
        if why is not None:
            for gi in gis:
                failed.setdefault(gi, why)
            continue
        merges[gis[0]] = gis
        blocks[gis[0]] = sum(int(built[gi]["order"].numel()) for gi in gis) // size


def in_group_order(built, index_of, gi: int, lab: torch.Tensor) -> bool:
    """`lab` lists all of group `gi`'s channels, in the group's order."""
    return built[gi]["order"].numel() == lab.numel() and torch.equal(index_of[lab], torch.arange(lab.numel()))


def _check_fixed_lines(fixed_lines, labels, bad, group_of_label, built, index_of, units, blocks, failed) -> None:
    """A dim whose size the code fixes survives pruning only if each of its lines is a whole unit."""
    for lines, why in fixed_lines:
        # the lines are short and few (heads x head dim): plain lists, one tensor read per table
        lab = labels[lines.clamp_min(0)]
        valid = (lines >= 0).tolist()
        labs = lab.tolist()
        is_bad = bad[lab].tolist()
        grp = group_of_label[lab].tolist()
        idx_of = index_of[lab].tolist()
        for row in range(len(labs)):
            keep = valid[row]
            line = [v for v, k in zip(labs[row], keep) if k]
            if not line or any(b for b, k in zip(is_bad[row], keep) if k):
                continue
            gis = sorted({gi for gi, k in zip(grp[row], keep) if k})
            gis = [gi for gi in gis if gi >= 0 and gi in built]
            if len(gis) != 1:
                for gi in gis:
                    failed.setdefault(gi, why)
                continue
            gi = gis[0]
            unit = units.get(gi, 0)
            first = {}  # label -> its index in the group, in order of first appearance
            for v, i, k in zip(labs[row], idx_of[row], keep):
                if k and v not in first:
                    first[v] = i
            idx = list(first.values())
            # a line that is one channel (a whole head) goes whole or stays whole
            whole = len(idx) == 1 or (unit and len(idx) == unit and idx[0] % unit == 0
                                      and idx == list(range(idx[0], idx[0] + unit)))
            if not whole:
                hint = " (prune whole heads: head_pruning='heads')" if gi in units or gi in blocks else ""
                failed.setdefault(gi, why + hint)
