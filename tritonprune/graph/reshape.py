"""Rules for ops that move channels around: views, permutes, slices, splits, concatenation."""

from __future__ import annotations

import operator

import torch
from torch import fx

from .channels import IdSpace, channel_vector, expand_dims, has_ids, none_like
from .elementwise import align, combine, combine_all
from .layers import transposed_weight
from .walker import Walker, no_identity, overloads, rule, unknown, where

MATMULS = set(overloads(torch.ops.aten.mm, torch.ops.aten.matmul))

aten = torch.ops.aten

# ---- layout ops -------------------------------------------------------------------------------


def reshape_runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of dims of two shapes with equal products (the way a view regroups dims)."""
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        si, sj = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                pa *= a[i]
                si.append(i)
                i += 1
            else:
                if j >= len(b):
                    return None
                pb *= b[j]
                sj.append(j)
                j += 1
        runs.append((si, sj))
    rest_a, rest_b = list(range(i, len(a))), list(range(j, len(b)))
    if any(a[k] != 1 for k in rest_a) or any(b[k] != 1 for k in rest_b):
        return None
    if not runs:
        runs.append(([], []))
    runs[-1][0].extend(rest_a)
    runs[-1][1].extend(rest_b)
    return runs


def reshape_ids(ids: torch.Tensor, src: tuple[int, ...], dst: tuple[int, ...],
                space: IdSpace | None = None, runs: list | None = None) -> torch.Tensor | None:
    runs = reshape_runs(src, dst) if runs is None else runs
    if runs is None:
        return None
    if ids.numel() == 1:
        return ids.reshape((1,) * len(dst))  # one id everywhere (mostly: no identity): nothing to move
    varying = [any(ids.shape[k] > 1 for k in si) for si, _ in runs]
    moved = [r for r, v in zip(runs, varying) if v]
    if len(moved) == 1 and len(moved[0][0]) == 1 and len(moved[0][1]) == 1:
        # the one channel dim passes as it is, the view regroups others (`x.view(-1, C)`, `view(B, N, C)`)
        return compact(ids.reshape([dst[k] if v else 1 for (_, sj), v in zip(runs, varying) for k in sj]))
    spread = [d for (si, _), v in zip(runs, varying) if v for d in si]
    full = expand_dims(ids, src, spread)
    target = []
    for (_, sj), v in zip(runs, varying):
        target.extend(dst[k] if v else 1 for k in sj)
    new = full.reshape(target)
    if space is not None and sum(varying) == 1:
        _split_structure(space, new, runs, varying, dst)
    return compact(new)


def compact(ids: torch.Tensor) -> torch.Tensor:
    """Ids that are the same all along a dim kept as size 1 there (a view back from (G, C/G*H*W) to
    (C, H, W) leaves the channels on C alone)."""
    for d in range(ids.dim()):
        if ids.shape[d] > 1:
            first = ids.narrow(d, 0, 1)
            if torch.equal(ids, first.expand_as(ids)):  # (one call where == and all() are three)
                ids = first
    return ids


def _split_structure(space: IdSpace, new: torch.Tensor, runs, varying, dst) -> None:
    """A channel dim split into (outer, inner) dims keeps its outer count after pruning (channel
    shuffle's groups, attention heads): record it as equal blocks."""
    sj = runs[varying.index(True)][1]
    big = [k for k in sj if dst[k] > 1]
    if len(big) < 2:
        return
    if all(new.shape[k] == 1 for k in range(new.dim()) if k not in big):
        sub = new.reshape(-1, dst[big[-1]])  # nothing but the split dims (heads): their rows as they are
    else:
        sub = new.movedim(big, list(range(new.dim() - len(big), new.dim())))
        sub = sub.reshape(-1, *[dst[k] for k in big])[0].reshape(-1, dst[big[-1]])
    blocks = _blocks(sub)
    if blocks is not None:
        space.soft_requirements.append(blocks)


def _blocks(sub: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The distinct rows of `sub` [outer, inner] (a channel repeated along the inner dim counted once)
    as blocks (ids in order, count) when they are at least two and hold distinct channels; else None."""
    if sub.numel() <= 4096:
        # attention heads (a few short rows): the same on Python lists, a dozen small torch calls less
        listed = sub.tolist()
        if not any(a == b for r in listed for a, b in zip(r, r[1:])):
            return _distinct_rows(sub, listed)
    # a channel repeated along the inner dim (GroupNorm's view of (C/G, H, W) as one dim): once each
    new_run = torch.ones_like(sub, dtype=torch.bool)
    new_run[:, 1:] = sub[:, 1:] != sub[:, :-1]
    if bool((new_run == new_run[:1]).all()):
        sub = sub[:, new_run[0]]
    rows = torch.unique_consecutive(sub, dim=0) if sub.shape[0] > 1 else sub
    rows = torch.unique(rows, dim=0, sorted=False) if rows.shape[0] > 1 else rows
    flat = rows.reshape(-1)
    if rows.shape[0] > 1 and bool((flat >= 0).all()) and flat.unique().numel() == flat.numel():
        order = torch.argsort(rows[:, 0])
        return rows[order].reshape(-1).clone(), rows.shape[0]
    return None


def _distinct_rows(sub: torch.Tensor, listed: list[list[int]]) -> tuple[torch.Tensor, int] | None:
    """`_blocks` for rows without repeats, read from their list `listed`."""
    first: dict[tuple, int] = {}
    for i, r in enumerate(listed):
        first.setdefault(tuple(r), i)
    flat = [v for r in first for v in r]
    if len(first) < 2 or min(flat) < 0 or len(set(flat)) != len(flat):
        return None
    order = sorted(first.values(), key=lambda i: listed[i][0])  # distinct ids: by first id is by row
    if order == list(range(len(listed))):
        return sub.reshape(-1), len(order)  # heads in order (the common case): no copy to make
    return sub[order].reshape(-1), len(order)


@rule(*overloads(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
                 aten.unsqueeze, aten.view_as, aten.reshape_as, aten.squeeze_, aten.unsqueeze_))
def view(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    src, dst = w.shape(node.args[0]), w.out_shape(node)
    runs = reshape_runs(src, dst)
    new = reshape_ids(ids, src, dst, w.space, runs) if runs is not None else None
    if new is None:
        w.warn(node, "cannot follow channels through this reshape")
        w.space.exclude(ids)
        return no_identity(w, node)
    _note_outer_count(w, node, ids, src, dst, runs)
    return new


def _note_outer_count(w: Walker, node: fx.Node, ids: torch.Tensor, src: tuple[int, ...], dst: tuple[int, ...],
                      runs: list) -> None:
    """A channel dim viewed as (outer, inner, ...) where `outer` is an integer attribute of the module
    running the view (Ultralytics' Attention: `qkv.view(B, self.num_heads, ..., N)`, qkv's conv two levels
    down): that module reads the count of the group its channels fall into (heads, when they go whole),
    so slicing updates the attribute there (Group.readers)."""
    for si, sj in runs:
        if len(si) != 1 or len(sj) < 2 or ids.shape[si[0]] == 1:
            continue
        big = [k for k in sj if dst[k] > 1]
        if len(big) < 2:
            continue
        if dst[big[0]] not in _int_attributes(_running_module(w, node)):
            continue  # checked first: the attribute is rarely there, the channel vector costs torch calls
        vec = channel_vector(ids, si[0], src[si[0]])
        if vec is not None and bool((vec >= 0).all()):
            w.space.readers.append((vec.clone(), w.module_of(node).replace("<root>", "")))


@rule(*overloads(aten.expand, aten.expand_as, aten.repeat))
def expand(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    out = w.out_shape(node)
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    ids = align(ids, len(out))
    src = (1,) * (len(out) - len(w.shape(node.args[0]))) + w.shape(node.args[0])
    if node.target in overloads(aten.repeat) and any(
        ids.shape[d] > 1 and out[d] != src[d] for d in range(len(out))
    ):
        # tiles of a channel dim (DeBERTa's per-head position terms repeated for every batch item): tile
        # i holds the same channels, so the ids repeat; the count of tiles stays whatever pruning does
        return ids.repeat(*[out[d] // src[d] if ids.shape[d] > 1 else 1 for d in range(len(out))])
    return ids


@rule(*overloads(aten.permute, aten.transpose, aten.t, aten.swapaxes, aten.movedim, aten.numpy_T))
def permute(w: Walker, node: fx.Node) -> object:
    if node.users and all(u.target in MATMULS and u.args[1] is node and u.args[0] is not node for u in node.users) \
            and transposed_weight(w, node) is not None:
        return None  # x @ W.T: the matmul rule reads the weight as a Linear's (no ids for W.T itself)
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    nd = ids.dim()
    if node.target.overloadpacket is aten.permute:
        return ids.permute(*[d % nd for d in node.args[1]])
    if node.target.overloadpacket is aten.t:
        return ids.t() if nd == 2 else ids
    if node.target.overloadpacket is aten.numpy_T:
        return ids.permute(*reversed(range(nd)))
    if node.target.overloadpacket is aten.movedim:
        return ids.movedim(node.args[1], node.args[2])
    return ids.transpose(node.args[1], node.args[2])


def _dim(node: fx.Node, pos: int, default: int, nd: int) -> int:
    d = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", default)
    return d % nd


@rule(*overloads(aten.slice))
def slice_(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    src = w.shape(node.args[0])
    d = _dim(node, 1, 0, len(src))
    out = w.out_shape(node)
    if ids.shape[d] == 1:
        return ids
    if out[d] == src[d]:
        return ids
    start, step = _slice_range(node, src[d])[0], node.args[4] if len(node.args) > 4 else 1
    if node.users and all(u.target is aten.copy_.default and u.args[0] is node for u in node.users):
        pass  # only written into: slice_scatter checks the positions written
    elif (blocks := _constant_block(node, src[d], start, out[d], step)) is not None:
        # one of k equal blocks overwritten with a constant (Swin v2 zeroes the key third of its packed
        # qkv bias, at `numel() // 3`): the blocks stay equal, so the slice still covers the same part
        w.space.require_blocks(expand_dims(ids, src, [d]).movedim(d, 0).reshape(src[d], -1)[:, 0], blocks)
        return ids.index_select(d, torch.arange(start, start + out[d], 1))
    elif _partition_part(w, node, d, src[d]) is None:
        w.space.fix_dim(ids, d, where(w, node, "slicing along a channel dim hard-codes channel positions"))
    else:
        # one part of a partition of the dim by slices (Phi-3's q | k | v of qkv_proj at positions from the
        # config): a split, sized by module attributes, so each part keeps its own channels; the attributes
        # follow the cut, and where they cannot the run check leaves those groups out, naming them
        ids = expand_dims(ids, src, [d])
    return ids.index_select(d, torch.arange(start, start + out[d] * step, step))


_CONSTANT_WRITES = (aten.zero.default, aten.fill.Scalar, aten.fill.Tensor)


def _constant_block(node: fx.Node, n: int, start: int, length: int, step: int) -> int | None:
    """k when the slice [start, start + length) is block number start/length of k = n/length equal blocks
    (k <= 4: a packed q | k | v) and is only overwritten in place with a constant (zero_, fill_), written
    back into the tensor it slices; else None. The model computes such bounds from the size (positions
    written as literals would move after pruning: a risk taken only for constant overwrites of a block)."""
    if step != 1 or length < 1 or n % length or start % length or not 2 <= n // length <= 4 or not node.users:
        return None
    for u in node.users:
        if u.target not in _CONSTANT_WRITES or u.args[0] is not node:
            return None
        if not u.users or any(s.target is not aten.slice_scatter.default or s.args[0] is not node.args[0]
                              for s in u.users):
            return None
    return n // length


def _writes_constant_block(scatter: fx.Node, n: int, start: int, end: int, step: int) -> bool:
    """The slice_scatter writes back a constant overwrite of the block its slice rule accepted."""
    written = scatter.args[1]
    sliced = written.args[0] if isinstance(written, fx.Node) and written.target in _CONSTANT_WRITES else None
    return (isinstance(sliced, fx.Node) and getattr(sliced.target, "overloadpacket", None) is aten.slice
            and sliced.args[0] is scatter.args[0] and _constant_block(sliced, n, start, end - start, step) is not None)


def _slice_range(node: fx.Node, n: int) -> tuple[int, int]:
    """[start, end) of a slice node along a dim of size `n`."""
    return _range(node.args[2] if len(node.args) > 2 else None, node.args[3] if len(node.args) > 3 else None, n)


def _range(start: int | None, end: int | None, n: int) -> tuple[int, int]:
    """[start, end) along a dim of size `n`, clipped as Python slicing does."""
    start, end = (min(max(v + n if v < 0 else v, 0), n) for v in (start or 0, n if end is None else end))
    return start, max(start, end)


def _partition_part(w: Walker, node: fx.Node, d: int, n: int) -> tuple[int, int] | None:
    """This slice's [start, end) where the step-1 slices of the same tensor along dim `d` tile it exactly
    (at least two parts, no overlap) and every part size above 1 is an integer attribute of the module
    running them, or of its config, or a product of two such (`num_heads * head_dim`); else None."""
    src = node.args[0]
    nd = len(w.shape(src))
    ranges = []
    for u in src.users:
        if u.op != "call_function" or getattr(u.target, "overloadpacket", None) is not aten.slice:
            continue
        if _dim(u, 1, 0, nd) != d or (len(u.args) > 4 and u.args[4] != 1):
            continue
        ranges.append(_slice_range(u, n))
    ranges = sorted(set(ranges))
    if len(ranges) < 2 or ranges[0][0] != 0 or ranges[-1][1] != n:
        return None
    if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        return None
    module = _running_module(w, node)
    values = _int_attributes(module) | _int_attributes(getattr(module, "config", None))
    products = values | {a * b for a in values for b in values}
    if not all(e - s in products for s, e in ranges if e - s > 1):
        return None
    return _slice_range(node, n)


def _int_attributes(obj: object) -> set[int]:
    """The integer attributes above 1 of `obj` (a module, or its config)."""
    if obj is None:
        return set()
    return {v for v in vars(obj).values() if isinstance(v, int) and not isinstance(v, bool) and v > 1}


def _running_module(w: Walker, node: fx.Node) -> object:
    """The module whose forward runs `node` (None outside the model's modules)."""
    return w.modules.get(w.module_of(node).replace("<root>", ""))


@rule(*overloads(aten.slice_scatter))
def slice_scatter(w: Walker, node: fx.Node) -> object:
    """`base` with `src` written into a slice along `dim` (recorded for in-place writes into a slice)."""
    out = w.out_shape(node)
    nd = len(out)
    d = _dim(node, 2, 0, nd)
    base, src = (w.act(a) for a in node.args[:2])
    base = base if isinstance(base, torch.Tensor) else none_like(out)
    src = src if isinstance(src, torch.Tensor) else none_like(w.shape(node.args[1]))
    start, end = _range(node.args[3] if len(node.args) > 3 else None, node.args[4] if len(node.args) > 4 else None, out[d])
    step = node.args[5] if len(node.args) > 5 else 1
    src_full = src.expand(*[w.shape(node.args[1])[k] if k == d or src.shape[k] > 1 else 1 for k in range(nd)])
    if src_full.shape[d] > 1 and src.shape[d] > 1 and not _writes_constant_block(node, out[d], start, end, step):
        # the positions written are fixed: fine for whole heads written into a per-head dim
        w.space.fix_dim(src_full, d, where(w, node, "writing into a slice along a channel dim hard-codes channel positions"))
    target = [max(base.shape[k], src_full.shape[k]) if k != d else out[d] for k in range(nd)]
    ids = base.expand(*[target[k] if base.shape[k] == 1 else base.shape[k] for k in range(nd)]).clone()
    index = [slice(None)] * nd
    index[d] = slice(start, end, step)
    ids[tuple(index)] = src_full
    return ids


@rule(*overloads(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty_strided))
def new_tensor(w: Walker, node: fx.Node) -> object:
    """A fresh tensor (`x.new_zeros(shape)`: Swin's shifted-window mask; Ultralytics' anchors
    `feats[i].new_full((h * w, 1), stride)`) reads only the dtype and device of `x`: its values carry no
    channels (the ones written into it later do, see slice_scatter)."""
    return no_identity(w, node)


@rule(*overloads(aten.view_as_complex))
def view_as_complex(w: Walker, node: fx.Node) -> object:
    """Pairs of the last dim become one complex number (DeepSeek-V2's rotary): a pair is one channel."""
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    if ids.shape[-1] > 1:
        w.space.union(ids[..., 0], ids[..., 1])
    return ids[..., 0]


@rule(*overloads(aten.view_as_real))
def view_as_real(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    return ids.unsqueeze(-1) if isinstance(ids, torch.Tensor) else no_identity(w, node)


@rule(*overloads(aten.polar))
def polar(w: Walker, node: fx.Node) -> object:
    """A complex number from its magnitude and angle: elementwise in both."""
    return combine(w, node, [a for a in node.args[:2] if isinstance(a, fx.Node)])


@rule(*overloads(aten.ones_like, aten.zeros_like, aten.empty_like, aten.full_like, aten.zero, aten.fill))
def like(w: Walker, node: fx.Node) -> object:
    """A constant of another tensor's shape: that tensor's dims (its size follows theirs). `zero_`/`fill_`
    in place are recorded as `zero`/`fill` (Swin v2 zeroes the key part of a copied qkv bias)."""
    ids = w.act(node.args[0])
    return ids if isinstance(ids, torch.Tensor) else no_identity(w, node)


def parts_along(ids: torch.Tensor, d: int) -> torch.Tensor:
    """The ids of each index along dim `d`, one row per index."""
    return ids.movedim(d, 0).reshape(ids.shape[d], -1)


@rule(*overloads(aten.select))
def select(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    d = node.args[1] % ids.dim()
    if ids.shape[d] > 1:
        if node.name in w.joined_selects:
            # the parts fell into different groups on a first walk: join them position by position (the
            # same heads of q, k and v go together), which keeps them equal
            w.space.union(ids.select(d, node.args[2]), ids.select(d, 0))
        # fine while pruning never changes the size of this dim (q/k/v of a packed projection)
        w.space.require_balanced(parts_along(ids, d), where(w, node, "selecting by position along a channel dim"),
                                 select=node.name)
        return ids.select(d, node.args[2])
    return ids.squeeze(d)


@rule(*overloads(aten.roll))
def roll(w: Walker, node: fx.Node) -> object:
    """A cyclic shift (Swin's shifted windows roll the spatial dims): channels move with their
    positions; along a dim where channels run, the shift wraps at the dim's size, so that dim stays."""
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    shifts = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not dims:  # the flattened tensor is rolled: positions mix every dim
        w.space.fix_dim(ids.reshape(-1), 0, where(w, node, "rolling a flattened tensor moves channel positions"))
        return ids.reshape(-1).roll(shifts[0]).reshape(ids.shape)
    for s, d in zip(shifts, dims):
        d %= ids.dim()
        if ids.shape[d] > 1 and not bool((ids == ids.narrow(d, 0, 1)).all()):
            w.space.fix_dim(ids, d, where(w, node, "rolling along a channel dim moves channel positions"))
        ids = ids.roll(s, d)
    return ids


@rule(*overloads(aten.chunk))
def chunk(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    src = w.shape(node.args[0])
    n_out = len(node.meta["val"])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    d = _dim(node, 2, 0, len(src))
    if ids.shape[d] == 1:
        return [ids] * n_out
    vec = channel_vector(ids, d, src[d])
    if vec is None and not src[d] % n_out:
        # channels along other dims too (GPT-NeoX's q/k/v chunked out of each head): fine while every
        # channel owns as many elements in each part, as for an equal split
        full = expand_dims(ids, src, [d])
        parts = full.movedim(d, 0).reshape(n_out, src[d] // n_out, -1).flatten(1)
        w.space.require_balanced(parts, where(w, node, "chunk along a channel dim into parts that pruning would make unequal"))
        return list(full.chunk(n_out, d))
    if vec is None or src[d] % n_out:
        w.warn(node, "chunk into unequal parts along a channel dim")
        w.space.exclude(ids)
    else:
        # pruning keeps the chunks equal by removing the same count from each
        w.space.require_blocks(vec, n_out)
    return list(ids.chunk(n_out, d))


@rule(*overloads(aten.split, aten.split_with_sizes, aten.unbind, aten.tensor_split))
def split(w: Walker, node: fx.Node) -> object:
    if w.tensor_name(node.args[0]) is not None and _only_linear_rows(node):
        # a parameter split into row blocks that Linears use as weight or bias (layers.row_block)
        return [none_like(v.shape) for v in node.meta["val"]]
    ids = w.act(node.args[0])
    src = w.shape(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    d = _dim(node, 2, 0, len(src)) if node.target.overloadpacket is not aten.unbind else _dim(node, 1, 0, len(src))
    vals = node.meta["val"]
    if ids.shape[d] == 1:
        return [ids if node.target.overloadpacket is not aten.unbind else ids.squeeze(d) for _ in vals]
    sizes = [int(v.shape[d]) for v in vals] if node.target.overloadpacket is not aten.unbind else [1] * len(vals)
    full = expand_dims(ids, src, [d])
    if len(set(sizes)) == 1 and sum(sizes) == src[d]:
        # equal parts (q, k, v of a fused projection): allowed while every channel owns as many
        # elements in each part, so the parts stay equal after pruning
        parts = full.movedim(d, 0).reshape(len(sizes), sizes[0], -1).flatten(1)
        vec = channel_vector(ids, d, src[d])
        # parts sized by an attribute of the module running the split (C2PSA's `split((self.c, self.c))`)
        # may instead fall into different groups, kept equal as a chunk's blocks (see assemble)
        sized_by = w.module_of(node).replace("<root>", "") if vec is not None and bool((vec >= 0).all()) \
            and len(sizes) > 1 and _sizes_are_attributes(w, node, sizes) else None
        w.space.require_balanced(parts, where(w, node, "split along a channel dim into parts that pruning would make unequal"),
                                 sized_by=sized_by)
    elif _sizes_are_attributes(w, node, sizes):
        # unequal parts whose sizes the module keeps as attributes (multi-query q | k | v by embed_dim,
        # kv_dim or num_heads): each part keeps its own channels, slicing updates the attributes, and
        # where it cannot, the run check sees the split fail and leaves those groups out, naming them
        pass
    else:
        w.warn(node, "split with fixed unequal sizes along a channel dim (use chunk for an equal, prunable split)")
        w.space.exclude(ids)
    ids = full
    parts = list(ids.split(sizes, d))
    return [p.squeeze(d) for p in parts] if node.target.overloadpacket is aten.unbind else parts


def _only_linear_rows(node: fx.Node) -> bool:
    """Every part of this split is only a Linear's weight or bias."""
    for item in node.users:
        if item.target is not operator.getitem or not item.users:
            return False
        for u in item.users:
            if getattr(u.target, "overloadpacket", None) is not aten.linear or item in (u.args[:1]):
                return False
            if not any(a is item for a in u.args[1:3]) and u.kwargs.get("bias") is not item:
                return False
    return True


def _sizes_are_attributes(w: Walker, node: fx.Node, sizes: list[int]) -> bool:
    """Every part size above 1 is an integer attribute of the module running the split."""
    values = _int_attributes(_running_module(w, node))
    return all(n in values for n in sizes if n > 1)


@rule(*overloads(aten.cat, aten.concat, aten.concatenate))
def cat(w: Walker, node: fx.Node) -> object:
    tensors = [t for t in node.args[0]]
    out = w.out_shape(node)
    nd = len(out)
    d = _dim(node, 1, 0, nd)
    parts = []
    for t in tensors:
        ids = w.act(t)
        shape = w.shape(t)
        if shape is None or (len(shape) == 1 and shape[0] == 0):
            continue  # legacy empty tensors are skipped by cat
        if not isinstance(ids, torch.Tensor):
            ids = none_like(shape)
        parts.append((ids, shape))
    if not any(ids.shape[d] > 1 for ids, _ in parts):
        # concatenating along a dim without channels: channels at the same position are the same
        return combine_all(w, node, parts, out)
    pieces = []
    for ids, shape in parts:
        pieces.append(expand_dims(ids, shape, [d]))
    target = [max(p.shape[k] for p in pieces) if k != d else None for k in range(nd)]
    pieces = [p.expand(*[p.shape[k] if k == d else target[k] for k in range(nd)]) for p in pieces]
    return torch.cat(pieces, d)


@rule(*overloads(aten.stack))
def stack(w: Walker, node: fx.Node) -> object:
    out = w.out_shape(node)
    d = _dim(node, 1, 0, len(out))
    parts = [(w.act(t) if isinstance(w.act(t), torch.Tensor) else none_like(w.shape(t)), w.shape(t))
             for t in node.args[0]]
    return combine_all(w, node, parts, out).unsqueeze(d)


@rule(*overloads(aten.constant_pad_nd, aten.pad))
def pad(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    pads = list(node.args[1])
    nd = ids.dim()
    for k in range(len(pads) // 2):
        d = nd - 1 - k
        if (pads[2 * k] or pads[2 * k + 1]) and ids.shape[d] > 1:
            w.warn(node, "padding along a channel dim")
            w.space.exclude(ids)
            return no_identity(w, node)
    return ids


@rule(*overloads(aten.repeat_interleave))
def repeat_interleave(w: Walker, node: fx.Node) -> object:
    """Each index along `dim` repeated in place (GPT-J's sin/cos, a key/value head per query head)."""
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor) or node.target is not aten.repeat_interleave.self_int:
        return no_identity(w, node) if not isinstance(ids, torch.Tensor) or not has_ids(ids) else unknown(w, node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:
        return unknown(w, node) if has_ids(ids) else no_identity(w, node)
    d = dim % ids.dim()
    return ids.repeat_interleave(int(node.args[1]), d) if ids.shape[d] > 1 else ids
