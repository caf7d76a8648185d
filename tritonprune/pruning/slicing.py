"""Physical and soft removal of group channels: tensors, module attributes and optimizer state.

Removing group channels is first turned into one `Cut` per (tensor, dim): the indices along that dim
to drop. A tensor can be cut by several groups (a conv weight's rows by one group, its columns by
another; a Linear read by two `cat` parts), so all cuts are collected first and each tensor is sliced
once per dim. Everything is validated and every new tensor computed before the model is touched:
a plan that does not fit raises and leaves the model as it was.

A blocked cut (the in-columns of a grouped convolution) keeps a different column set in each conv
group, with equal counts, and is done with a gather; plain cuts are an index_select.

A tensor shared by several modules (tied embeddings) is cut once, under its canonical name, and every
module holding it gets the new parameter and attributes. Attention layers also get their head counts,
head dims and config fields updated (see attention_attrs), and other modules the integer attributes
their forward reads (see module_attrs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from ..graph.geometry import slot_geometry, slot_view
from ..graph.group import Group, Slot
from . import kept_heads
from .attention_attrs import attention_updates, commit, conv1d_attributes
from .module_attrs import Choices, module_updates


@dataclass
class Cut:
    """Indices to remove along one dim of one tensor.

    `removed[j, i]` is True when index i goes in block j. `blocks` is 1 for a plain cut; for a blocked
    cut (dim >= 1) block j is the j-th equal run of the tensor's dim-0 rows (a conv group).
    """

    name: str
    dim: int
    removed: torch.Tensor  # bool [blocks, size]
    units: set[int] = field(default_factory=set)  # run lengths of whole-unit groups cut here (head dims)
    # (HeadInput, kept heads): arguments of the group's modules narrowed to the kept heads (kept_heads.py)
    inputs: list = field(default_factory=list)
    # (module, count per block before, after) of the groups cut here that a module's own integer
    # attribute sizes an op by (Group.readers): module_attrs updates the attribute equal to `before`
    readers: set[tuple[str, int, int]] = field(default_factory=set)

    @property
    def blocks(self) -> int:
        return self.removed.shape[0]

    def keep(self) -> torch.Tensor:
        """Kept indices, [blocks, kept per block] (sorted)."""
        kept = ~self.removed
        counts = kept.sum(1)
        if (counts != counts[0]).any():
            raise ValueError(f"{self.name}: dim {self.dim} keeps unequal counts per block {counts.tolist()}")
        return kept.nonzero()[:, 1].view(self.blocks, -1)

    def removed_before(self, index: int) -> int:
        return int(self.removed[0, :index].sum())


Removal = tuple[Group, Sequence[int]]


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by qualified name. A shared tensor (tied embeddings) comes first under its
    canonical name (the one `named_parameters()` gives), then under its other names."""
    # one walk of the module tree (as named_parameters / named_buffers make it, duplicates kept), in their order:
    # first names of parameters, then of buffers, then the other names of each
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    more_params: dict[str, torch.Tensor] = {}
    more_buffers: dict[str, torch.Tensor] = {}
    seen_p: set[int] = set()
    seen_b: set[int] = set()
    for prefix, m in model.named_modules(remove_duplicate=False):
        pre = f"{prefix}." if prefix else ""
        for store, first, more, seen in ((m._parameters, params, more_params, seen_p),
                                         (m._buffers, buffers, more_buffers, seen_b)):
            for n, t in store.items():
                if t is None:
                    continue
                (more if id(t) in seen else first)[pre + n] = t
                seen.add(id(t))
    out = params
    for d in (buffers, more_params, more_buffers):
        for name, t in d.items():
            out.setdefault(name, t)
    return out


