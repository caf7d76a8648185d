"""Trace every layer the model runs: in its current mode, and in the other one where layers are missing.

A graph traced in eval mode misses the layers that only run in training (GoogLeNet's and
Inception-v3's auxiliary classifiers read trunk channels only when `self.training`); groups found
from it would prune those trunk channels without cutting the auxiliary layers' inputs, and the
first training step after pruning would fail. So: trace in the mode the model is in; if some
trainable parameter is absent from that graph, trace again in the other mode and walk both graphs
into one channel space (a channel coupled in either graph is coupled). If the second trace fails,
refuse naming the parameters, rather than return groups that break the other mode.

Two tracers: "record" (default; record.py, one real forward per mode, BatchNorm layers kept in eval
mode in the train-mode forward so that a batch of 1 runs and no statistic moves) and "export" (the
opt-in fallback: non-strict torch.export on fake tensors, trace.py).
"""

from __future__ import annotations

import os

from torch import nn

from .record import Trace, trace
from .trace import TraceError, export

TRACERS = ("record", "export")


def default_tracer() -> str:
    """The tracer find_groups uses when not told: TRITONPRUNE_TRACER=export selects the fallback."""
    name = os.environ.get("TRITONPRUNE_TRACER", "record")
    if name not in TRACERS:
        raise ValueError(f"TRITONPRUNE_TRACER must be one of {TRACERS}, got {name!r}")
    return name


def traced_parameters(graph: object) -> set[str]:
    """Qualified names of the parameters a traced graph reads."""
    if isinstance(graph, Trace):
        return {name for name, is_buffer in graph.tensor_names.values() if not is_buffer}
    # export lifts every parameter of the module into its signature; an unread one has no users
    read = {n.name for n in graph.graph.nodes if n.op == "placeholder" and n.users}
    return {
        s.target for s in graph.graph_signature.input_specs
        if s.kind.name == "PARAMETER" and s.target and s.arg.name in read
    }


def missing_parameters(graph: object, model: nn.Module) -> list[str]:
    """Trainable parameters of `model` that the graph does not read (shared tensors count once)."""
    used = traced_parameters(graph)
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in used]


def _trace(model: nn.Module, example_inputs: object, tracer: str, train: bool | None) -> object:
    if tracer == "export":
        if train is None:
            return export(model, example_inputs)
        flags = [(m, m.training) for m in model.modules()]
        try:
            model.train(train)
            return export(model, example_inputs)
        finally:
            for m, flag in flags:
                m.training = flag
    return trace(model, example_inputs, train=train)


def trace_all_modes(model: nn.Module, example_inputs: object, tracer: str | None = None) -> list[object]:
    """The graph in the model's mode, plus the graph in the other mode where the first misses parameters."""
    tracer = tracer or default_tracer()
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    first = _trace(model, example_inputs, tracer, None)
    missing = missing_parameters(first, model)
    if not missing:
        return [first]
    other = "eval" if model.training else "train"
    try:
        second = _trace(model, example_inputs, tracer, other == "train")
    except TraceError as e:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise TraceError(
            f"{type(model).__name__}: {len(missing)} parameters ({shown}) are not used in "
            f"{'train' if other == 'eval' else 'eval'} mode, and tracing in {other} mode to find their "
            f"channels failed: {e}\nGroups found in one mode only could break the model in the other; "
            f"give example_inputs that also run in {other} mode."
        ) from e
    if len(missing_parameters(second, model)) >= len(missing) and not (
            traced_parameters(second) - traced_parameters(first)):
        return [first]  # the other mode reads nothing new: those parameters are unused in both
    return [first, second]


export_all_modes = trace_all_modes  # the former name
