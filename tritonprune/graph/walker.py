"""The graph walk: applies one coupling rule per ATen op and keeps the channel ids of every value.

Each rule reads the compact channel ids of its inputs (see channels.py), unions the ids that must be
pruned together, records the constraints it imposes, and returns the ids of its output. An op without
a rule excludes every channel that touches it and is named in one warning.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import fx, nn

from . import group as g
from . import outputs
from .channels import IdSpace, along, has_ids, none_like

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


def _live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes some output depends on."""
    out = [n for n in graph.nodes if n.op == "output"]
    live, todo = set(out), list(out)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in live:
                live.add(a)
                todo.append(a)
    return live


class Walker:
    """Walks the graph once, applying rules; collects everything assemble.py needs."""

    def __init__(self, graph: object, model: nn.Module, head_pruning: str = "heads"):
        """`graph`: a record.Trace (the default tracer) or a torch.export ExportedProgram (the fallback)."""
        self.head_pruning = head_pruning
        self.free_outputs: tuple = ()  # output entries whose width may change (see outputs.py)
        self.merged_heads: set[str] = set()  # attention nodes whose heads are one channel each (see layers.sdpa)
        self.joined_selects: set[str] = set()  # select nodes whose parts are joined by position (reshape.select)
        self.ep = graph
        self.model = model
        self.space = IdSpace()
        self.ids: dict[fx.Node, object] = {}
        self.tensor_names: dict[str, tuple[str, bool]] = {}  # placeholder -> (qualified name, is_buffer)
        self.graph: fx.Graph = graph.graph
        # recorded shapes are plain ints; export's may be symbolic (int() of each)
        self.int_shapes = not hasattr(graph, "graph_signature")
        if hasattr(graph, "graph_signature"):
            self._export_names(graph, model)
        else:
            self.tensor_names.update(graph.tensor_names)
        self.value_ranges: list[tuple[int, int]] = []  # ids of parameters/buffers used as values
        self.table_ranges: list[tuple[int, int]] = []  # ids of those spread over positions (rotary)
        self.warned: set[tuple[str, str]] = set()
        self.warnings: list[str] = []

    @functools.cached_property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def _export_names(self, ep: object, model: nn.Module) -> None:
        # tied weights (GPT-2's lm_head and wte) are one tensor: name it as named_parameters() does
        canonical = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        for spec in ep.graph_signature.input_specs:
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER") and spec.target is not None:
                try:
                    tensor = model.get_parameter(spec.target) if kind == "PARAMETER" else model.get_buffer(spec.target)
                    name = canonical.get(id(tensor), spec.target)
                except AttributeError:
                    name = spec.target
                self.tensor_names[spec.arg.name] = (name, kind == "BUFFER")

    # ---- helpers used by rules ----------------------------------------------------------------
    def run(self) -> None:
        live = _live(self.graph)
        found: dict[int, Rule | None] = {}  # id(op) -> its rule (ops hash in Python: look each up once)
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.ids[node] = None if node.name in self.tensor_names else self._input_ids(node)
            elif node.op == "call_function":
                key = id(node.target)
                if key in found:
                    fn = found[key]
                else:
                    fn = found[key] = _rule_of(node.target)
                if fn is None:
                    continue  # runtime checks without outputs
                mixing = len(self.space.mixing)
                self.ids[node] = fn(self, node)
                if node not in live:
                    # a result no output depends on (the head-averaged weights nn.MultiheadAttention
                    # returns and the caller drops) still runs, so it couples channels, but what it
                    # mixes changes no output: the groups stay exact
                    del self.space.mixing[mixing:]
            elif node.op == "output":
                self._outputs(node)
            # get_attr (lifted constants) carry no channel identity

    def _outputs(self, node: fx.Node) -> None:
        """Channels reaching an output keep their width, except in the outputs named by `free_outputs`."""
        flat = list(node.args[0]) if node.args and isinstance(node.args[0], (list, tuple)) else list(node.args)
        if not self.free_outputs:
            for arg in flat:
                self._exclude_output(arg)
            return
        user = self._user_outputs(len(flat))
        paths = getattr(self.ep, "out_paths", None)  # the recorded forward's output leaves
        if paths is None:  # the export fallback: its output spec
            spec = getattr(getattr(self.ep, "call_spec", None), "out_spec", None)
            paths = outputs.leaf_paths(spec) if spec is not None else None
        if paths is None or len(user) != len(paths):
            raise ValueError("free_outputs: the traced graph does not say which output is which; "
                             "leave free_outputs out for this model")
        free = outputs.free_leaves(paths, self.free_outputs)
        for pos, arg in enumerate(flat):
            if pos not in user or not free[user.index(pos)]:
                self._exclude_output(arg)

    def _user_outputs(self, n: int) -> list[int]:
        """Positions of the model's own outputs among the graph's outputs (not mutated buffers)."""
        specs = getattr(getattr(self.ep, "graph_signature", None), "output_specs", None)
        if specs is None or len(specs) != n:
            return list(range(n))
        return [i for i, s in enumerate(specs) if s.kind.name == "USER_OUTPUT"]

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
            return tuple(val.shape) if self.int_shapes else tuple(int(s) for s in val.shape)
        return None

    def out_shape(self, node: fx.Node, index: int | None = None) -> tuple[int, ...]:
        val = node.meta["val"]
        if index is not None:
            val = val[index]
        return tuple(val.shape) if self.int_shapes else tuple(int(s) for s in val.shape)

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
        module = self.modules.get(owner(name))
        if name.rpartition(".")[2] == "bias" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            # a layer's bias that functional code reads (F.multi_head_attention_forward concatenates
            # q_proj/k_proj/v_proj biases): labelled as the layer labels it
            kind = g.LINEAR if isinstance(module, nn.Linear) else g.CONV
            ids = self.pid(node, d, kind=kind, role=g.OUT, is_bias=True)
            self.value_ranges.append((int(ids[0]), int(ids[-1]) + 1))
            return along(ids, d, len(shape))
        ids = self.pid(node, d, kind=kind, role=role)
        self.value_ranges.append((int(ids[0]), int(ids[-1]) + 1))
        return along(ids, d, len(shape))

    def is_param_value(self, ids: torch.Tensor) -> bool:
        """All channel ids of `ids` come from one parameter or buffer used as a value."""
        return _within(ids, self.value_ranges)

    def mark_table(self, ids: torch.Tensor) -> None:
        known = ids[ids >= 0]
        self.table_ranges.append((int(known.min()), int(known.max()) + 1))

    def is_table(self, ids: torch.Tensor) -> bool:
        """`ids` are those of a table of positions built from a parameter (see elementwise._note_table)."""
        return _within(ids, self.table_ranges)

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


def _rule_of(op: object) -> Rule | None:
    """The rule of `op` (by op, else by its packet), `unknown` without one, None for runtime checks."""
    fn = RULES.get(op)
    if fn is None and hasattr(op, "overloadpacket"):
        fn = RULES.get(op.overloadpacket)
    if fn is None and getattr(op, "__name__", "").split(".")[0] in NO_OPS:
        return None
    return fn or unknown


def _within(ids: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """`ids` hold channel ids, all inside one of the id ranges."""
    if not ranges or not ids.numel():
        return False
    hi = int(ids.max())  # the largest id (NONE, -1, is below every id)
    around = [a for a, b in ranges if a <= hi < b]
    if hi < 0 or not around:
        return False  # no ids, or the largest outside every range: one reduction, no masking
    lo = int(ids[ids >= 0].min())
    return any(a <= lo for a in around)


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


def where(w: Walker, node: fx.Node, why: str) -> str:
    return f"{why} (op {node.target} in module {w.module_of(node)!r})"