def _aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Every name of each tensor, the canonical (first) name first, keyed by every name."""
    by_id: dict[int, list[str]] = {}
    for n, t in tensors.items():
        by_id.setdefault(id(t), []).append(n)
    return {n: names for names in by_id.values() for n in names}


def _channel_mask(group: Group, removed: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(group.size, dtype=torch.bool)
    if len(removed):
        idx = torch.as_tensor(list(removed), dtype=torch.long)
        if idx.min() < 0 or idx.max() >= group.size:
            raise ValueError(f"group {group.origin!r}: channel indices must lie in [0, {group.size})")
        mask[idx] = True
    return mask


def _check_slot_fits(slot: Slot, tensor: torch.Tensor) -> None:
    if slot.dim >= tensor.dim():
        raise ValueError(
            f"{slot.name}: slot uses dim {slot.dim} but the tensor has shape {tuple(tensor.shape)}"
        )
    n = tensor.shape[slot.dim]
    if slot.blocks > 1:
        per = slot.length // slot.blocks
        if (
            slot.length % slot.blocks
            or tensor.shape[0] % slot.blocks
            or slot.start + per > n
            or slot.dim == 0
        ):
            raise ValueError(
                f"{slot.name}: blocked slot ({slot.blocks} blocks of {per} on dim {slot.dim}) does not fit shape "
                f"{tuple(tensor.shape)}; the plan was made for another model"
            )
    elif slot.start + slot.length * slot.repeat > n:
        raise ValueError(
            f"{slot.name}: slot covers indices {slot.start}..{slot.start + slot.length * slot.repeat} of dim "
            f"{slot.dim}, but the tensor has {n}; the plan was made for another model"
        )


def build_cuts(
    removals: Iterable[Removal], tensors: Mapping[str, torch.Tensor]
) -> dict[tuple[str, int], Cut]:
    """Turn removed group channels into per-(tensor, dim) cuts. Raises ValueError on anything that does not fit."""
    cuts: dict[tuple[str, int], Cut] = {}
    names = _aliases(tensors)  # a tied tensor is cut once, under its canonical name, and found under all
    for group, removed in removals:
        mask = _channel_mask(group, removed)
        n_removed = int(mask.sum())
        if group.blocks > 1:
            if group.size % group.blocks:
                raise ValueError(
                    f"group {group.origin!r}: size {group.size} is not a multiple of blocks {group.blocks}"
                )
            per_block = mask.view(group.blocks, -1).sum(1)
            if (per_block != per_block[0]).any():
                raise ValueError(
                    f"group {group.origin!r}: removes {per_block.tolist()} channels from its {group.blocks} blocks; "
                    "grouped layers need the same count removed from every block"
                )
        if mask.all():
            raise ValueError(f"group {group.origin!r}: a plan may not remove every channel of a group")
        if group.unit > 1:
            if group.size % group.unit:
                raise ValueError(
                    f"group {group.origin!r}: size {group.size} is not a multiple of unit {group.unit}"
                )
            runs = mask.view(-1, group.unit)
            if (runs.any(1) != runs.all(1)).any():
                raise ValueError(
                    f"group {group.origin!r}: channels must be removed in whole runs of {group.unit} (whole heads)"
                )
        first = None
        for slot in group.slots:
            if slot.name not in tensors:
                raise ValueError(
                    f"{slot.name}: no such parameter or buffer in the model; the plan was made for another model"
                )
            t = tensors[slot.name]
            _check_slot_fits(slot, t)
            sub = mask[slot.offset : slot.offset + slot.length]
            key = (names[slot.name][0], slot.dim)
            cut = cuts.get(key)
            G = slot.blocks
            if cut is None:
                cut = Cut(key[0], slot.dim, torch.zeros(G, t.shape[slot.dim], dtype=torch.bool))
                for alias in names[slot.name]:
                    cuts[(alias, slot.dim)] = cut
            elif cut.blocks != G:
                raise ValueError(
                    f"{slot.name}: dim {slot.dim} is cut both per conv group ({max(G, cut.blocks)} blocks) and as a whole; "
                    "the groups are inconsistent"
                )
            first = cut if first is None else first
            if not sub.any():
                continue
            cut.readers.update((r, group.size // group.blocks, (group.size - n_removed) // group.blocks)
                               for r in group.readers)
            if G > 1:
                per = slot.length // G
                cut.removed[:, slot.start : slot.start + per] |= sub.view(G, per)
            else:
                # channel i of the slot is indices start + i * repeat + (0 .. repeat-1) of the dim
                span = cut.removed[0, slot.start : slot.start + slot.length * slot.repeat]
                span.view(slot.length, slot.repeat).logical_or_(sub[:, None])
                if group.unit > 1:
                    cut.units.add(group.unit * slot.repeat)
        for hi in group.inputs if mask.any() else ():
            first.inputs.append((hi, [h for h in range(hi.heads) if not mask[hi.channels[h]]]))
    # same count in every block, and conv-group rows cut evenly where columns are cut per conv group
    for (name, _), cut in cuts.items():
        if cut.blocks > 1:  # one block keeps one count
            cut.keep()
        if cut.blocks > 1 and (name, 0) in cuts:
            rows = cuts[(name, 0)].removed[0].view(cut.blocks, -1).sum(1)
            if (rows != rows[0]).any():
                raise ValueError(
                    f"{name}: rows removed per conv group differ ({rows.tolist()}); the conv would break"
                )
    return cuts


# ------------------------------------------------------------------------------------------ slicing


def slice_tensor(t: torch.Tensor, cuts: Mapping[int, Cut]) -> torch.Tensor:
    """A new tensor with every cut applied (blocked dims by gather first, on the original rows)."""
    out = t.detach()
    changed = False
    channels_last = (
        out.dim() in (4, 5)
        and not out.is_contiguous()
        and out.is_contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.channels_last_3d)
    )
    for dim, cut in sorted(cuts.items(), key=lambda kv: kv[1].blocks == 1):
        keep = cut.keep().to(out.device)
        if cut.blocks > 1:
            rows = out.shape[0]
            idx = keep.repeat_interleave(rows // cut.blocks, dim=0)  # [rows, kept]
            idx = idx.view(rows, *([1] * (dim - 1)), keep.shape[1], *([1] * (out.dim() - dim - 1)))
            target = list(out.shape)
            target[dim] = keep.shape[1]
            out = torch.gather(out, dim, idx.expand(target))
            changed = True
        elif cut.removed.any():
            out = out.index_select(dim, keep[0])
            changed = True
    if not changed:
        return out.clone()
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.channels_last_3d)
    return out.contiguous() if not channels_last else out


def _conv_like(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def _conv_groups(model: nn.Module, cuts: Mapping[tuple[str, int], Cut]) -> dict[str, int]:
    """New `groups` of every grouped conv the cuts touch; raises if a cut would break its structure.

    The dim-0 rows (out-channels of a conv, in-channels of a ConvTranspose) are cut either evenly in
    every conv group (groups unchanged; the other channel dim is then cut per conv group) or, where a
    conv group reads a single input channel (depthwise), whole conv groups at a time (groups shrinks).
    """
    out: dict[str, int] = {}
    for mname, m in model.named_modules():
        if not _conv_like(m) or m.groups == 1:
            continue
        wname = f"{mname}.weight" if mname else "weight"
        rows, cols = cuts.get((wname, 0)), cuts.get((wname, 1))
        G = m.groups
        w = m.weight
        if cols is not None and cols.removed.any() and cols.blocks != G:
            raise ValueError(f"{mname}: dim 1 of a conv with {G} groups must be cut per conv group")
        if rows is None or not rows.removed.any():
            continue
        per = rows.removed[0].view(G, -1).sum(1)
        size = w.shape[0] // G
        # whole conv groups can go only where each group reads a single input channel (depthwise)
        single = (w.shape[1] == 1) if not m.transposed else (size == 1)
        if (per == per[0]).all():
            out[mname] = G
        elif single and ((per == 0) | (per == size)).all():
            out[mname] = int((per == 0).sum())
            if cols is not None and cols.removed.any():
                raise ValueError(f"{mname}: cannot drop whole conv groups and cut inside the others at once")
        else:
            raise ValueError(
                f"{mname}: rows removed per conv group differ ({per.tolist()}); the conv would break"
            )
    return out


def _new_attributes(
    m: nn.Module, new: Mapping[str, torch.Tensor], groups: int | None = None
) -> dict[str, Any]:
    """Module attributes that follow from its new tensor shapes (local names: 'weight', 'running_mean')."""
    w = new.get("weight")
    if _conv_like(m) and w is not None:
        G = m.groups if groups is None else groups
        if m.transposed:
            return {"in_channels": w.shape[0], "out_channels": w.shape[1] * G, "groups": G}
        return {"in_channels": w.shape[1] * G, "out_channels": w.shape[0], "groups": G}
    if isinstance(m, nn.Linear) and w is not None:
        return {"in_features": w.shape[1], "out_features": w.shape[0]}
    if isinstance(m, (nn.modules.batchnorm._NormBase,)):
        ref = w if w is not None else new.get("running_mean")
        return {} if ref is None else {"num_features": ref.shape[0]}
    if isinstance(m, nn.LayerNorm) and w is not None:
        return {"normalized_shape": tuple(w.shape)}
    if isinstance(m, nn.GroupNorm) and w is not None:
        return {"num_channels": w.shape[0]}
    if isinstance(m, nn.PReLU) and w is not None:
        return {"num_parameters": w.numel()}
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and w is not None:
        return {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]}
    return conv1d_attributes(m, w)


def _slice_state(state: Mapping[str, Any], like: torch.Tensor, cuts: Mapping[int, Cut], name: str) -> dict[str, Any]:
    """Optimizer state of one parameter: tensors shaped like it are cut the same way, factored ones (the
    parameter's shape with some dims reduced to 1: Adafactor's row_var / col_var) along the dims they
    keep, scalars kept. Any other tensor cannot be placed on the pruned parameter: ValueError (raised
    while nothing is modified yet)."""
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            out[k] = v
        elif v.shape == like.shape:
            out[k] = slice_tensor(v, cuts).to(v.dtype)
        elif (v.dim() == like.dim() and all(a == b or a == 1 for a, b in zip(v.shape, like.shape))
              and (v.shape[0] == like.shape[0] or all(c.blocks == 1 for c in cuts.values()))):
            kept = {d: c for d, c in cuts.items() if v.shape[d] == like.shape[d]}
            out[k] = slice_tensor(v, kept).to(v.dtype) if kept else v
        else:
            raise ValueError(
                f"{name}: the optimizer's state {k!r} has shape {tuple(v.shape)}, which does not follow the "
                f"parameter's shape {tuple(like.shape)}; it cannot be sliced with the parameter, so nothing was "
                "changed. Prune without the optimizer (optimizer=None) and rebuild it afterwards"
            )
    return out


def apply_cuts(
    model: nn.Module, cuts: Mapping[tuple[str, int], Cut], optimizer: Any = None, choices: Choices | None = None
) -> None:
    """Slice the model (and the optimizer state) by `cuts`. Validates and computes everything first.
    `choices`: how model-code attributes are settled (module_attrs.Choices: reused, or verified later)."""
    prepare_cuts(model, cuts, optimizer, choices)()


def prepare_cuts(
    model: nn.Module, cuts: Mapping[tuple[str, int], Cut], optimizer: Any = None, choices: Choices | None = None
) -> Callable[[], None]:
    """Validate `cuts` against the model and compute every new tensor and attribute, modifying nothing;
    returns the function that commits them (`zero_` validates through this too, then discards it)."""
    tensors = model_tensors(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    names = _aliases(tensors)
    by_tensor: dict[str, dict[int, Cut]] = {}
    for (name, dim), cut in cuts.items():
        if name != cut.name:
            continue  # the same cut under another name of a tied tensor
        if name not in tensors:
            raise ValueError(f"{name}: no such parameter or buffer in the model")
        if cut.removed.shape[1] != tensors[name].shape[dim]:
            raise ValueError(
                f"{name}: cut for dim {dim} has {cut.removed.shape[1]} indices, tensor has {tensors[name].shape[dim]}"
            )
        by_tensor.setdefault(name, {})[dim] = cut
    conv_groups = _conv_groups(model, cuts)

    # 1. compute every new tensor and attribute; nothing is modified yet
    new: dict[str, torch.Tensor] = {
        n: slice_tensor(tensors[n], c)
        for n, c in by_tensor.items()
        if any(x.removed.any() for x in c.values())
    }
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in new.items():
        for alias in names.get(name, [name]):  # every module holding a tied tensor gets new attributes
            mname, _, local = alias.rpartition(".")
            per_module.setdefault(mname, {})[local] = t
    attrs = {
        mname: _new_attributes(modules[mname], locals_, conv_groups.get(mname))
        for mname, locals_ in per_module.items()
    }
    # head counts, head dims, hidden sizes and config fields of attention layers (raises if a cut splits a head)
    attention = attention_updates(model, tensors, cuts)
    set_here = [(modules[m], k, v) for m, a in attrs.items() for k, v in a.items()]
    others = module_updates(model, tensors, cuts, attention + set_here)  # model-code integers (ViT's hidden_dim)
    unique = {id(c): c for c in cuts.values()}.values()
    hooks = kept_heads.plan_hooks(model, [x for c in unique for x in c.inputs])
    params = dict(model.named_parameters())
    old_to_new: dict[int, nn.Parameter] = {}
    grads: dict[int, torch.Tensor | None] = {}
    for name, t in new.items():
        if name in params:
            p = params[name]
            np_ = nn.Parameter(t.to(p.dtype), requires_grad=p.requires_grad)
            old_to_new[id(p)] = np_
            g = p.grad
            grads[id(p)] = slice_tensor(g, by_tensor[name]) if g is not None and g.shape == p.shape else None
    states: dict[int, dict[str, Any]] = {}
    names = {id(p): n for n, p in params.items()}
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in old_to_new and p in optimizer.state:
                    states[id(p)] = _slice_state(optimizer.state[p], p, by_tensor[names[id(p)]], names[id(p)])
    new_groups = None
    if optimizer is not None and hasattr(optimizer, "reset_groups"):
        new_groups = remap_groups(list(optimizer.groups), cuts)

    def commit_all() -> None:
        _commit(model, modules, params, new, tensors, old_to_new, grads, attrs, attention, others, optimizer,
                states, new_groups, choices)
        kept_heads.install(hooks)

    return commit_all


def _commit(model, modules, params, new, tensors, old_to_new, grads, attrs, attention, others, optimizer, states,
            new_groups, choices) -> None:
    """Step 2 of apply_cuts: install what prepare_cuts computed."""
    for name, t in new.items():
        if name in params:
            continue
        mname, _, local = name.rpartition(".")
        modules[mname]._buffers[local] = t.to(tensors[name].dtype)
    for m in model.modules():
        for local, p in list(m._parameters.items()):
            if p is not None and id(p) in old_to_new:
                np_ = old_to_new[id(p)]
                np_.grad = grads[id(p)]
                m._parameters[local] = np_
    for mname, a in attrs.items():
        mod = modules[mname]
        for k, v in a.items():
            setattr(mod, k, v)
    commit(attention)
    others.commit(model, choices)
    if optimizer is not None:
        state = optimizer.state
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                np_ = old_to_new.get(id(p))
                if np_ is None:
                    continue
                group["params"][i] = np_
                if id(p) in states:
                    state.pop(p, None)
                    state[np_] = states[id(p)]
        if new_groups is not None:
            optimizer.reset_groups(new_groups)


# ----------------------------------------------------------------------------------------- soft pruning


def zero_channels(model: nn.Module, removals: Iterable[Removal]) -> None:
    """Zero the removed channels in every slot, in place (shapes unchanged). Validate with build_cuts first."""
    tensors = model_tensors(model)
    with torch.no_grad():
        for group, removed in removals:
            mask = _channel_mask(group, removed)
            if not mask.any():
                continue
            for slot in group.slots:
                sub = mask[slot.offset : slot.offset + slot.length]
                if not sub.any():
                    continue
                t = tensors[slot.name]
                view = slot_view(t, slot_geometry(t, slot))
                view.masked_fill_(sub.view(slot.blocks, 1, -1, 1).to(t.device), 0)


# ---------------------------------------------------------------------------------------- group remap


def _slot_removed(slot: Slot, cut: Cut | None) -> torch.Tensor:
    """Which of the slot's group channels the cut removes ([slot.length] bool); raises if it splits one."""
    if cut is None or not cut.removed.any():
        return torch.zeros(slot.length, dtype=torch.bool)
    if slot.blocks > 1:
        if cut.blocks != slot.blocks:
            raise ValueError(f"{slot.name}: cut per {cut.blocks} blocks, slot has {slot.blocks}")
        per = slot.length // slot.blocks
        return cut.removed[:, slot.start : slot.start + per].reshape(-1).clone()
    if cut.blocks != 1:
        raise ValueError(f"{slot.name}: dim {slot.dim} was cut per conv group, the slot reads it whole")
    r = cut.removed[0, slot.start : slot.start + slot.length * slot.repeat].view(slot.length, slot.repeat)
    if (r.any(1) != r.all(1)).any():
        raise ValueError(f"{slot.name}: the cut removes part of a channel's {slot.repeat} indices")
    return r.all(1)


