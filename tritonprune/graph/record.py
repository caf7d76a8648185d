"""Record the ATen ops of one real eager forward of the model as an fx graph with shapes.

The model runs as the user would run it (real tensors, its own mode, its own hooks), under no_grad; two
thread-local torch modes watch it:

- a TorchDispatchMode records every ATen op below autograd, with its tensor arguments as graph nodes
  and the shape/dtype of its outputs as `meta["val"]` (meta tensors: the real activations are freed);
- a TorchFunctionMode catches the composite ops whose dispatch-level decomposition would hide the
  layer (F.linear -> t + addmm, matmul/einsum -> view + bmm, scaled_dot_product_attention -> a fused
  kernel, the norms -> reshaped batch norms): each is recorded as the one ATen op torch.export shows,
  and the ops it decomposes into are not recorded.

Parameters and buffers become placeholders named by their qualified names, example inputs and foreign
tensors placeholders without one. In-place ops are recorded as a new value of the tensor they write
(as export's training IR keeps them). Global forward
hooks, filtered by thread, name the innermost module of every op (warnings) and of a failing forward.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .entries import entry_arguments
from .module_stack import ModuleStack

aten = torch.ops.aten


@dataclass
class Trace:
    """What the walker needs from one forward: the graph, and which placeholders are which tensors."""

    graph: fx.Graph
    tensor_names: dict[str, tuple[str, bool]] = field(default_factory=dict)  # placeholder -> (name, buffer)
    out_paths: list[tuple] = field(default_factory=list)  # per output leaf: its keys/indices (free_outputs)
    # (module path, node) -> the forward parameter name the module received that value as (see entries.py)
    entries: dict[tuple[str, fx.Node], str] = field(default_factory=dict)


# ---- composite ops recorded whole (as torch.export shows them) -----------------------------------


def _schema_binder(op, names: list[str] | None = None):
    """Arguments of a Python call -> (args, kwargs) of `op` as the dispatcher boxes them (trailing
    defaults dropped). `names`: the Python function's positional parameter names, where they differ
    from the schema's (F.batch_norm's order); `self` is also found as `input`."""
    schema = op._schema.arguments
    # (name, has a default, default) read once: the schema's accessors cost a C++ call each
    pos = [(a.name, a.has_default_value(), a.default_value if a.has_default_value() else None)
           for a in schema if not a.kwarg_only]
    kwo = [(a.name, a.default_value if a.has_default_value() else None) for a in schema if a.kwarg_only]
    order = names or [a[0] for a in pos] + [a[0] for a in kwo]
    self_alias = "self" in order

    def bind(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        given = dict(zip(order, args))
        for k, v in kwargs.items():
            given["self" if k == "input" and self_alias else k] = v
        out = []
        for name, _, default in pos:
            key = name if name in given or name != "self" else "input"
            out.append(given[key] if key in given else default)
        n = len(out)
        while n and pos[n - 1][1] and _same(out[n - 1], pos[n - 1][2]):
            n -= 1
        kw = {name: given[name] for name, default in kwo if name in given and not _same(given[name], default)}
        return tuple(out[:n]), kw

    return bind


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - exotic defaults: not the same
        return False


def _swap_binder(op):
    bind = _schema_binder(op)

    def swapped(args: tuple, kwargs: dict) -> tuple[tuple, dict]:  # Tensor.__rmatmul__(a, b) is b @ a
        return bind((args[1], args[0]), {})

    return swapped


def _einsum_binder(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    equation, *ops = args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return (equation, list(ops)), {}


def _composites() -> dict[object, tuple[object, object]]:
    table: dict[object, tuple[object, object]] = {}

    def add(funcs, op, binder=None):
        for f in funcs:
            if f is not None:
                table[f] = (op, binder or _schema_binder(op))

    add([F.linear, torch._C._nn.linear], aten.linear.default)
    add([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__], aten.matmul.default)
    add([torch.Tensor.__rmatmul__], aten.matmul.default, _swap_binder(aten.matmul.default))
    add([torch.einsum, getattr(torch.functional, "einsum", None)], aten.einsum.default, _einsum_binder)
    add([F.scaled_dot_product_attention], aten.scaled_dot_product_attention.default)
    add([torch.chunk, torch.Tensor.chunk], aten.chunk.default)
    add([torch.prelu, F.prelu], aten.prelu.default)  # else a view of the weight + _prelu_kernel
    # global pooling decomposes into mean + as_strided
    add([torch.adaptive_avg_pool1d, F.adaptive_avg_pool1d], aten.adaptive_avg_pool1d.default)
    for k in (2, 3):
        op = getattr(aten, f"adaptive_avg_pool{k}d").default
        add([getattr(torch._C._nn, f"adaptive_avg_pool{k}d")], op)
        add([getattr(F, f"adaptive_avg_pool{k}d")], op, _schema_binder(op, ["input", "output_size"]))
    # dropout on CPU decomposes into a mask from empty_like(x): record the layer, not its mask
    add([F.dropout], aten.dropout.default, _schema_binder(aten.dropout.default, ["input", "p", "train"]))
    add([torch.dropout, torch.dropout_], aten.dropout.default)
    add([F.alpha_dropout], aten.alpha_dropout.default,
        _schema_binder(aten.alpha_dropout.default, ["input", "p", "train"]))
    add([F.dropout1d, F.dropout2d, F.dropout3d], aten.feature_dropout.default,
        _schema_binder(aten.feature_dropout.default, ["input", "p", "train"]))
    add([F.feature_alpha_dropout], aten.feature_alpha_dropout.default,
        _schema_binder(aten.feature_alpha_dropout.default, ["input", "p", "train"]))
    add([torch.feature_dropout, torch.feature_dropout_], aten.feature_dropout.default)
    add([torch.alpha_dropout, torch.alpha_dropout_], aten.alpha_dropout.default)
    add([torch.feature_alpha_dropout, torch.feature_alpha_dropout_], aten.feature_alpha_dropout.default)
    add([torch.layer_norm], aten.layer_norm.default)
    add([F.layer_norm], aten.layer_norm.default,
        _schema_binder(aten.layer_norm.default, ["input", "normalized_shape", "weight", "bias", "eps"]))
    add([torch.group_norm], aten.group_norm.default)
    add([F.group_norm], aten.group_norm.default,
        _schema_binder(aten.group_norm.default, ["input", "num_groups", "weight", "bias", "eps"]))
    add([torch.batch_norm], aten.batch_norm.default)
    add([F.batch_norm], aten.batch_norm.default, _schema_binder(
        aten.batch_norm.default,
        ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]))
    add([torch.instance_norm], aten.instance_norm.default)
    add([F.instance_norm], aten.instance_norm.default, _schema_binder(
        aten.instance_norm.default,
        ["input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"]))
    if hasattr(aten, "rms_norm"):
        add([getattr(torch, "rms_norm", None)], aten.rms_norm.default)
        add([getattr(F, "rms_norm", None)], aten.rms_norm.default,
            _schema_binder(aten.rms_norm.default, ["input", "normalized_shape", "weight", "eps"]))
    return table


_COMPOSITES: dict[object, tuple[object, object]] | None = None
_DESCEND: dict[object, object] = {}  # Python-level functions run with the modes on inside (see _descend)


def _no_torch_function(*_args: object) -> bool:
    return False


def _descend_into(func: types.FunctionType) -> types.FunctionType:
    """`func` with its own __torch_function__ check off, so that the ops it calls are seen one by one:
    torch runs a mode's handler with the mode off, which would hide nn.MultiheadAttention's linear and
    attention inside F.multi_head_attention_forward."""
    g = dict(func.__globals__)
    g.update(has_torch_function=_no_torch_function, has_torch_function_unary=_no_torch_function,
             has_torch_function_variadic=_no_torch_function)
    clone = types.FunctionType(func.__code__, g, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


def same_width(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Marker recorded before F.multi_head_attention_forward with separate projection weights: the
    query's width and the q projection's rows must stay equal (the call asserts a square q_proj and
    splits the query width into heads); see layers.same_width."""


