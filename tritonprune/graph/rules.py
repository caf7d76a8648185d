"""Per-op coupling rules over the exported ATen graph.

Each rule reads the compact channel ids of its inputs (see channels.py), unions the ids that must be
pruned together, excludes ids whose positions the op hard-codes, and returns the ids of its output.
An op without a rule excludes every channel that touches it and is named in one warning.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import torch
from torch import fx, nn

from . import group as g
from .channels import NONE, IdSpace, along, channel_vector, expand_dims, has_ids, none_like

aten = torch.ops.aten
Rule = Callable[["Walker", fx.Node], object]
RULES: dict[object, Rule] = {}


def rule(*ops: object) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def overloads(*packets: object) -> list[object]:
    """Every overload of the given op packets (aten.add -> aten.add.Tensor, aten.add.Scalar, ...)."""
    out: list[object] = []
    for p in packets:
        out.append(p)
        for name in p.overloads():
            out.append(getattr(p, name))
    return out


class Walker:
    """Walks the graph once, applying rules; collects everything assemble.py needs."""

    def __init__(self, ep: torch.export.ExportedProgram, model: nn.Module, head_pruning: str = "heads"):
        self.head_pruning = head_pruning
        self.ep = ep
        self.model = model
        self.space = IdSpace()
        self.ids: dict[fx.Node, object] = {}
        self.tensor_names: dict[str, tuple[str, bool]] = {}  # placeholder -> (qualified name, is_buffer)
        sig = ep.graph_signature
        for spec in sig.input_specs:
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER") and spec.target is not None:
                self.tensor_names[spec.arg.name] = (spec.target, kind == "BUFFER")
        self.modules = dict(model.named_modules())
        self.warned: set[tuple[str, str]] = set()
        self.warnings: list[str] = []

    # ---- helpers used by rules ----------------------------------------------------------------
    def run(self) -> None:
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self.ids[node] = None if node.name in self.tensor_names else self._input_ids(node)
            elif node.op == "call_function":
                fn = RULES.get(node.target)
                if fn is None and hasattr(node.target, "overloadpacket"):
                    fn = RULES.get(node.target.overloadpacket)
                if fn is None and getattr(node.target, "__name__", "").split(".")[0] in NO_OPS:
                    continue  # runtime checks without outputs
                self.ids[node] = (fn or unknown)(self, node)
            elif node.op == "output":
                for arg in fx.node.map_arg(node.args, lambda n: n).__iter__():
                    self._exclude_output(arg)
            # get_attr (lifted constants) carry no channel identity

    def _input_ids(self, node: fx.Node) -> object:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return none_like(val.shape)
        return None

    def _exclude_output(self, arg: object) -> None:
        if isinstance(arg, (list, tuple)):
            for a in arg:
                self._exclude_output(a)
        elif isinstance(arg, fx.Node):
            ids = self.act(arg)
            if isinstance(ids, torch.Tensor):
                self.space.exclude(ids)
            elif isinstance(ids, (list, tuple)):
                for t in ids:
                    if isinstance(t, torch.Tensor):
                        self.space.exclude(t)

    def shape(self, node: object) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
        return None

    def out_shape(self, node: fx.Node, index: int | None = None) -> tuple[int, ...]:
        val = node.meta["val"]
        if index is not None:
            val = val[index]
        return tuple(int(s) for s in val.shape)

    def tensor_name(self, node: object) -> tuple[str, bool] | None:
        """(qualified name, is_buffer) if `node` is a parameter or buffer placeholder."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.tensor_names.get(node.name)
        return None

    def pid(self, node: fx.Node, dim: int, *, kind: str, role: str, blocks: int = 1,
            is_bias: bool = False, size: int | None = None) -> torch.Tensor:
        name, is_buffer = self.tensor_name(node)
        shape = self.shape(node)
        return self.space.param_ids(
            name, dim, size if size is not None else shape[dim], module=owner(name), kind=kind,
            role=role, blocks=blocks, is_bias=is_bias, is_buffer=is_buffer,
        )

    def act(self, node: object) -> object:
        """The compact ids of an activation; a parameter used as a value gets ids along one dim."""
        if not isinstance(node, fx.Node):
            return None
        ids = self.ids.get(node)
        if ids is None and self.tensor_name(node) is not None:
            ids = self._param_as_value(node)
            self.ids[node] = ids
        return ids

    def _param_as_value(self, node: fx.Node) -> torch.Tensor:
        # A bare parameter or buffer used in arithmetic (layer scale, positional embedding, a mask):
        # its channels run along its last non-trivial dim.
        shape = self.shape(node)
        dims = [d for d, s in enumerate(shape) if s > 1]
        if not dims or not node.meta["val"].is_floating_point():
            return none_like(shape)  # index and mask buffers (position ids) carry no channels
        d = dims[-1]
        name, is_buffer = self.tensor_name(node)
        kind = g.PARAM
        role = g.STAT if is_buffer else g.AFFINE
        return along(self.pid(node, d, kind=kind, role=role), d, len(shape))

    def module_of(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path = list(stack.values())[-1][0]
            return path or "<root>"
        return "<root>"

    def warn(self, node: fx.Node, why: str) -> None:
        op = str(node.target)
        module = self.module_of(node)
        key = (op, module)
        if key in self.warned:
            return
        self.warned.add(key)
        msg = f"tritonprune: {why} (op {op} in module {module!r}); the channels it touches are not pruned"
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)

    def exclude_all(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            ids = self.act(arg)
            for t in ids if isinstance(ids, (list, tuple)) else (ids,):
                if isinstance(t, torch.Tensor):
                    self.space.exclude(t)
            name = self.tensor_name(arg)
            if name is not None:
                for (n, _), reg in self.space.registered.items():
                    if n == name[0]:
                        self.space.exclude(reg.ids)


def owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def no_identity(w: Walker, node: fx.Node) -> object:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return none_like(val.shape)
    if isinstance(val, (list, tuple)):
        return [none_like(v.shape) if isinstance(v, torch.Tensor) else None for v in val]
    return None


def unknown(w: Walker, node: fx.Node) -> object:
    touched = False
    for a in node.all_input_nodes:
        name = w.tensor_name(a)
        if name is not None:
            # a parameter fed to an op without a rule: none of its dims may be pruned, now or later
            touched |= name[0] in {n for n, _ in w.space.registered} or a in w.ids and w.ids[a] is not None
            w.space.poisoned.add(name[0])
        else:
            ids = w.act(a)
            touched |= isinstance(ids, torch.Tensor) and has_ids(ids)
            touched |= isinstance(ids, (list, tuple)) and any(isinstance(t, torch.Tensor) and has_ids(t) for t in ids)
    if touched:
        w.warn(node, "no coupling rule for this op")
        w.exclude_all(node)
    return no_identity(w, node)


NO_OPS = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range",
          "sym_constrain_range_for_size", "_functional_assert_async", "_print"}


