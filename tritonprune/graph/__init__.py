"""Channel coupling: record one real forward of a model and find the groups of channels pruned together."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from .._gc import fewer_collections
from . import elementwise as _elementwise  # noqa: F401  (each rules module registers its ops)
from . import layers as _layers  # noqa: F401
from . import matmul as _matmul  # noqa: F401
from . import reshape as _reshape  # noqa: F401
from .assemble import assemble
from .experts import expert_groups
from .group import Group, Slot
from .modes import trace_all_modes
from .outputs import normalize as normalize_outputs
from .remembered import remember_inputs
from .trace import TraceError, unwrap
from .walker import Walker

__all__ = ["find_groups", "Group", "Slot", "TraceError", "resolve_ignored"]


def resolve_ignored(model: nn.Module, ignored_layers: Iterable[object]) -> set[str]:
    """Qualified names of the ignored layers (modules or their names); unknown ones are an error."""
    if not ignored_layers:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    params = {id(p): n for n, p in model.named_parameters()}
    out: set[str] = set()
    for layer in ignored_layers or ():
        if isinstance(layer, str):
            if layer not in dict(model.named_modules()):
                raise ValueError(f"ignored_layers: {layer!r} is not a module of {type(model).__name__}")
            out.add(layer)
        elif isinstance(layer, nn.Parameter) and id(layer) in params:
            out.add(params[id(layer)].rsplit(".", 1)[0] if "." in params[id(layer)] else "")
        elif isinstance(layer, nn.Module) and id(layer) in names:
            out.add(names[id(layer)])
        else:
            raise ValueError(
                f"ignored_layers: {type(layer).__name__} object is not part of {type(model).__name__}; "
                "pass modules of this model or their qualified names"
            )
    return out


def _lazy_graph_modules() -> contextlib.AbstractContextManager:
    """torch.export regenerates Python code for its graph modules several times; the walk reads only the
    graph, so let torch defer that code generation until a module is called (5-10% of find_groups). A
    private torch switch: without it, nothing changes."""
    try:
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:  # pragma: no cover - older/newer torch
        return contextlib.nullcontext()
    return _use_lazy_graph_module(True)


def _walk(programs: list, model: nn.Module, ignored: set[str], head_pruning: str, merged_heads: set[str],
          free_outputs: tuple = (), joined_selects: frozenset[str] = frozenset()):
    # the walk and the assembly compute on small id tensors of their own (never the model's, nothing kept
    # after find_groups): inference mode spares each of their many small ops autograd's bookkeeping
    with torch.inference_mode():
        # both modes where layers run in one only (auxiliary classifiers): one channel space for all graphs
        walkers = [Walker(ep, model, head_pruning) for ep in programs]
        for walker in walkers:
            walker.space = walkers[0].space
            walker.merged_heads = merged_heads
            walker.joined_selects = joined_selects
            walker.free_outputs = free_outputs
            walker.run()
        return walkers[0].space, assemble(walkers[0].space, ignored)


def find_groups(model: nn.Module, example_inputs: object, ignored_layers: Iterable[object] = (), *,
                head_pruning: str = "heads", free_outputs: Iterable[object] = (), tracer: str | None = None
                ) -> list[Group]:
    """Coupled channel groups of `model`, found from the ATen ops of one real forward on `example_inputs`.

    Channels reaching a model output or input, hard-coded positions (slices, fixed-size splits) and ops
    without a rule are left out (the latter with a warning naming the op and module). Parameters are
    named by their qualified names, so the groups apply to any copy of the model.

    `head_pruning` chooses how attention channels are grouped: "heads" removes whole heads (whole
    key/value groups under GQA), "dims" removes the same number of dims from every head.
    `tracer`: "record" (default: the model runs once as the user runs it, under no_grad, training flags
    and buffers restored) or "export" (the opt-in fallback: non-strict torch.export on fake tensors);
    the TRITONPRUNE_TRACER environment variable sets the default.

    `free_outputs` names model outputs whose width may change (intermediate features a model returns
    next to its prediction, YOLO's `feats`): an output name (str, at any depth), a position (int) or a
    pytree path (tuple); see graph/outputs.py. An entry that names no output is an error.
    """
    free_outputs = normalize_outputs(free_outputs)
    if head_pruning not in ("heads", "dims"):
        raise ValueError(f"head_pruning must be 'heads' or 'dims', got {head_pruning!r}")
    model = unwrap(model)
    ignored = resolve_ignored(model, ignored_layers)
    with fewer_collections(), _lazy_graph_modules():
        programs = trace_all_modes(model, example_inputs, tracer)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            space, groups = _walk(programs, model, ignored, head_pruning, set(), free_outputs)
        split = space.split_units if head_pruning == "heads" else set()
        if split or space.uneven_selects:
            # heads whose dims fall into several groups (partial rotary): again, each such head one channel;
            # q/k/v selected by position into different groups (talking heads): again, the parts joined
            space, groups = _walk(programs, model, ignored, head_pruning, split, free_outputs,
                                  frozenset(space.uneven_selects))
        else:
            for w in said:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    remember_inputs(model, example_inputs)  # to verify ambiguous attribute updates after slicing
    taken = {s.name for grp in groups for s in grp.slots}
    extra = expert_groups(model, ignored, taken)  # MoE experts: by module layout, see experts.py
    return groups + [replace(grp, index=len(groups) + i) for i, grp in enumerate(extra)]