def _note_embed_width(rec: Recorder, args: tuple, kwargs: dict) -> None:
    import inspect

    try:
        bound = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
    except TypeError:
        return
    a = bound.arguments
    if a.get("use_separate_proj_weight") and isinstance(a.get("q_proj_weight"), torch.Tensor):
        rec.record(same_width, (a["query"], a["q_proj_weight"]), {}, None)


def _setup() -> dict[object, tuple[object, object]]:
    global _COMPOSITES
    if _COMPOSITES is None:
        _DESCEND[F.multi_head_attention_forward] = _descend_into(F.multi_head_attention_forward)
        _COMPOSITES = _composites()
    return _COMPOSITES


# ---- the recorder ---------------------------------------------------------------------------------


def _functional(func):
    """The op to record for `func`, and whether it writes its first argument in place."""
    schema = func._schema
    args = schema.arguments
    inplace = bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    if not inplace:
        return func, False
    from .walker import RULES  # the rules decide: copy_ has its own, add_ is recorded as add

    if func in RULES or func.overloadpacket in RULES:
        return func, True
    base = func.overloadpacket.__name__
    if base.endswith("_") and not base.startswith("__"):
        packet = getattr(aten, base[:-1], None)
        op = getattr(packet, func._overloadname, None) if packet is not None else None
        if op is not None:
            return op, True
    return func, True