# ---- shape-preserving and elementwise ops -----------------------------------------------------


def align(ids: torch.Tensor, ndim: int) -> torch.Tensor:
    return ids.reshape((1,) * (ndim - ids.dim()) + tuple(ids.shape))


def combine(w: Walker, node: fx.Node, operands: list[fx.Node]) -> torch.Tensor:
    """Elementwise coupling with broadcasting: channels at the same position are the same channel."""
    out = w.out_shape(node) if isinstance(node.meta.get("val"), torch.Tensor) else None
    if out is None:
        return None
    nd = len(out)
    acc_ids, acc_shape = None, None
    for op in operands:
        ids = w.act(op)
        shape = w.shape(op)
        if not isinstance(ids, torch.Tensor) or shape is None:
            continue
        ids = align(ids, nd)
        shape = (1,) * (nd - len(shape)) + shape
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
            acc_ids = ids
        elif not op_spread:
            a, b = torch.broadcast_tensors(acc_ids, ids)
            w.space.union(a, b)
            _meet_without_identity(w, node, a, b, shape)
            _meet_without_identity(w, node, b, a, acc_shape)
            acc_ids = torch.where(a >= 0, a, b)
        acc_shape = tuple(max(x, y) for x, y in zip(acc_shape, shape))
    return acc_ids if acc_ids is not None else none_like(out)


def _meet_without_identity(w: Walker, node: fx.Node, ids: torch.Tensor, other: torch.Tensor,
                           other_shape: tuple[int, ...]) -> None:
    """Channels meeting values without identity (model inputs, constants, rotary tables) at the same
    positions: the dims where the partner has real extent keep their size, so they must be whole units."""
    if not bool(((ids >= 0) & (other < 0)).any()):
        return
    for d in range(ids.dim()):
        if ids.shape[d] > 1 and other_shape[d] > 1:
            w.space.fix_dim(torch.where(other < 0, ids, NONE), d, _where(w, node, "channels meet values of fixed size"))


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
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    operands += [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
    return combine(w, node, operands)


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
                space: IdSpace | None = None) -> torch.Tensor | None:
    runs = reshape_runs(src, dst)
    if runs is None:
        return None
    varying = [any(ids.shape[k] > 1 for k in si) for si, _ in runs]
    spread = [d for (si, _), v in zip(runs, varying) if v for d in si]
    full = expand_dims(ids, src, spread)
    target = []
    for (_, sj), v in zip(runs, varying):
        target.extend(dst[k] if v else 1 for k in sj)
    new = full.reshape(target)
    if space is not None and sum(varying) == 1:
        _split_structure(space, new, runs, varying, dst)
    return new


