"""Coupling rules for ops that own parameters: convolutions, linear maps, norms, PReLU, embeddings."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from . import group as g
from .channels import NONE, along, channel_vector, expand_dims, has_ids, none_like
from .elementwise import align, couple
from .matmul import activation_matmul
from .record import same_width
from .walker import Walker, no_identity, overloads, rule, unknown, where

aten = torch.ops.aten


def _arg(node: fx.Node, pos: int, name: str, default: object = None) -> object:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _link_channels(w: Walker, x_vec: torch.Tensor, ids: torch.Tensor, missing: object = ...) -> None:
    """Input channels meet a parameter dim: same channel where the input has identity, fixed where not.
    `missing`: `_missing(x_vec)` where the caller links several parameters to the same input."""
    w.space.union(x_vec, ids)
    missing = _missing(x_vec) if missing is ... else missing
    if missing is not None:
        w.space.exclude(torch.where(missing, ids, NONE))


def _missing(x_vec: torch.Tensor) -> torch.Tensor | None:
    """The positions of input channels without identity; None where there are none (the common case:
    nothing to fix)."""
    missing = x_vec < 0
    return missing if bool(missing.any()) else None


def _channel_input(w: Walker, node: fx.Node, x: fx.Node, dim: int) -> torch.Tensor | None:
    ids = w.act(x)
    shape = w.shape(x)
    if not isinstance(ids, torch.Tensor) or shape is None:
        return None
    vec = channel_vector(ids, dim, shape[dim])
    if vec is None:
        w.warn(node, "input channels are spread over several dims")
        w.space.exclude(ids)
        return torch.full((shape[dim],), NONE, dtype=torch.long)
    return vec


def _is_param(w: Walker, *nodes: object) -> bool:
    return all(n is None or w.tensor_name(n) is not None for n in nodes)


# ---- convolutions -----------------------------------------------------------------------------


def _conv(w: Walker, node: fx.Node, x: fx.Node, weight: fx.Node, bias: object, groups: int,
          transposed: bool) -> object:
    if not _is_param(w, weight, bias):
        return unknown(w, node)
    wshape = w.shape(weight)
    xshape = w.shape(x)
    batched = len(xshape) == len(wshape)
    cdim = 1 if batched else 0
    out_shape = w.out_shape(node)
    kind = g.CONV_T if transposed else g.CONV
    x_vec = _channel_input(w, node, x, cdim)
    if x_vec is None:
        return no_identity(w, node)
    in_ch = xshape[cdim]
    if transposed:
        in_dim, out_dim = 0, 1  # weight [in, out/groups, *k]
        out_ch = wshape[1] * groups
    else:
        in_dim, out_dim = 1, 0  # weight [out, in/groups, *k]
        out_ch = wshape[0]
    per_in, per_out = in_ch // groups, out_ch // groups

    if groups == 1:
        _link_channels(w, x_vec, w.pid(weight, in_dim, kind=kind, role=g.IN))
        out_ids = w.pid(weight, out_dim, kind=kind, role=g.OUT)
    elif per_in == 1 and not transposed:
        # depthwise (optionally with a channel multiplier): input channel j feeds output rows j*m..j*m+m-1
        out_ids = w.pid(weight, 0, kind=kind, role=g.OUT)
        _link_channels(w, x_vec.repeat_interleave(per_out), out_ids)
    elif per_in == 1 and transposed and per_out == 1:
        out_ids = w.pid(weight, 0, kind=kind, role=g.OUT)
        _link_channels(w, x_vec, out_ids)
    elif per_in > 1 and per_out >= 1:
        # grouped: in and out are separate channel spaces, each pruned by the same count per conv group
        if transposed:
            in_ids = w.pid(weight, 0, kind=kind, role=g.IN)
            out_ids = w.pid(weight, 1, kind=kind, role=g.OUT, blocks=groups, size=out_ch)
        else:
            in_ids = w.pid(weight, 1, kind=kind, role=g.IN, blocks=groups, size=in_ch)
            out_ids = w.pid(weight, 0, kind=kind, role=g.OUT)
        _link_channels(w, x_vec, in_ids)
        w.space.require_blocks(in_ids, groups)
        w.space.require_blocks(out_ids, groups)
    else:
        return unknown(w, node)
    if bias is not None:
        w.space.union(w.pid(bias, 0, kind=kind, role=g.OUT, is_bias=True), out_ids)
    return along(out_ids, cdim, len(out_shape))


@rule(*overloads(aten.conv1d, aten.conv2d, aten.conv3d))
def conv(w: Walker, node: fx.Node) -> object:
    return _conv(w, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), False)


@rule(*overloads(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d))
def conv_transpose(w: Walker, node: fx.Node) -> object:
    return _conv(w, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), True)


@rule(*overloads(aten.convolution, aten._convolution))
def convolution(w: Walker, node: fx.Node) -> object:
    return _conv(w, node, node.args[0], node.args[1], node.args[2], node.args[8], bool(node.args[6]))


# ---- linear maps ------------------------------------------------------------------------------


def _couple_input(w: Walker, x: fx.Node, weight: fx.Node, in_dim: int) -> bool:
    """The last dim of `x` and the input dim of a Linear's `weight` are one set of channels; False (nothing
    coupled) where `x` has no ids or shape."""
    ids = w.act(x)
    xshape = w.shape(x)
    if not isinstance(ids, torch.Tensor) or xshape is None:
        return False
    in_ids = w.pid(weight, in_dim, kind=g.LINEAR, role=g.IN)
    last = len(xshape) - 1
    full = expand_dims(ids, xshape, [last])
    w.space.union(full, along(in_ids, last, full.dim()))
    # a column fed by a value without identity anywhere in the batch is fixed
    none = full < 0
    if bool(none.any()):
        w.space.exclude(in_ids[none.reshape(-1, xshape[last]).any(0)])
    return True


def _linear(w: Walker, node: fx.Node, x: fx.Node, weight: fx.Node, bias: object, in_dim: int,
            out_dim: int) -> object:
    out_shape = w.out_shape(node)
    if not _couple_input(w, x, weight, in_dim):
        return no_identity(w, node)
    out_ids = w.pid(weight, out_dim, kind=g.LINEAR, role=g.OUT)
    if bias is not None:
        w.space.union(w.pid(bias, 0, kind=g.LINEAR, role=g.OUT, is_bias=True), out_ids)
    return along(out_ids, len(out_shape) - 1, len(out_shape))


@rule(*overloads(aten.linear))
def linear(w: Walker, node: fx.Node) -> object:
    weight, bias = node.args[1], _arg(node, 2, "bias")
    if _is_param(w, weight) and bias is not None and not _is_param(w, bias):
        # a bias computed in the forward (F.multi_head_attention_forward's slice of a cat of biases):
        # x @ W.T + b, the bias meeting the product elementwise
        ids = _linear(w, node, node.args[0], weight, None, 1, 0)
        b, out = w.act(bias), w.out_shape(node)
        if not isinstance(ids, torch.Tensor) or w.shape(bias) is None:
            return ids
        b_shape = (1,) * (len(out) - len(w.shape(bias))) + tuple(w.shape(bias))
        b = align(b if isinstance(b, torch.Tensor) else none_like(w.shape(bias)), len(out))
        return couple(w, node, ids, out, b, b_shape)
    if not _is_param(w, weight, bias):
        blocks = [row_block(w, t) for t in (weight, bias)]
        if blocks[0] is None or (bias is not None and (blocks[1] is None or blocks[1][1:] != blocks[0][1:])):
            return unknown(w, node)
        return _linear_rows(w, node, node.args[0], blocks[0], blocks[1])
    return _linear(w, node, node.args[0], weight, bias, 1, 0)


def row_block(w: Walker, node: object) -> tuple[fx.Node, int, int] | None:
    """(parameter, first row, rows) where `node` is a block of rows of a parameter: a part of its split
    along dim 0 (`nn.MultiheadAttention` with a query other than its key: `in_proj_weight.split([E, 2E])`)."""
    if not isinstance(node, fx.Node) or node.target is not operator.getitem:
        return None
    split, i = node.args
    if getattr(split.target, "overloadpacket", None) not in (aten.split, aten.split_with_sizes):
        return None
    src = split.args[0]
    shape = w.shape(src)
    if w.tensor_name(src) is None or shape is None or _arg(split, 2, "dim", 0) % len(shape) != 0:
        return None
    sizes = [int(v.shape[0]) for v in split.meta["val"]]
    return src, sum(sizes[:i]), sizes[i]


def _linear_rows(w: Walker, node: fx.Node, x: fx.Node, weight: tuple[fx.Node, int, int],
                 bias: tuple[fx.Node, int, int] | None) -> object:
    """A Linear whose weight (and bias) are a block of rows of a parameter: its outputs are those rows."""
    param, start, rows = weight
    if len(w.shape(param)) != 2 or not _couple_input(w, x, param, 1):
        return no_identity(w, node)
    out_ids = w.pid(param, 0, kind=g.LINEAR, role=g.OUT)[start : start + rows]
    if bias is not None:
        w.space.union(w.pid(bias[0], 0, kind=g.LINEAR, role=g.OUT, is_bias=True)[start : start + rows], out_ids)
    out_shape = w.out_shape(node)
    return along(out_ids, len(out_shape) - 1, len(out_shape))


@rule(*overloads(aten.addmm))
def addmm(w: Walker, node: fx.Node) -> object:
    bias, x, weight = node.args[0], node.args[1], node.args[2]
    if not _is_param(w, weight, bias) or len(w.shape(weight)) != 2:
        return unknown(w, node)
    return _linear(w, node, x, weight, bias, 0, 1)  # x @ W with W [in, out] (GPT-2 Conv1D)


@rule(*overloads(aten.mm, aten.matmul))
def matmul(w: Walker, node: fx.Node) -> object:
    x, weight = node.args[0], node.args[1]
    if w.tensor_name(weight) is not None and len(w.shape(weight)) == 2:
        return _linear(w, node, x, weight, None, 0, 1)
    param = transposed_weight(w, weight)
    if param is not None:
        return _linear(w, node, x, param, None, 1, 0)  # x @ W.T with W [out, in] (Falcon's FalconLinear)
    return activation_matmul(w, node)


@rule(same_width)
def equal_width(w: Walker, node: fx.Node) -> object:
    """Functional attention with separate q/k/v weights (CLIP RN50's attention pooling): the query's
    channels and q_proj's rows are pruned together, position by position, so their counts stay equal;
    whole heads of q_proj then take the same positions of the query width. nn.MultiheadAttention is
    left alone: pruning gives it its own class with a free attention width (attention_attrs)."""
    x, weight = node.args
    if isinstance(w.modules.get(w.module_of(node)), nn.MultiheadAttention) or w.tensor_name(weight) is None:
        return None
    ids = w.act(x)
    shape = w.shape(x)
    if not isinstance(ids, torch.Tensor) or shape is None or shape[-1] != w.shape(weight)[0]:
        return None
    vec = channel_vector(ids, len(shape) - 1, shape[-1])
    rows = w.pid(weight, 0, kind=g.LINEAR, role=g.OUT)
    if vec is None:
        w.space.exclude(rows)
    else:
        _link_channels(w, vec, rows)
    return None


def transposed_weight(w: Walker, node: object) -> fx.Node | None:
    """The 2-D parameter `node` transposes (W.T, W.t(), W.transpose(0, 1)), if that is all it does."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    src = node.args[0]
    if w.tensor_name(src) is None or w.shape(src) is None or len(w.shape(src)) != 2:
        return None
    packet = getattr(node.target, "overloadpacket", None)
    if packet in (aten.t, aten.numpy_T) or (packet in (aten.permute, aten.transpose) and
                            [a % 2 for a in (node.args[1] if packet is aten.permute else node.args[1:3])] == [1, 0]):
        return src
    return None


# ---- norms and per-channel parameters -----------------------------------------------------------


def _per_channel(w: Walker, node: fx.Node, x: fx.Node, dim: int, kind: str,
                 params: list[tuple[object, str, bool]], blocks: int = 1) -> object:
    """Norm-like op: every given per-channel tensor shares the input's channels along `dim`."""
    if not _is_param(w, *[p for p, _, _ in params]):
        return unknown(w, node)
    ids = w.act(x)
    xshape = w.shape(x)
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    x_vec = _channel_input(w, node, x, dim)
    if kind in (g.LAYERNORM, g.GROUPNORM):
        w.space.mix(x_vec)
    missing = _missing(x_vec) if x_vec is not None else None  # once for all its parameters (a BatchNorm's four)
    for p, role, is_bias in params:
        if p is not None and w.shape(p)[0] == xshape[dim] and xshape[dim] > 1:
            _link_channels(w, x_vec, w.pid(p, 0, kind=kind, role=role, is_bias=is_bias), missing)
    if blocks > 1:
        w.space.require_blocks(x_vec, blocks)
    val = node.meta["val"]
    return [ids] + [none_like(v.shape) if isinstance(v, torch.Tensor) else None for v in val[1:]] \
        if isinstance(val, (list, tuple)) else ids


def _bn_params(node: fx.Node) -> list[tuple[object, str, bool]]:
    return [(node.args[1], g.AFFINE, False), (node.args[2], g.AFFINE, True),
            (node.args[3], g.STAT, False), (node.args[4], g.STAT, False)]


@rule(*overloads(aten.batch_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
                 aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
                 aten._batch_norm_with_update, aten._batch_norm_no_update, aten.cudnn_batch_norm))
def batch_norm(w: Walker, node: fx.Node) -> object:
    return _per_channel(w, node, node.args[0], 1, g.BATCHNORM, _bn_params(node))


@rule(*overloads(aten.instance_norm))
def instance_norm(w: Walker, node: fx.Node) -> object:
    return _per_channel(w, node, node.args[0], 1, g.INSTANCENORM, _bn_params(node))


@rule(*overloads(aten.group_norm, aten.native_group_norm))
def group_norm(w: Walker, node: fx.Node) -> object:
    if node.target.overloadpacket is aten.native_group_norm:
        weight, bias, num_groups = node.args[1], node.args[2], node.args[6]
    else:
        num_groups, weight, bias = node.args[1], _arg(node, 2, "weight"), _arg(node, 3, "bias")
    return _per_channel(w, node, node.args[0], 1, g.GROUPNORM,
                        [(weight, g.AFFINE, False), (bias, g.AFFINE, True)], blocks=num_groups)


@rule(*overloads(aten.layer_norm, aten.native_layer_norm, aten.rms_norm))
def layer_norm(w: Walker, node: fx.Node) -> object:
    shape = node.args[1]
    nd = len(w.shape(node.args[0]))
    if len(shape) != 1:
        ids = w.act(node.args[0])
        if isinstance(ids, torch.Tensor) and any(ids.shape[d] > 1 for d in range(nd - len(shape), nd)):
            w.warn(node, "LayerNorm over several dims holding channels")
            w.space.exclude(ids)
        return w.act(node.args[0])
    weight = _arg(node, 2, "weight")
    bias = _arg(node, 3, "bias") if node.target.overloadpacket is not aten.rms_norm else None
    ids = w.act(node.args[0])
    if isinstance(ids, torch.Tensor) and ids.dim() == nd and ids.shape[-1] > 1 and \
            any(ids.shape[d] > 1 for d in range(nd - 1)) and _is_param(w, weight, bias):
        return _norm_over_head_dim(w, node, ids, [weight, bias])
    return _per_channel(w, node, node.args[0], nd - 1, g.LAYERNORM,
                        [(weight, g.AFFINE, False), (bias, g.AFFINE, True)])


def _norm_over_head_dim(w: Walker, node: fx.Node, ids: torch.Tensor, params: list[object]) -> object:
    """A norm over the last dim of a value whose channels also run along other dims: a QK-norm over the
    head dim, applied to every head. Each head is normalized on its own, so removing whole heads is exact;
    its weight belongs to the head dim (shared by all heads): never pruned, and the head dim keeps its size."""
    for p in params:
        if p is not None:
            w.space.poisoned.add(w.tensor_name(p)[0])
    w.space.fix_dim(ids, ids.dim() - 1, where(w, node, "a norm over the head dim (QK-norm) keeps its size"))
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        return [ids] + [none_like(v.shape) if isinstance(v, torch.Tensor) else None for v in val[1:]]
    return ids


@rule(*overloads(aten.prelu, aten._prelu_kernel))
def prelu(w: Walker, node: fx.Node) -> object:
    x = node.args[0]
    dim = 1 if len(w.shape(x)) > 1 else 0
    return _per_channel(w, node, x, dim, g.PRELU, [(node.args[1], g.AFFINE, False)])


@rule(*overloads(aten.index))
def index(w: Walker, node: fx.Node) -> object:
    """table[idx] with one index tensor on dim 0 of a 2-D parameter (Swin's relative position bias table
    gathered by a buffer of positions): each row keeps the table's column channels, as an embedding."""
    table, indices = node.args[0], node.args[1]
    if _is_param(w, table) and w.tensor_name(table) is not None and len(w.shape(table)) == 2 \
            and len(indices) == 1 and isinstance(indices[0], fx.Node) and not has_ids(w.act(indices[0])):
        out = w.out_shape(node)
        return along(w.pid(table, 1, kind=g.EMBEDDING, role=g.AFFINE), len(out) - 1, len(out))
    ids = w.act(table) if w.tensor_name(table) is None else None
    if isinstance(ids, torch.Tensor) and not any(
        isinstance(i, fx.Node) and ids.shape[d] > 1 for d, i in enumerate(indices)
    ) and all(not isinstance(i, fx.Node) or not has_ids(w.act(i)) for i in indices):
        # gathering along dims without channels (tokens routed to an expert, CLIP's pooling at the end
        # token x[arange(B), ids.argmax(-1)]): the channels of the other dims stay what they were
        out = w.out_shape(node)
        k = len(indices)
        if all(isinstance(i, fx.Node) for i in indices) and all(ids.shape[d] == 1 for d in range(k)):
            rest = tuple(ids.shape[k:])
            return ids.reshape((1,) * (len(out) - len(rest)) + rest)
    return unknown(w, node)


@rule(*overloads(aten.gather))
def gather(w: Walker, node: fx.Node) -> object:
    """x.gather(dim, index) along a dim without channels (DeBERTa's relative positions per head): the
    channels of the other dims stay, where the index covers them whole."""
    x, index = node.args[0], node.args[2]
    ids, xs, idx_shape = w.act(x), w.shape(x), w.shape(index)
    if not isinstance(ids, torch.Tensor) or xs is None or idx_shape is None:
        return no_identity(w, node)
    d = node.args[1] % ids.dim()
    if has_ids(w.act(index)) or ids.shape[d] > 1 or any(
            ids.shape[k] > 1 and idx_shape[k] != xs[k] for k in range(ids.dim())):
        return unknown(w, node)
    return ids


@rule(*overloads(aten.embedding))
def embedding(w: Walker, node: fx.Node) -> object:
    weight = node.args[0]
    if not _is_param(w, weight):
        return unknown(w, node)
    out = w.out_shape(node)
    return along(w.pid(weight, 1, kind=g.EMBEDDING, role=g.AFFINE), len(out) - 1, len(out))


# ---- attention ----------------------------------------------------------------------------------


@rule(*overloads(aten.scaled_dot_product_attention))
def sdpa(w: Walker, node: fx.Node) -> object:
    """q [.., H, T, d], k [.., Hk, S, d], v [.., Hk, S, d]: head h's dim j of q, k, v and the output is one
    channel (query heads share their key/value head under GQA). Heads are pruned whole (`unit` = d) or,
    with head_pruning="dims", by the same count in every key/value head (`blocks` = Hk). With one key/value
    head (multi-query, or one repeated to every query head), the query heads go whole on their own.
    Where a head's dims fall into several groups (partial rotary: rotated and passed dims meet different
    ops), find_groups walks again with the head as one channel (`Walker.merged_heads`)."""
    q, k, v = node.args[:3]
    ids = [w.act(t) for t in (q, k, v)]
    shapes = [w.shape(t) for t in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) for t in ids) or any(s is None for s in shapes):
        return unknown(w, node)
    nd = len(shapes[0])
    if nd > 4 and all(len(s) == nd for s in shapes) and all(t.dim() == nd and all(n == 1 for n in t.shape[:-3]) for t in ids):
        # windows or other batch dims before the heads (Twins, windowed attention): one batch dim
        ids = [t.reshape(1, *t.shape[-3:]) for t in ids]
        shapes = [(math.prod(s[:-3]), *s[-3:]) for s in shapes]
        out = _sdpa(w, node, ids, shapes)
        return out.reshape((1,) * (nd - 4) + tuple(out.shape)) if isinstance(out, torch.Tensor) and out.dim() == 4 else out
    if any(len(s) != 4 for s in shapes):
        return unknown(w, node)
    return _sdpa(w, node, ids, shapes)