_FUNCTIONAL: dict[object, tuple[object, bool]] = {}
_PLAIN = {int, float, bool, type(None)}  # argument types recorded as they are


class _Graph(fx.Graph):
    """An fx.Graph whose nodes are appended without fx's per-node name sanitising and SymInt checks
    (a third of the recording time): names are n0, n1, ... and nothing else adds nodes to it."""

    def add(self, op: str, target: object, args: tuple = (), kwargs: dict | None = None) -> fx.Node:
        name = f"n{self._len}"
        if _FAST:
            node = fx.Node(self, name, op, target, args, kwargs or {})
            self._insert(node)
            self._len += 1
            return node
        return self.create_node(op, target, args, kwargs or {}, name=name)


_FAST = all(hasattr(fx.Graph(), a) for a in ("_insert", "_len"))


class Recorder:
    """Builds the graph as the ops run (used by the two modes below, one recorder per forward)."""

    def __init__(self, model: nn.Module):
        self.graph = _Graph()
        self.nodes: dict[int, tuple[weakref.ref, fx.Node]] = {}
        modules = list(model.named_modules())
        self.params = _tensor_names(model, modules)  # id -> (qualified name, is_buffer)
        self.tensor_names: dict[str, tuple[str, bool]] = {}
        self.running = ModuleStack({id(m): n for n, m in modules})
        self.stack = self.running.path  # the module path of the op being recorded (read per op)
        self.where: dict[str, dict] = {}  # module path -> its nn_module_stack entry
        self.suppress = 0
        self.op: object = None  # the op running now: names the op of a failing forward
        self.entries: dict[tuple[str, fx.Node], str] = {}

    # tensors <-> nodes
    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        self.nodes[id(t)] = (weakref.ref(t), node)

    def node_of(self, t: torch.Tensor) -> fx.Node:
        entry = self.nodes.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        named = self.params.get(id(t))
        node = self.graph.add("placeholder", "p" if named else "c")
        node.meta["val"] = _meta(t)
        if named:
            self.tensor_names[node.name] = named
        self.bind(t, node)
        return node

    def add_input(self, t: torch.Tensor) -> None:
        node = self.graph.add("placeholder", "x")
        node.meta["val"] = _meta(t)
        self.bind(t, node)

    def arg(self, a: object) -> object:
        if isinstance(a, torch.Tensor):
            entry = self.nodes.get(id(a))
            if entry is not None and entry[0]() is a:
                return entry[1]
            return self.node_of(a)
        if isinstance(a, (list, tuple)):
            if type(a) in (list, tuple):
                if all(type(x) in _PLAIN for x in a):
                    return a  # sizes, strides: nothing to map (fx copies the container)
                return type(a)(self.arg(x) for x in a)
            return [self.arg(x) for x in a]
        return a

    def record(self, op: object, args: tuple, kwargs: dict, out: object, inplace: bool = False) -> None:
        self.suppress += 1  # the meta tensors made here are no ops of the model
        try:
            self._record(op, args, kwargs, out, inplace)
        finally:
            self.suppress -= 1

    def _record(self, op: object, args: tuple, kwargs: dict, out: object, inplace: bool) -> None:
        arg = self.arg
        node = self.graph.add("call_function", op, tuple([arg(a) for a in args]),
                              {k: arg(v) for k, v in kwargs.items()} if kwargs else None)
        if self.stack:
            path = self.stack[-1]
            where = self.where.get(path)
            if where is None:  # one (read-only) dict per module, shared by its nodes
                where = self.where[path] = {path: (path, None)}
            node.meta["nn_module_stack"] = where
        if isinstance(out, torch.Tensor):
            node.meta["val"] = _meta(out)
            target = args[0] if inplace and isinstance(args[0], torch.Tensor) else None
            self.bind(out, node)
            if target is not None and target is not out:
                self.bind(target, node)
            if target is not None:
                self._write_back(target, node)
        elif isinstance(out, (list, tuple)):
            node.meta["val"] = [_meta(o) if isinstance(o, torch.Tensor) else o for o in out]
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.add("call_function", operator.getitem, (node, i))
                    item.meta["val"] = node.meta["val"][i]
                    if "nn_module_stack" in node.meta:
                        item.meta["nn_module_stack"] = node.meta["nn_module_stack"]
                    self.bind(o, item)
        else:
            node.meta["val"] = out

    def _write_back(self, view: torch.Tensor, node: fx.Node) -> None:
        """An in-place write into a slice of another tensor (DeepSeek's `k[..., :d].copy_(k_nope)`): the
        tensor sliced now holds the written values there, recorded as a `slice_scatter` of them into it."""
        base, sliced = view._base, node.args[0] if node.args else None
        if base is None or not isinstance(sliced, fx.Node) or sliced.target is not aten.slice.Tensor:
            return
        entry = self.nodes.get(id(base))
        if entry is None or entry[0]() is not base or sliced.args[0] is not entry[1] or sliced.meta["val"].shape != view.shape:
            return
        scatter = self.graph.add("call_function", aten.slice_scatter.default, (entry[1], node, *sliced.args[1:]))
        scatter.meta.update({k: v for k, v in sliced.meta.items() if k == "nn_module_stack"}, val=_meta(base))
        self.bind(base, scatter)

    def entered(self, module: nn.Module, args: tuple, kwargs: dict, _out: object) -> None:
        """A module's forward returned: note which recorded values it received, under which parameter name
        (a value computed outside it, such as Bloom's ALiBi tensor, may then be narrowed at its entry)."""
        if len(args) + len(kwargs) < 2:
            return  # one input: what the module works on, no side input (most layers; runs on every call)
        path = self.running.names.get(id(module))
        if path is None or threading.get_ident() != self.running.thread:
            return
        for name, t in entry_arguments(module, args, kwargs):
            entry = self.nodes.get(id(t))
            if entry is not None and entry[0]() is t:
                key = (path, entry[1])
                # one module called twice with the same value under two names: ambiguous, not adapted
                self.entries[key] = name if self.entries.get(key, name) == name else ""

    def finish(self, out: object) -> None:
        found = _tensors_with_paths(out)
        self.out_paths = [p for p, _ in found]
        self.graph.add("output", "output", ([self.node_of(t) for _, t in found],))


