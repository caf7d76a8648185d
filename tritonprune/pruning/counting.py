"""Parameter and multiply-accumulate (MAC) counts.

MACs are counted for the given example inputs (batch included) by running one forward pass of a
fake-tensor copy of the model (tritonprune.runcheck: no compute, the model's buffers, hooks and flags
are never touched) under a `TorchFunctionMode` that sees every conv, conv-transpose, linear, matmul-family, einsum and
scaled-dot-product-attention call, whether it comes from a module or from functional code. Each
count made against a weight is also attributed to that weight's parameter name: conv and linear MACs
scale with the weight's element count (spatial sizes fixed), which lets pruning estimate MACs after a
plan without slicing anything (`estimate_macs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..graph.trace import call_with


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, shared parameters counted once."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class MacCount:
    total: int = 0
    by_weight: dict[str, int] = field(default_factory=dict)  # parameter name -> MACs made with it

    @property
    def unattributed(self) -> int:
        """MACs between activations (attention scores, matmuls of two activations)."""
        return self.total - sum(self.by_weight.values())


def _numel(shape) -> int:
    return math.prod(shape)


def _conv_macs(out: torch.Tensor, weight: torch.Tensor) -> int:
    # every output element is a dot product over (in_channels / groups) * kernel elements
    return out.numel() * _numel(weight.shape[1:])


def _conv_t_macs(inp: torch.Tensor, weight: torch.Tensor) -> int:
    # every input element is scattered into (out_channels / groups) * kernel outputs
    return inp.numel() * _numel(weight.shape[1:])


def _matmul_macs(out: torch.Tensor, a: torch.Tensor) -> int:
    return out.numel() * (a.shape[-1] if a.dim() else 1)


def _einsum_macs(equation: str, operands) -> int:
    """Two-operand einsum: the product of the sizes of all distinct index letters."""
    if len(operands) != 2 or "..." in equation:
        return 0
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, t in zip(lhs, operands):
        for ch, n in zip(letters, t.shape):
            sizes[ch] = n
    return _numel(sizes.values())


_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_T = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.bmm,
    torch.Tensor.mm,
    torch.Tensor.bmm,
}
_ADDMM = {torch.addmm, torch.baddbmm, torch.Tensor.addmm, torch.Tensor.baddbmm}


class _MacCounter(TorchFunctionMode):
    def __init__(self, names: Mapping[int, str]):
        super().__init__()
        self.names = names
        self.count = MacCount()

    def _add(self, macs: int, weight: Any = None) -> None:
        self.count.total += int(macs)
        name = self.names.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if name is not None:
            self.count.by_weight[name] = self.count.by_weight.get(name, 0) + int(macs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # counting must never break a forward pass
            pass
        return out

    def _record(self, func, args, kwargs, out) -> None:
        if func in _CONV:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self._add(_conv_macs(out, w), w)
        elif func in _CONV_T:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self._add(_conv_t_macs(args[0], w), w)
        elif func is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self._add(_matmul_macs(out, args[0]), w)
        elif func in _MATMUL:
            a, b = args[0], args[1]
            self._add(_matmul_macs(out, a), b if id(b) in self.names else a)
        elif func in _ADDMM:
            a, b = args[1], args[2]
            self._add(_matmul_macs(out, a), b if id(b) in self.names else a)
        elif func is torch.einsum:
            ops = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else ())
            self._add(_einsum_macs(args[0], list(ops)))
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[0], args[1], args[2]
            batch = _numel(q.shape[:-2])
            L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
            self._add(batch * L * S * (E + Ev))
        elif func is F.multi_head_attention_forward:
            self._mha(args, kwargs)

    def _mha(self, args, kwargs) -> None:
        # nn.MultiheadAttention runs as one functional call; its inner linears are not seen separately
        q, k = args[0], args[1]
        L, E = q.shape[0], q.shape[-1]
        S = k.shape[0]
        batch = q.shape[1] if q.dim() == 3 else 1
        in_w = args[5] if len(args) > 5 else kwargs.get("in_proj_weight")
        out_w = args[11] if len(args) > 11 else kwargs.get("out_proj_weight")
        proj = batch * (L + 2 * S) * E * E
        self._add(proj, in_w)
        self._add(batch * L * E * E, out_w)
        self._add(2 * batch * L * S * E)


def _count_real(model: nn.Module, example_inputs: Any) -> MacCount:
    """The count from a real forward (eval, no_grad); training flags and buffers are restored."""
    from ..graph.trace import preserved

    names = {id(p): n for n, p in model.named_parameters()}
    counter = _MacCounter(names)
    with preserved(model), torch.no_grad(), counter:
        model.eval()
        call_with(model, example_inputs)
    return counter.count


def mac_counting():
    """(context, result) for `runcheck.fake_forward(..., context=context)`: count MACs during a fake
    forward that runs anyway (prune's run check); `result()` is the MacCount afterwards."""
    counters: list[_MacCounter] = []

    def context(fake_model: nn.Module) -> _MacCounter:
        counters.append(_MacCounter({id(p): n for n, p in fake_model.named_parameters()}))
        return counters[-1]

    return context, lambda: counters[-1].count


def count_macs(model: nn.Module, example_inputs: Any, *, real_fallback: bool = True) -> MacCount:
    """MACs of one forward pass on `example_inputs` in eval mode.

    The forward runs on a fake-tensor copy of the model: nothing is computed and the model itself
    (buffers, training flags, hooks) is not touched. Only if the model cannot run on fake tensors
    (data-dependent control flow) and `real_fallback` is true, a real forward is run under no_grad with
    training flags and buffers restored afterwards (forward hooks of the model then run)."""
    from .fake_run import RunFailure, fake_forward, prepared_copy

    counting, counted = mac_counting()
    got = fake_forward(prepared_copy(model), example_inputs, context=counting)
    if not isinstance(got, RunFailure):
        return counted()
    if not real_fallback:
        raise RuntimeError(f"could not count MACs on fake tensors: {got}")
    return _count_real(model, example_inputs)


def estimate_macs(count: MacCount, numel_before: Mapping[str, int], numel_after: Mapping[str, int]) -> int:
    """MACs after pruning, from a count taken before: weight-attributed MACs scale with the weight's size.

    MACs between two activations (attention scores) are kept as they were: an upper bound.
    """
    total = count.unattributed
    for name, macs in count.by_weight.items():
        before = numel_before.get(name)
        after = numel_after.get(name, before)
        total += macs if not before else round(macs * after / before)
    return total