def remap_groups(groups: Iterable[Group], cuts: Mapping[tuple[str, int], Cut]) -> list[Group]:
    """The groups as they are after `cuts`: same slots, new sizes, offsets and starts.

    Raises ValueError if a group's slots disagree about which channels went (the groups were not the
    ones the cuts were made from; find the groups again on the pruned model instead).
    """
    out: list[Group] = []
    for group in groups:
        removed = torch.zeros(group.size, dtype=torch.bool)
        seen = torch.zeros(group.size, dtype=torch.bool)
        per_slot = []
        for slot in group.slots:
            r = _slot_removed(slot, cuts.get((slot.name, slot.dim)))
            rng = slice(slot.offset, slot.offset + slot.length)
            clash = seen[rng] & (removed[rng] != r)
            if clash.any():
                raise ValueError(
                    f"group {group.origin!r}: slot {slot.name} disagrees with the group's other slots about removed "
                    "channels; call find_groups on the pruned model"
                )
            removed[rng] |= r
            seen[rng] = True
            per_slot.append(r)
        for slot, r in zip(group.slots, per_slot):
            if (removed[slot.offset : slot.offset + slot.length] != r).any():
                raise ValueError(f"group {group.origin!r}: slot {slot.name} keeps channels the group removes")
        size = int((~removed).sum())
        if size == 0:
            continue
        slots = []
        for slot, r in zip(group.slots, per_slot):
            length = slot.length - int(r.sum())
            if length == 0:
                continue
            cut = cuts.get((slot.name, slot.dim))
            # blocked slots (experts' gate/up halves) lose the same count before their start in every block
            start = slot.start - (cut.removed_before(slot.start) if cut is not None else 0)
            slots.append(
                replace(
                    slot, offset=slot.offset - int(removed[: slot.offset].sum()), length=length, start=start
                )
            )
        inputs = tuple(_remap_input(hi, removed) for hi in group.inputs)
        out.append(replace(group, size=size, slots=tuple(slots), index=len(out), inputs=inputs))
    return out


def _remap_input(hi, removed: torch.Tensor):
    """A HeadInput after the cut: the kept heads, renumbered (the module's hook now narrows to them)."""
    kept = [c for c in hi.channels if not removed[c]]
    return replace(hi, heads=len(kept), channels=tuple(c - int(removed[:c].sum()) for c in kept))