def _sdpa(w: Walker, node: fx.Node, ids: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> object:
    (_, H, _, d), (_, Hk, _, dk), (_, Hv, _, dv) = shapes
    if not (d == dk and Hk == Hv and H % Hk == 0):
        return unknown(w, node)
    spread = [t for t in ids if t.shape[2] > 1 or (t.shape[1] > 1 and t.shape[3] == 1)]
    if spread:
        return unknown(w, node)  # channels along tokens, or heads without dims: not an attention layout
    r = H // Hk
    full = [expand_dims(t, s, [1, 3]) for t, s in zip(ids, shapes)]
    qf, kf, vf = full
    krows = kf[0, :, 0, :]
    if w.head_pruning == "heads" and Hk > 1 and (d != dv or _partly_shared(krows)):
        return _latent_heads(w, node, qf, kf, vf, H, Hk)
    if d != dv:
        return unknown(w, node)
    if w.head_pruning == "heads" and H > 1 and (Hk == 1 or bool((krows == krows[:1]).all() and (krows >= 0).any())):
        # one key/value head, possibly repeated to every query head (repeat_kv) before the call
        return _query_heads(w, node, qf, kf, vf, H)
    if r > 1:
        kf, vf = kf.repeat_interleave(r, 1), vf.repeat_interleave(r, 1)
    for a, b in ((qf, kf), (qf, vf)):
        w.space.union(a, b)
        if bool(((a < 0) | (b < 0)).any()):  # (mostly not: every dim of every head has channels)
            w.space.exclude(torch.where(b < 0, a, NONE))
            w.space.exclude(torch.where(a < 0, b, NONE))
    _attention_bias(w, node, qf, H)
    heads = torch.where(full[1] >= 0, full[1], full[2])[0, :, 0, :]  # [Hk, d] in key/value order
    if w.head_pruning == "dims":
        w.space.require_blocks(heads, Hk)
        if (node.args[6] if len(node.args) > 6 else node.kwargs.get("scale")) is None:
            w.space.mix(heads)  # the default scale 1/sqrt(d) follows the pruned head dim
        return torch.where(qf >= 0, qf, kf)
    if node.name in w.merged_heads:
        # whole heads whose dims fall into several groups (partial rotary): one channel per head
        return _one_channel_per_head(w, torch.cat([qf.reshape(Hk, -1), kf[:, ::r].reshape(Hk, -1),
                                                   vf[:, ::r].reshape(Hk, -1)], 1)).repeat_interleave(r).view(1, H, 1, 1)
    w.space.require_units(heads, d, source=node.name)
    return torch.where(qf >= 0, qf, kf)


def _partly_shared(rows: torch.Tensor) -> bool:
    """Some id appears in two different key heads (rows): a part of the key shared by all heads."""
    seen: set[int] = set()
    for row in set(map(tuple, rows.tolist())):  # heads are few and short: plain lists
        ids = {i for i in row if i >= 0}
        if not seen.isdisjoint(ids):
            return True
        seen |= ids
    return False


def _latent_heads(w: Walker, node: fx.Node, qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, H: int,
                  Hk: int) -> object:
    """Heads whose keys hold a part shared by every head (multi-head latent attention, DeepSeek: the
    rotary key is one for all heads) or whose values are narrower than the keys: each key/value head with
    its query heads is one channel, pruned whole; the shared part stays."""
    r = H // Hk
    rows = torch.cat([qf[0, :, 0, :].reshape(Hk, -1), kf[0, :, 0, :], vf[0, :, 0, :]], 1)
    per_head = torch.cat([row[row >= 0].unique() for row in rows])
    uniq, counts = per_head.unique(return_counts=True)
    shared = uniq[counts > 1]
    w.space.exclude(shared)
    rows = torch.where(torch.isin(rows, shared), NONE, rows)
    if bool((rows < 0).all(1).any()):  # a head without channels of its own: nothing to prune it with
        w.space.exclude(rows)
        return torch.full((1, H, 1, 1), NONE, dtype=torch.long)
    _attention_bias(w, node, qf, H)
    return _one_channel_per_head(w, rows).repeat_interleave(r).view(1, H, 1, 1)


def _one_channel_per_head(w: Walker, rows: torch.Tensor) -> torch.Tensor:
    """Union every id of each row (one head) into one channel; the representative id per row."""
    valid = rows >= 0
    first = torch.where(valid.any(1), rows.gather(1, valid.float().argmax(1, keepdim=True)).squeeze(1), NONE)
    w.space.union(rows, first[:, None].expand_as(rows))
    return first


def _query_heads(w: Walker, node: fx.Node, qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, H: int) -> object:
    """One key/value head shared by all query heads (multi-query): the query heads go whole on their own,
    the key/value head stays (its dims meet every query head)."""
    w.space.exclude(kf)
    w.space.exclude(vf)
    q = qf[0, :, 0, :]
    if bool((q < 0).any()):
        w.space.exclude(q)
        return torch.full((1, H, 1, 1), NONE, dtype=torch.long)
    _attention_bias(w, node, qf, H)
    if node.name in w.merged_heads:
        return _one_channel_per_head(w, q).view(1, H, 1, 1)
    w.space.require_units(q, q.shape[1], source=node.name)
    return qf


def _attention_bias(w: Walker, node: fx.Node, qf: torch.Tensor, H: int) -> None:
    """An additive mask with channels along its head dim (T5's relative position bias, Swin's bias table):
    its entry for head h belongs to head h. Whole heads go with their bias entries (all dims of a head
    become one channel); with head_pruning="dims" the heads stay, and so does the table."""
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    ids = w.act(mask)
    shape = w.shape(mask)
    if not isinstance(ids, torch.Tensor) or shape is None or not bool((ids >= 0).any()):
        return
    ids = ids.reshape((1,) * (4 - ids.dim()) + tuple(ids.shape)) if ids.dim() <= 4 else ids
    per_head = ids.dim() == 4 and ids.shape[0] == ids.shape[2] == ids.shape[3] == 1 and ids.shape[1] == H
    if w.head_pruning == "dims" or not per_head:
        w.space.exclude(ids)
        return
    w.space.union(qf[:, :, :1, :], ids.view(1, H, 1, 1))
