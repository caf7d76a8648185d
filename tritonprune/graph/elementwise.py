"""Rules for elementwise and broadcast ops, activations, pooling and reductions."""

from __future__ import annotations

import operator

import torch
from torch import fx

from .channels import NONE, has_ids, none_like
from .entries import MEETS_CONSTANT, adapt_entry
from .walker import Rule, Walker, no_identity, overloads, rule, where

aten = torch.ops.aten


# ---- shape-preserving and elementwise ops -----------------------------------------------------


def align(ids: torch.Tensor, ndim: int) -> torch.Tensor:
    if ids.dim() == ndim:
        return ids
    return ids.reshape((1,) * (ndim - ids.dim()) + tuple(ids.shape))


def combine(w: Walker, node: fx.Node, operands: list[fx.Node]) -> torch.Tensor:
    """Elementwise coupling with broadcasting: channels at the same position are the same channel."""
    out = w.out_shape(node) if isinstance(node.meta.get("val"), torch.Tensor) else None
    if out is None:
        return None
    nd = len(out)
    acc_ids, acc_shape = None, None
    tables = []
    for op in _entries_last(w, node, operands):
        ids = w.act(op)
        shape = _unexpanded_shape(w, op, ids)
        if not isinstance(ids, torch.Tensor) or shape is None:
            continue
        ids = align(ids, nd)
        shape = (1,) * (nd - len(shape)) + shape
        if acc_ids is not None and not has_ids(ids) and has_ids(acc_ids) and adapt_entry(w, node, op, acc_ids, shape):
            # a per-head value the module receives from outside (a bias): narrowed at the module's entry
            acc_shape = tuple(max(x, y) for x, y in zip(acc_shape, shape))
            continue
        if w.is_table(ids):
            tables.append(ids)
            continue
        if acc_ids is None:
            acc_ids, acc_shape = ids, shape
            continue
        # an operand broadcast along a dim where the other has channels does not share its channels
        acc_bc = [d for d in range(nd) if acc_shape[d] == 1 and shape[d] > 1]
        op_bc = [d for d in range(nd) if shape[d] == 1 and acc_shape[d] > 1]
        acc_spread = any(ids.shape[d] > 1 for d in acc_bc)
        op_spread = any(acc_ids.shape[d] > 1 for d in op_bc)
        if acc_spread and op_spread:
            w.warn(node, "broadcast mixes channels of two operands")
            w.space.exclude(acc_ids)
            w.space.exclude(ids)
            acc_ids = none_like(out)
        elif acc_spread:
            _note_table(w, node, ids, shape, acc_ids, acc_shape)
            _shared(w, node, ids, acc_ids)
            acc_ids = ids
        elif op_spread:
            _note_table(w, node, acc_ids, acc_shape, ids, shape)
            _shared(w, node, acc_ids, ids)
        else:
            acc_ids = couple(w, node, acc_ids, acc_shape, ids, shape)
        acc_shape = tuple(max(x, y) for x, y in zip(acc_shape, shape))
    return _read_tables(w, node, acc_ids, tables, out)


def _unexpanded_shape(w: Walker, op: fx.Node, ids: object) -> tuple[int, ...] | None:
    """The shape an operand brings to the broadcast: a value without channels expanded first
    (F.normalize's `norm.expand_as(x)`, a per-head statistic) broadcasts as it was before the expand."""
    while (getattr(op.target, "overloadpacket", None) in (aten.expand, aten.expand_as)
           and isinstance(op.args[0], fx.Node) and isinstance(ids, torch.Tensor) and not has_ids(ids)):
        op = op.args[0]
    return w.shape(op)


