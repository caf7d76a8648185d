"""A what-if forward of a copy of a model: shapes, dtypes and devices of its output, or where it fails.

The model's module tree is copied (`module_copy.copy_tree`: the copy shares no storage with the model);
hooks are not copied (user hooks could write to real state); config objects are copied, since slicing
writes to them. A forward-hook stack on the copy names the innermost module that was running when the
forward failed. The run check and the attribute verification of slicing both stand on this.

Two kinds of copy, one answer:
- a small model on the CPU (at most REAL_COPY_BYTES of tensors) is cloned and run for real, under no_grad,
  with the CPU random state restored afterwards: a fake-tensor forward costs 3-10x a real one at the
  sizes pruning is checked on;
- anything else (large, on an accelerator, or already on meta) becomes a meta-device copy run on fake
  tensors: no memory, no compute, and no device-side assert can reach the process.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..graph.module_copy import copy_tree
from ..graph.module_stack import ModuleStack
from ..graph.trace import call_with
from .history import PLANS

__all__ = ["RunFailure", "meta_copy", "real_copy", "prepared_copy", "fake_forward"]


@dataclass
class RunFailure:
    """Why a model did not run: the innermost module running when it failed ('' for the root or
    outside any module, e.g. an output mismatch) and the error text."""

    module: str
    error: str

    def __str__(self) -> str:
        where = f"in module {self.module!r}" if self.module else "in the model's own forward"
        return f"{where}: {self.error}"


REAL_COPY_BYTES = 256 * 2**20
_BOOKKEEPING = (PLANS,)  # the plans applied to the model (history.py): a what-if copy has no use for them


def _real_copy_fits(model: nn.Module) -> bool:
    """A CPU model whose tensors take at most REAL_COPY_BYTES (the copy's and the forward's memory)."""
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu" or type(t) not in (torch.Tensor, nn.Parameter):  # meta, cuda, DTensor, fakes
            return False
        total += t.numel() * t.element_size()
    return total <= REAL_COPY_BYTES


def real_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree with every tensor cloned (`module_copy.copy_tree`), no hooks."""
    c = copy_tree(model, lambda t: t.detach().clone(), leave_out=_BOOKKEEPING)
    object.__setattr__(c, "_tritonprune_real", True)
    return c


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree on the meta device (`module_copy.copy_tree`): same classes and
    attributes, no hooks, every tensor a meta tensor of the same shape, strides, dtype and requires_grad."""
    return copy_tree(model, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"),
                     leave_out=_BOOKKEEPING)


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
            done[id(f)] = f  # a module shared by several parents is visited again with its fake tensors
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
    RunFailure. A copy can run several times (its fake tensors are made once). A real copy runs on real
    tensors (meta example inputs become zeros), with the CPU random state restored."""
    if getattr(model, "_tritonprune_real", False):
        def real(x: Any) -> Any:
            return torch.zeros(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) and x.is_meta else x

        return _forward(model, tree_map(real, example_inputs), context, train, contextlib.nullcontext(),
                        lambda inputs: inputs)
    mode = getattr(model, "_tritonprune_mode", None)
    if mode is None:
        mode = _fake_mode()
        _fakeify(model, _devices_of_copy(model), mode)
        object.__setattr__(model, "_tritonprune_mode", mode)
    return _forward(model, example_inputs, context, train, mode,
                    lambda inputs: tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, inputs))


def _forward(model: nn.Module, example_inputs: Any, context, train: bool, mode, convert) -> Any:
    extra = context(model) if context is not None else contextlib.nullcontext()
    model.train(train)
    stack = ModuleStack({id(m): name for name, m in model.named_modules()})
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    was = quiet.disabled
    quiet.disabled = True  # fake tensors log every failing meta kernel; the failure is returned instead
    # model code that caches tensors in an lru cache (Hugging Face's BEiT position index) must not keep a
    # fake tensor for the real model's next forward: caches the fake forward filled are emptied after it
    caches = [(c, c.cache_info().currsize) for c in _lru_caches(model)]
    try:
        # the CPU random state is restored: a real copy's dropout must not move the user's random stream
        with stack.hooked(), torch.random.fork_rng(devices=[]), mode, torch.no_grad(), extra:
            out = call_with(model, convert(example_inputs))
        return _spec_of(out)
    except Exception as e:  # any error of the forward is the answer
        text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return RunFailure(stack.innermost(), text + (" (in train mode)" if train else ""))
    finally:
        for c, size in caches:
            if c.cache_info().currsize != size:
                c.cache_clear()
        quiet.disabled = was


def _lru_caches(model: nn.Module) -> list[Any]:
    """functools lru caches on the model's classes (methods, static methods, and the caches they wrap)."""
    found: dict[int, Any] = {}
    for cls in {type(m) for m in model.modules()}:
        caches = _CLASS_CACHES.get(cls)
        if caches is None:
            caches = _CLASS_CACHES[cls] = _class_caches(cls)
        for obj in caches:
            found[id(obj)] = obj
    return list(found.values())


_CLASS_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # class -> its caches, found once


def _class_caches(cls: type) -> tuple[Any, ...]:
    found: dict[int, Any] = {}
    for c in cls.__mro__:
        if c.__module__.startswith("torch.") or c is object:
            continue
        for f in vars(c).values():
            f = getattr(f, "__func__", f)
            cells = [cell.cell_contents for cell in (getattr(f, "__closure__", None) or ()) if _is_cell_set(cell)]
            for obj in (f, *cells):
                if callable(getattr(obj, "cache_clear", None)) and callable(getattr(obj, "cache_info", None)):
                    found[id(obj)] = obj
    return tuple(found.values())


def _is_cell_set(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _devices_of_copy(model: nn.Module) -> dict[str, torch.device]:
    return getattr(model, "_tritonprune_devices", None) or {}


def prepared_copy(model: nn.Module) -> nn.Module:
    """The copy `fake_forward` runs: a real one for a small CPU model (a copy of a real copy is real too),
    else `meta_copy(model)` remembering the devices of the model's tensors."""
    if _real_copy_fits(model):
        return real_copy(model)
    c = meta_copy(model)
    # a copy of a copy (the attribute check inside run_check) keeps the devices of the real model
    object.__setattr__(c, "_tritonprune_devices", _devices_of_copy(model) or _devices(model))
    c.__dict__.pop("_tritonprune_mode", None)
    return c


