"""Shared tracing helpers, and the torch.export tracer (the opt-in fallback to record.py's real-forward tracer)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..wrappers import unwrap_model as unwrap  # noqa: F401  (the one unwrapping helper; re-exported)


class TraceError(RuntimeError):
    """The model could not be traced on the example inputs; the message carries the reason."""


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


def call_with(model: nn.Module, example_inputs: object) -> object:
    """`model` called on `example_inputs` the way torch.export reads them."""
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore training flags and buffers (BatchNorm running statistics) after tracing."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, flag in flags:
            if m.training is not flag:  # (Module.__setattr__ is slow: only the flags that changed)
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


def _floating_dtypes(obj: object) -> set[torch.dtype]:
    if isinstance(obj, torch.Tensor):
        return {obj.dtype} if obj.is_floating_point() else set()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return set().union(*(_floating_dtypes(v) for v in obj)) if obj else set()
    return set()


def forward_hints(model: nn.Module, args: tuple, kwargs: dict, error: BaseException) -> list[str]:
    """What to do about the failures users meet most, recognised from the model and export's message."""
    text = f"{type(error).__name__}: {error}"
    hints = []
    if re.search(r"[A-Za-z]+Cache\b", text):
        hints.append(
            "Hugging Face decoders return a KV cache (DynamicCache) that torch.export cannot output: build the "
            "model with use_cache=False (e.g. from_pretrained(..., use_cache=False), or config.use_cache = False), "
            "or pass use_cache=False in example_inputs ({'input_ids': ids, 'use_cache': False})."
        )
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    inputs = _floating_dtypes((args, kwargs))
    if len(params) == 1 and inputs and inputs != params:
        (want,) = params
        hints.append(
            f"The model's parameters are {want} but the floating example inputs are "
            f"{', '.join(sorted(str(d) for d in inputs))}: pass example inputs of the model's dtype "
            f"(x.to({want})), as the model receives them in training (Lightning's '-true' precisions, .half())."
        )
    return hints


def export(model: nn.Module, example_inputs: object) -> torch.export.ExportedProgram:
    """The fallback tracer: non-strict torch.export (runs the model's Python on fake tensors)."""
    args, kwargs = split_inputs(example_inputs)
    with preserved(model), _no_stack_traces():
        try:
            return torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:  # torch.export raises many types; keep its reason
            reason = str(e).strip().splitlines()
            first = next((line for line in reason if line.strip()), type(e).__name__)
            hints = forward_hints(model, args, kwargs, e) or ["Check that example_inputs match what forward() expects."]
            raise TraceError(
                f"torch.export could not trace {type(model).__name__} with the given example_inputs: "
                f"{type(e).__name__}: {first}\n" + "\n".join(hints)
            ) from e