def _tensor_names(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> dict[int, tuple[str, bool]]:
    """id -> (name, is_buffer) of every parameter and buffer, named as named_parameters() and
    named_buffers() name them (the first name of a shared tensor; a parameter before a buffer), read
    from the module list already made instead of two more walks over the modules."""
    out: dict[int, tuple[str, bool]] = {}
    cls = type(model)
    if not (cls.named_parameters is nn.Module.named_parameters and cls.named_buffers is nn.Module.named_buffers
            and cls._named_members is nn.Module._named_members):  # a model that names them its own way
        for n, p in model.named_parameters():
            out.setdefault(id(p), (n, False))
        for n, b in model.named_buffers():
            out.setdefault(id(b), (n, True))
        return out
    for is_buffer in (False, True):
        for prefix, m in modules:
            for k, t in (m._buffers if is_buffer else m._parameters).items():
                if t is not None and id(t) not in out:
                    out[id(t)] = (f"{prefix}.{k}" if prefix else k, is_buffer)
    return out


_METAS: dict[tuple, torch.Tensor] = {}  # shape/dtype stand-ins, shared: rules only read them


def _meta(t: torch.Tensor) -> torch.Tensor:
    key = (t.shape, t.dtype)
    m = _METAS.get(key)
    if m is None:
        with torch._C._DisableTorchDispatch():
            m = torch.empty(t.shape, dtype=t.dtype, device="meta")
        if len(_METAS) < 100_000:
            _METAS[key] = m
    return m


def _tensors(obj: object) -> list[torch.Tensor]:
    return [t for _, t in _tensors_with_paths(obj)]


def _tensors_with_paths(obj: object, path: tuple = (), depth: int = 0) -> list[tuple[tuple, torch.Tensor]]:
    """Tensors in a forward's output, each with its path of keys and indices: tensors, tuples, lists,
    dicts and mappings (Hugging Face outputs), dataclasses."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if depth > 20:
        return []
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return []
    return [found for k, x in items for found in _tensors_with_paths(x, (*path, k), depth + 1)]


_TO_COPY = aten._to_copy.default


def _float_cast(args: tuple, out: object) -> bool:
    x = args[0] if args else None
    return (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.is_floating_point()
            and out.is_floating_point() and x.shape == out.shape)


class _Ops(TorchDispatchMode):
    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # torch would wrap __torch_dispatch__ in a dynamo-disable (an import and 10 us an op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        rec.op = func
        out = func(*args, **kwargs)
        rec.op = None
        if rec.suppress:
            return out
        if func is _TO_COPY and _float_cast(args, out):
            # autocast's casts (and x.float()): the same channels; a cast weight stays the weight
            rec.bind(out, rec.node_of(args[0]))
            return out
        entry = _FUNCTIONAL.get(func)
        if entry is None:
            entry = _FUNCTIONAL[func] = _functional(func)
        rec.record(entry[0], args, kwargs, out, entry[1])
        return out


class _Layers(TorchFunctionMode):
    def __init__(self, rec: Recorder, table: dict, ops: _Ops | None = None):
        super().__init__()
        self.rec = rec
        self.table = table
        self.ops = ops  # the dispatch-level recorder, set aside while a composite runs whole

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = self.table.get(func)
        rec = self.rec
        rec.op = func
        if entry is None:
            inner = _DESCEND.get(func)
            if inner is not None:
                if func is F.multi_head_attention_forward:
                    _note_embed_width(rec, args, kwargs)
                with self:
                    out = inner(*args, **kwargs)
            else:
                out = func(*args, **kwargs)
            rec.op = None
            return out
        if rec.suppress:
            out = func(*args, **kwargs)
            rec.op = None
            return out
        rec.suppress += 1
        # its ops are not recorded: take the dispatch-level recorder off the stack meanwhile (a third of
        # the ops of a forward reach it from inside composites; each costs a Python call)
        aside = _set_aside(self.ops)
        try:
            out = func(*args, **kwargs)
        finally:
            if aside is not None:
                torch._C._push_on_torch_dispatch_stack(aside)
            rec.suppress -= 1
        rec.op = None
        op, bind = entry
        a, k = bind(args, kwargs)
        rec.record(op, a, k, out)
        return out


def _set_aside(mode: TorchDispatchMode | None) -> TorchDispatchMode | None:
    """Pop `mode` off this thread's dispatch stack if it is on top (else leave the stack alone)."""
    if mode is None:
        return None
    n = torch._C._len_torch_dispatch_stack()
    if n and torch._C._get_dispatch_stack_at(n - 1) is mode:
        return torch._C._pop_torch_dispatch_stack(None)
    return None


def _input_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return _tensors(list(args) + list(kwargs.values()))


class ForwardFailed(RuntimeError):
    """The forward raised; `module` is the innermost module that was running, `op` the last op started."""

    def __init__(self, module: str, op: object, error: BaseException):
        super().__init__(str(error))
        self.module = module
        self.op = op
        self.error = error


def record_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Trace, object]:
    """Run `model(*args, **kwargs)` once under no_grad, recording its ops; returns the trace and the
    output. Raises ForwardFailed (with the innermost running module) if the forward raises."""
    table = _setup()
    rec = Recorder(model)
    for t in _input_tensors(args, kwargs):
        rec.add_input(t)
    ops = _Ops(rec)
    entered = nn.modules.module.register_module_forward_hook(rec.entered, with_kwargs=True)
    try:
        with rec.running.hooked(), torch.no_grad(), _Layers(rec, table, ops), ops:
            try:
                out = model(*args, **kwargs)
            except Exception as e:  # the model's own error: name where it happened
                raise ForwardFailed(rec.running.innermost(), rec.op, e) from e
    finally:
        entered.remove()
    rec.finish(out)
    return Trace(rec.graph, rec.tensor_names, rec.out_paths, rec.entries), out