def _entries_last(w: Walker, node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
    """Forward arguments of the running module without channels go after the other operands, so they
    meet the channels of all the others (see entries.adapt_entry)."""
    entries = getattr(w.ep, "entries", None)
    if not entries:
        return operands
    module = w.module_of(node)
    late = [op for op in operands if (module, op) in entries and not has_ids(w.act(op) if isinstance(w.act(op), torch.Tensor) else None)]
    return [op for op in operands if op not in late] + late if late else operands


def _note_table(w: Walker, node: fx.Node, ids: torch.Tensor, shape: tuple[int, ...], other: torch.Tensor,
                other_shape: tuple[int, ...]) -> None:
    """A parameter or buffer used as a value, spread by a value without identity along a dim it does not
    have: an outer product with positions (rotary inv_freq x position ids, before cos/sin). The result is
    a table that every head of every layer reads at the same positions; see `_read_tables`."""
    if getattr(node.target, "overloadpacket", None) in (aten.add, aten.sub, aten.add_, aten.sub_):
        return  # a mask added to a per-head bias table (BEiT) shifts it, the channels stay the table's own
    if not has_ids(other) and w.is_param_value(ids) and any(s == 1 and o > 1 for s, o in zip(shape, other_shape)):
        w.mark_table(ids)
        w.space.exclude(ids)  # never pruned: its columns are read by every head, whole heads go without it


def _read_tables(w: Walker, node: fx.Node, acc: torch.Tensor | None, tables: list[torch.Tensor],
                 out: tuple[int, ...]) -> torch.Tensor:
    """Channels reading a table (see `_note_table`) are never coupled to it, even where they broadcast
    over nothing (a layer left with one key/value head): it is shared by all its readers as a QK-norm
    weight is by the heads, so the readers' dims along its columns keep their size (whole heads only).
    Coupling only single-head readers would tie their channels to every other reader's, in every layer."""
    if not tables:
        return acc if acc is not None else none_like(out)
    if acc is None or not has_ids(acc):
        return tables[0]
    for t in tables:
        _shared(w, node, acc, t)
    return acc


def _meet_without_identity(w: Walker, node: fx.Node, ids: torch.Tensor, other: torch.Tensor,
                           other_shape: tuple[int, ...]) -> None:
    """Channels meeting values without identity (model inputs, constants, rotary tables) at the same
    positions: the dims where the partner has real extent keep their size, so they must be whole units."""
    if not bool(((ids >= 0) & (other < 0)).any()):
        return
    for d in range(ids.dim()):
        if ids.shape[d] > 1 and other_shape[d] > 1:
            w.space.fix_dim(torch.where(other < 0, ids, NONE), d, where(w, node, MEETS_CONSTANT))


def _shared(w: Walker, node: fx.Node, kept: torch.Tensor, shared: torch.Tensor) -> None:
    """An operand broadcast along a dim where the other has channels is shared by those channels (a
    QK-norm weight of size head_dim, applied to every head): its own channels are never
    pruned, and where it has extent the other's dims keep their size (whole heads only)."""
    if not bool((shared >= 0).any()):
        return  # a value without channels (a statistic of the same tensor, a mask): nothing to keep
    w.space.exclude(shared)
    for d in range(kept.dim()):
        if kept.shape[d] > 1 and shared.shape[d] > 1:
            w.space.fix_dim(kept, d, where(w, node, "channels meet a tensor shared across another channel dim "
                                              "(a norm weight over the head dim), whose size stays"))


ELEMENTWISE = overloads(
    aten.add, aten.sub, aten.mul, aten.div, aten.add_, aten.sub_, aten.mul_, aten.div_, aten.rsub,
    aten.maximum, aten.minimum, aten.where, aten.pow, aten.addcmul, aten.addcdiv, aten.lerp,
    aten.eq, aten.ne, aten.gt, aten.ge, aten.lt, aten.le, aten.masked_fill, aten.copy_,
)
UNARY = overloads(
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_, aten.tanh,
    aten.tanh_, aten.hardtanh, aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid,
    aten.hardsigmoid_, aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_, aten.selu, aten.celu,
    aten.softplus, aten.mish, aten.abs, aten.neg, aten.exp, aten.log, aten.sqrt, aten.rsqrt,
    aten.square, aten.reciprocal, aten.erf, aten.sin, aten.cos, aten.sign, aten.clamp, aten.clamp_,
    aten.clamp_min, aten.clamp_max, aten.dropout, aten.dropout_, aten.feature_dropout,
    aten.alpha_dropout, aten.feature_alpha_dropout, aten.clone, aten.contiguous, aten.detach,
    aten.alias, aten.lift_fresh_copy, aten._to_copy, aten.to, aten.type_as, aten.logical_not,
    aten.bitwise_not, aten.log_sigmoid,
)


@rule(*ELEMENTWISE)
def elementwise(w: Walker, node: fx.Node) -> object:
    if node.target is aten.copy_.default and _fresh(w, node.args[0]) and isinstance(w.act(node.args[1]), torch.Tensor):
        return w.act(node.args[1])  # written into a fresh tensor: only the values written carry channels
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    operands += [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
    return combine(w, node, operands)


def _fresh(w: Walker, node: object) -> bool:
    """`node` is a slice without channels of a fresh tensor (`new_empty`, `new_zeros`), possibly already
    written into elsewhere (a slice_scatter recorded for an earlier in-place write)."""
    ids = w.act(node)
    if not isinstance(ids, torch.Tensor) or has_ids(ids):
        return False
    while isinstance(node, fx.Node) and getattr(node.target, "overloadpacket", None) in (aten.slice, aten.slice_scatter):
        node = node.args[0]
    return isinstance(node, fx.Node) and getattr(node.target, "overloadpacket", None) in (
        aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full)


@rule(*UNARY)
def unary(w: Walker, node: fx.Node) -> object:
    return combine(w, node, [node.args[0]])


@rule(aten.native_dropout.default)
def native_dropout(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    return [ids, ids]


@rule(operator.getitem)
def getitem(w: Walker, node: fx.Node) -> object:
    src = w.ids.get(node.args[0])
    if isinstance(src, (list, tuple)):
        return src[node.args[1]]
    return no_identity(w, node)


def couple(w: Walker, node: fx.Node, a: torch.Tensor, a_shape: tuple[int, ...], b: torch.Tensor,
           b_shape: tuple[int, ...]) -> torch.Tensor:
    """Channels at the same (broadcast) position of two values are one channel; returns the ids."""
    a, b = torch.broadcast_tensors(a, b)
    w.space.union(a, b)
    a_none = a < 0
    if not bool((a_none | (b < 0)).any()):
        # identity on both sides everywhere (a residual add): nothing meets a value without identity
        return a.contiguous()
    _meet_without_identity(w, node, a, b, b_shape)
    _meet_without_identity(w, node, b, a, a_shape)
    return torch.where(a_none, b, a)


def combine_all(w: Walker, node: fx.Node, parts: list[tuple[torch.Tensor, tuple[int, ...]]],
                out: tuple[int, ...]) -> torch.Tensor:
    """Couple equally shaped values (cat/stack along a dim without channels): the same channel positions."""
    acc, acc_shape = None, None
    for ids, shape in parts:
        acc = ids if acc is None else couple(w, node, acc, acc_shape, ids, shape)
        acc_shape = shape
    return acc if acc is not None else none_like(out)


# ---- spatial ops: channels on dim 1 (dim 0 unbatched) survive, spatial dims are resampled -------


def spatial(k: int) -> Rule:
    def fn(w: Walker, node: fx.Node) -> object:
        x = node.args[0]
        ids = w.act(x)
        val = node.meta["val"]
        if not isinstance(ids, torch.Tensor):
            return no_identity(w, node)
        nd = ids.dim()
        if any(ids.shape[d] > 1 for d in range(nd - k, nd)):
            w.warn(node, "channels along a spatial dim of a pooling/resampling op")
            w.space.exclude(ids)
            return no_identity(w, node)
        return [ids, ids] if isinstance(val, (list, tuple)) else ids

    return fn


for _k, _ops in {
    1: (aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d,
        aten.max_pool1d_with_indices, aten.upsample_nearest1d, aten.upsample_linear1d),
    2: (aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten.adaptive_max_pool2d,
        aten.max_pool2d_with_indices, aten.upsample_nearest2d, aten.upsample_bilinear2d,
        aten.upsample_bicubic2d, aten._adaptive_avg_pool2d),
    3: (aten.max_pool3d, aten.avg_pool3d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool3d,
        aten.max_pool3d_with_indices, aten.upsample_nearest3d, aten.upsample_trilinear3d),
}.items():
    rule(*overloads(*_ops))(spatial(_k))


# ---- reductions -------------------------------------------------------------------------------


@rule(*overloads(aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.max, aten.min,
                 aten.logsumexp, aten.norm, aten.linalg_vector_norm, aten.prod, aten.argmax, aten.argmin))
def reduce(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    val = node.meta.get("val")
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    nd = ids.dim()
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.target.overloadpacket in (aten.norm, aten.linalg_vector_norm) and len(node.args) > 2:
        dims = node.args[2]
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) == 0:
        dims = list(range(nd))
    dims = sorted({int(d) % nd for d in dims}) if nd else []
    if any(ids.shape[d] > 1 for d in dims):
        if node.target.overloadpacket in (aten.argmax, aten.argmin, aten.prod):
            w.warn(node, "index or product over a channel dim")
            w.space.exclude(ids)
        else:
            w.space.mix(ids)  # a statistic over channels (RMSNorm's mean, CBAM): prunable, not exact
        return no_identity(w, node)
    out = val[0] if isinstance(val, (list, tuple)) else val
    if not isinstance(out, torch.Tensor):
        return None
    new = ids
    if out.dim() < nd:
        for d in reversed(dims):
            new = new.squeeze(d)
    return [new, new] if isinstance(val, (list, tuple)) else new


@rule(*overloads(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum))
def softmax(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    d = node.args[1] % ids.dim()
    if ids.shape[d] > 1:
        if node.target.overloadpacket is aten.cumsum:
            w.warn(node, "cumulative sum over a channel dim")
            w.space.exclude(ids)
            return no_identity(w, node)
        w.space.mix(ids)
    return ids