def _split_structure(space: IdSpace, new: torch.Tensor, runs, varying, dst) -> None:
    """A channel dim split into (outer, inner) dims keeps its outer count after pruning (channel
    shuffle's groups, attention heads): record it as equal blocks."""
    sj = runs[varying.index(True)][1]
    big = [k for k in sj if dst[k] > 1]
    if len(big) < 2:
        return
    sub = new.movedim(big, list(range(new.dim() - len(big), new.dim())))
    sub = sub.reshape(-1, *[dst[k] for k in big])[0].reshape(-1, dst[big[-1]])
    rows = torch.unique_consecutive(sub, dim=0) if sub.shape[0] > 1 else sub
    rows = torch.unique(rows, dim=0, sorted=False) if rows.shape[0] > 1 else rows
    flat = rows.reshape(-1)
    if rows.shape[0] > 1 and bool((flat >= 0).all()) and flat.unique().numel() == flat.numel():
        order = torch.argsort(rows[:, 0])
        space.soft_requirements.append((rows[order].reshape(-1).clone(), rows.shape[0]))


@rule(*overloads(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
                 aten.unsqueeze, aten.view_as, aten.reshape_as, aten.squeeze_, aten.unsqueeze_))
def view(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    new = reshape_ids(ids, w.shape(node.args[0]), w.out_shape(node), w.space)
    if new is None:
        w.warn(node, "cannot follow channels through this reshape")
        w.space.exclude(ids)
        return no_identity(w, node)
    return new


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
        w.warn(node, "repeat along a channel dim")
        w.space.exclude(ids)
        return no_identity(w, node)
    return ids


@rule(*overloads(aten.permute, aten.transpose, aten.t, aten.swapaxes, aten.movedim))
def permute(w: Walker, node: fx.Node) -> object:
    ids = w.act(node.args[0])
    if not isinstance(ids, torch.Tensor):
        return no_identity(w, node)
    nd = ids.dim()
    if node.target.overloadpacket is aten.permute:
        return ids.permute(*[d % nd for d in node.args[1]])
    if node.target.overloadpacket is aten.t:
        return ids.t() if nd == 2 else ids
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
    w.space.fix_dim(ids, d, _where(w, node, "slicing along a channel dim hard-codes channel positions"))
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    start = start % src[d] if start < 0 else min(start, src[d])
    return ids.index_select(d, torch.arange(start, start + out[d] * step, step))


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
        # fine while pruning never changes the size of this dim (q/k/v of a packed projection)
        w.space.require_balanced(parts_along(ids, d), _where(w, node, "selecting by position along a channel dim"))
        return ids.select(d, node.args[2])
    return ids.squeeze(d)


def _where(w: Walker, node: fx.Node, why: str) -> str:
    return f"{why} (op {node.target} in module {w.module_of(node)!r})"


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
    if vec is None or src[d] % n_out:
        w.warn(node, "chunk into unequal parts along a channel dim")
        w.space.exclude(ids)
    else:
        # pruning keeps the chunks equal by removing the same count from each
        w.space.require_blocks(vec, n_out)
    return list(ids.chunk(n_out, d))


@rule(*overloads(aten.split, aten.split_with_sizes, aten.unbind, aten.tensor_split))
def split(w: Walker, node: fx.Node) -> object:
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
        w.space.require_balanced(parts, _where(w, node, "split along a channel dim into parts that pruning would make unequal"))
    else:
        w.warn(node, "split with fixed unequal sizes along a channel dim (use chunk for an equal, prunable split)")
        w.space.exclude(ids)
    ids = full
    parts = list(ids.split(sizes, d))
    return [p.squeeze(d) for p in parts] if node.target.overloadpacket is aten.unbind else parts


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
        return combine_all(w, node, [p for p, _ in parts], out)
    pieces = []
    for ids, shape in parts:
        pieces.append(expand_dims(ids, shape, [d]))
    target = [max(p.shape[k] for p in pieces) if k != d else None for k in range(nd)]
    pieces = [p.expand(*[p.shape[k] if k == d else target[k] for k in range(nd)]) for p in pieces]
    return torch.cat(pieces, d)


def combine_all(w: Walker, node: fx.Node, parts: list[torch.Tensor], out: tuple[int, ...]) -> torch.Tensor:
    acc = None
    for ids in parts:
        if acc is None:
            acc = ids
            continue
        a, b = torch.broadcast_tensors(acc, ids)
        w.space.union(a, b)
        w.space.exclude(torch.where(b < 0, a, NONE))
        w.space.exclude(torch.where(a < 0, b, NONE))
        acc = torch.where(a >= 0, a, b)
    return acc if acc is not None else none_like(out)


@rule(*overloads(aten.stack))
def stack(w: Walker, node: fx.Node) -> object:
    out = w.out_shape(node)
    d = _dim(node, 1, 0, len(out))
    parts = [w.act(t) if isinstance(w.act(t), torch.Tensor) else none_like(w.shape(t)) for t in node.args[0]]
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