def op_name(op: object) -> str:
    """An ATen op as torch prints it (aten.convolution.default), a torch function as torch.<name>."""
    if isinstance(op, torch._ops.OpOverload):
        return str(op)
    name = getattr(op, "__name__", None) or repr(op)
    return f"Tensor.{name}" if "Tensor" in (getattr(op, "__qualname__", None) or "") else f"torch.{name}"


def _norms_kept(model: nn.Module):
    """BatchNorm layers left in eval mode for a train-mode forward that only looks for branches: the
    branch structure is the same, a batch of 1 runs, and running statistics are not updated."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def trace(model: nn.Module, example_inputs: object, *, train: bool | None = None) -> Trace:
    """The Trace of one real forward of `model` on `example_inputs`, in its own mode (or in train /
    eval mode where `train` is given, BatchNorm layers then kept in eval mode). Training flags and
    buffers are restored afterwards. A forward that raises is a TraceError naming the module and op."""
    from .trace import TraceError, forward_hints, preserved, split_inputs

    args, kwargs = split_inputs(example_inputs)
    with preserved(model):
        if train is not None:
            model.train(train)
            if train:
                for m in _norms_kept(model):
                    m.training = False
        try:
            result, _ = record_forward(model, args, kwargs)
        except ForwardFailed as e:
            err = e.error
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            where = f" in module {e.module!r}" if e.module else ""
            op = f" (op {op_name(e.op)})" if e.op is not None else ""
            mode = "" if train is None else f" in {'train' if train else 'eval'} mode"
            hints = forward_hints(model, args, kwargs, err) or [
                "Check that example_inputs match what forward() expects (positional tuple or keyword dict, "
                "on the model's device and dtype)."]
            raise TraceError(
                f"{type(model).__name__} failed to run on the given example_inputs{mode}{where}{op}: "
                f"{type(err).__name__}: {lines[0] if lines else ''}\n" + "\n".join(hints)
            ) from err
    return result
