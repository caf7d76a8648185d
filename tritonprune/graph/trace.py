"""Export a model to an ATen graph with shapes, leaving the model exactly as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..wrappers import unwrap_model as unwrap  # noqa: F401  (the one unwrapping helper; re-exported)


class TraceError(RuntimeError):
    """torch.export could not trace the model; the message carries its reason."""


def split_inputs(example_inputs: object) -> tuple[tuple, dict]:
    """`example_inputs` as torch.export takes them: a tensor, a tuple/list of positional args, or a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore training flags and buffers (BatchNorm running statistics) after tracing."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    # recording a Python stack trace per node is a third of export's time; we never read them
    cfg = torch.fx.config
    saved = cfg.do_not_emit_stack_traces
    cfg.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        cfg.do_not_emit_stack_traces = saved


def export(model: nn.Module, example_inputs: object) -> torch.export.ExportedProgram:
    args, kwargs = split_inputs(example_inputs)
    with preserved(model), _no_stack_traces():
        try:
            return torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:  # torch.export raises many types; keep its reason
            reason = str(e).strip().splitlines()
            first = next((line for line in reason if line.strip()), type(e).__name__)
            raise TraceError(
                f"torch.export could not trace {type(model).__name__} with the given example_inputs: "
                f"{type(e).__name__}: {first}\nCheck that example_inputs match what forward() expects."
            ) from e
