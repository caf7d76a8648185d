"""Trace every layer the model runs: in its current mode, and in the other one where layers are missing.

A graph traced in eval mode misses the layers that only run in training (GoogLeNet's and
Inception-v3's auxiliary classifiers read trunk channels only when `self.training`); groups found
from it would prune those trunk channels without cutting the auxiliary layers' inputs, and the
first training step after pruning would fail. So: trace in the mode the model is in; if some
trainable parameter is absent from that graph, trace again in the other mode and walk both graphs
into one channel space (a channel coupled in either graph is coupled). If the second trace fails,
refuse naming the parameters, rather than return groups that break the other mode.
"""

from __future__ import annotations

import torch
from torch import nn

from .trace import TraceError, export


def traced_parameters(ep: torch.export.ExportedProgram) -> set[str]:
    """Qualified names of the parameters an exported graph reads (export lifts every parameter of the
    module into its signature; an unread one has a placeholder without users)."""
    read = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    return {
        s.target for s in ep.graph_signature.input_specs
        if s.kind.name == "PARAMETER" and s.target and s.arg.name in read
    }


def missing_parameters(ep: torch.export.ExportedProgram, model: nn.Module) -> list[str]:
    """Trainable parameters of `model` that the graph does not read (shared tensors count once)."""
    used = traced_parameters(ep)
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in used]


def export_all_modes(model: nn.Module, example_inputs: object) -> list[torch.export.ExportedProgram]:
    """The graph in the model's mode, plus the graph in the other mode where the first misses parameters."""
    ep = export(model, example_inputs)
    missing = missing_parameters(ep, model)
    if not missing:
        return [ep]
    flags = [(m, m.training) for m in model.modules()]
    other = "eval" if model.training else "train"
    try:
        model.train(other == "train")
        try:
            ep2 = export(model, example_inputs)
        except TraceError as e:
            shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise TraceError(
                f"{type(model).__name__}: {len(missing)} parameters ({shown}) are not used in "
                f"{'train' if other == 'eval' else 'eval'} mode, and tracing in {other} mode to find their "
                f"channels failed: {e}\nGroups found in one mode only could break the model in the other; "
                f"give example_inputs that also run in {other} mode (e.g. a batch of 2 or more for BatchNorm)."
            ) from e
    finally:
        for m, flag in flags:
            m.training = flag
    if len(missing_parameters(ep2, model)) >= len(missing) and not (traced_parameters(ep2) - traced_parameters(ep)):
        return [ep]  # the other mode reads nothing new: those parameters are unused in both
    return [ep, ep2]
