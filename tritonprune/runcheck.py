"""Does a (planned) pruned model still run? A forward on fake tensors, with no compute and no side effects.

The model's module tree is copied with every parameter, buffer and tensor attribute replaced by a
meta tensor (the copy shares no storage with the model and costs no memory), the plan is sliced onto
the copy with the real slicing code (so module attributes, attention head counts and config fields are
updated exactly as `apply` would), and the copy then runs the example inputs under torch's
`FakeTensorMode`: shapes, dtypes and devices propagate, nothing is computed. Hooks are not copied
(user hooks could write to real state); config objects are copied, since slicing writes to them.

A forward-hook stack on the copy names the innermost module that was running when the forward
failed. The output is compared with the unpruned copy's: same pytree structure, and the same shape
and dtype for every tensor leaf.

    failure = run_check(model, example_inputs, plan)   # None: the pruned model runs (plan or (group, removed) pairs)
    failure.module, failure.error                      # where and why it broke
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from .graph.trace import call_with
from .module_copy import copy_tree

__all__ = [
    "RunFailure",
    "RunCheckUnavailable",
    "meta_copy",
    "prepared_copy",
    "fake_forward",
    "reference_output",
    "Reference",
    "run_check",
    "input_spec",
    "inputs_from_spec",
]


@dataclass
class RunFailure:
    """Why a model did not run: the innermost module running when it failed ('' for the root or
    outside any module, e.g. an output mismatch) and the error text."""

    module: str
    error: str

    def __str__(self) -> str:
        where = f"in module {self.module!r}" if self.module else "in the model's own forward"
        return f"{where}: {self.error}"


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree on the meta device (`module_copy.copy_tree`): same classes and
    attributes, no hooks, every tensor a meta tensor of the same shape, strides, dtype and requires_grad."""
    return copy_tree(model, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"))


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _devices(model: nn.Module) -> dict[str, torch.device]:
    """Where each tensor's fake stands in; a meta-device model (built to load weights into later) is
    checked as if on CPU, where the forward's own factory calls put their tensors."""

    def where(t: torch.Tensor) -> torch.device:
        return torch.device("cpu") if t.device.type == "meta" else t.device

    out = {n: where(p) for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({n: where(b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None})
    return out


def _fakeify(copy_: nn.Module, devices: Mapping[str, torch.device], mode) -> None:
    """Swap the copy's meta tensors for fake tensors on the devices the model's tensors live on."""
    from torch._subclasses.fake_tensor import FakeTensor

    default = next(iter(devices.values()), torch.device("cpu"))
    done: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, device) -> torch.Tensor:
        if id(t) not in done:
            f = FakeTensor(mode, t.detach() if isinstance(t, nn.Parameter) else t, torch.device(device))
            if isinstance(t, nn.Parameter):
                f = nn.Parameter(f, requires_grad=t.requires_grad)
            done[id(t)] = f
        return done[id(t)]

    def is_meta(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.device.type == "meta" and not isinstance(v, FakeTensor)

    for mname, m in copy_.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        for store in (m._parameters, m._buffers):
            for n, t in store.items():
                if t is not None:
                    store[n] = fake(t, devices.get(pre + n, default))
        for k, v in list(vars(m).items()):
            if is_meta(v):
                m.__dict__[k] = fake(v, default)
            elif isinstance(v, (list, tuple)) and any(is_meta(x) for x in v):
                m.__dict__[k] = type(v)(fake(x, default) if is_meta(x) else x for x in v)


class _Stack:
    """Forward hooks on every module of the copy: the path of modules running right now. A failing
    forward never reaches the post-hooks, so the path then ends at the innermost failing module."""

    def __init__(self, model: nn.Module):
        self.path: list[str] = []
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Callable:
        def hook(_m, _args):
            self.path.append(name)

        return hook

    def _leave(self, _m, _args, _out):
        if self.path:
            self.path.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _spec_of(out: Any) -> tuple[Any, list[Any]]:
    leaves, spec = tree_flatten(out)
    sig = [
        (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves
    ]
    return spec, sig


def fake_forward(
    model: nn.Module,
    example_inputs: Any,
    *,
    context: Callable[[nn.Module], Any] | None = None,
    train: bool = False,
) -> tuple[Any, list[Any]] | RunFailure:
    """Run `model` (from `prepared_copy`, possibly sliced) on fake copies of `example_inputs`, under
    no_grad, in eval mode (or train mode: branches that only run in training). `context(model)`, if
    given, is a context manager entered around the forward once the copy holds its fake tensors (the
    MAC counter). Returns the output's (pytree spec, per-leaf (shape, dtype) or type name) or a
    RunFailure. A copy can run several times (its fake tensors are made once)."""
    mode = getattr(model, "_tritonprune_mode", None)
    if mode is None:
        mode = _fake_mode()
        _fakeify(model, _devices_of_copy(model), mode)
        object.__setattr__(model, "_tritonprune_mode", mode)
    extra = context(model) if context is not None else contextlib.nullcontext()
    model.train(train)
    stack = _Stack(model)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    was = quiet.disabled
    quiet.disabled = True  # fake tensors log every failing meta kernel; the failure is returned instead
    try:
        with mode, torch.no_grad(), extra:
            inputs = tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, example_inputs)
            out = call_with(model, inputs)
        return _spec_of(out)
    except Exception as e:  # any error of the forward is the answer
        text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        where = stack.path[-1] if stack.path else ""
        return RunFailure(where, text + (" (in train mode)" if train else ""))
    finally:
        quiet.disabled = was
        stack.remove()


@dataclass
class Reference:
    """The unpruned model's output structure on fake tensors: in eval mode, and in train mode when the
    model is in training mode (None otherwise, or when train mode cannot run on fake tensors)."""

    eval: tuple[Any, list[Any]]
    train: tuple[Any, list[Any]] | None = None


def _devices_of_copy(model: nn.Module) -> dict[str, torch.device]:
    return getattr(model, "_tritonprune_devices", None) or {}


def prepared_copy(model: nn.Module) -> nn.Module:
    """`meta_copy(model)` that remembers the devices of the model's tensors, for `fake_forward`."""
    c = meta_copy(model)
    # a copy of a copy (the attribute check inside run_check) keeps the devices of the real model
    object.__setattr__(c, "_tritonprune_devices", _devices_of_copy(model) or _devices(model))
    c.__dict__.pop("_tritonprune_mode", None)
    return c


def run_check(
    model: nn.Module,
    example_inputs: Any,
    removals: Iterable[tuple[Any, Any]] | Any = None,
    *,
    reference: Reference | None = None,
) -> RunFailure | None:
    """None if `model` with `removals` (a PrunePlan, or (group, removed channels) pairs)
    sliced off still runs `example_inputs` with the same output structure as the unpruned model (in
    eval mode, and in train mode too when the model is training); else where and why it does not.
    `model` is not touched. `reference` (from `reference_output`) saves the unpruned forwards when
    checking many plans of one model.

    Raises ValueError if the removals do not fit the model (validation, as `apply` does), and
    RunCheckUnavailable if even the unpruned model cannot run on fake tensors (the check cannot
    tell anything then)."""
    from .slicing import apply_cuts, build_cuts, model_tensors

    ref = reference_output(model, example_inputs) if reference is None else reference
    c = prepared_copy(model)
    removals = list(removals._removals() if hasattr(removals, "_removals") else removals or ())
    if removals:
        cuts = build_cuts(removals, model_tensors(c))
        try:
            apply_cuts(c, cuts)
        except ValueError as e:
            return RunFailure("", f"slicing refused: {e}")
    for train, expected in ((False, ref.eval), (True, ref.train)):
        if expected is None:
            continue
        got = fake_forward(c, example_inputs, train=train)
        if isinstance(got, RunFailure):
            return got
        diff = _compare(expected, got)
        if diff is not None:
            return diff
    return None


class RunCheckUnavailable(RuntimeError):
    """The unpruned model itself does not run on fake tensors (data-dependent code, custom ops)."""


def reference_output(
    model: nn.Module, example_inputs: Any, *, context: Callable[[nn.Module], Any] | None = None
) -> Reference:
    """Output structure of the unpruned model on fake tensors; raises RunCheckUnavailable if it does
    not run in eval mode. `context` as in `fake_forward`, for the eval pass (prune counts MACs in it)."""
    c = prepared_copy(model)
    got = fake_forward(c, example_inputs, context=context)
    if isinstance(got, RunFailure):
        raise RunCheckUnavailable(f"the unpruned model does not run on fake tensors ({got})")
    train = None
    if model.training:
        t = fake_forward(c, example_inputs, train=True)
        train = None if isinstance(t, RunFailure) else t
    return Reference(got, train)


def _compare(ref: tuple[Any, list[Any]], got: tuple[Any, list[Any]]) -> RunFailure | None:
    (spec0, sig0), (spec1, sig1) = ref, got
    if spec0 != spec1:
        return RunFailure("", f"the output structure changed: {spec0} -> {spec1}")
    for i, (a, b) in enumerate(zip(sig0, sig1)):
        if a != b:
            return RunFailure("", f"output leaf {i} changed from {a} to {b}")
    return None


# ------------------------------------------------------------------------ example inputs in a plan


def input_spec(example_inputs: Any) -> Any | None:
    """A JSON-able description of `example_inputs` (tensor shapes and dtypes, plain values kept), so a
    saved plan can check the model it is applied to; None if some leaf cannot be described."""

    def describe(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {"__tensor__": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return {"__seq__": [describe(v) for v in x], "tuple": isinstance(x, tuple)}
        if isinstance(x, Mapping) and all(isinstance(k, str) for k in x):
            return {"__dict__": {k: describe(v) for k, v in x.items()}}
        raise TypeError(type(x).__name__)

    try:
        return describe(example_inputs)
    except TypeError:
        return None


def inputs_from_spec(spec: Any, device: torch.device | str = "cpu") -> Any:
    """Meta-device example inputs rebuilt from `input_spec` (values are never needed by the check)."""
    if isinstance(spec, dict) and "__tensor__" in spec:
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"plan info: unknown input dtype {spec.get('dtype')!r}")
        return torch.zeros(spec["__tensor__"], dtype=dtype, device=device)
    if isinstance(spec, dict) and "__seq__" in spec:
        items = [inputs_from_spec(v, device) for v in spec["__seq__"]]
        return tuple(items) if spec.get("tuple") else items
    if isinstance(spec, dict) and "__dict__" in spec:
        return {k: inputs_from_spec(v, device) for k, v in spec["__dict__"].items()}
    return spec
