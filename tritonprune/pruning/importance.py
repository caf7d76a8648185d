"""Per-channel importance of a Group: the score pruning ranks channels by (lower goes first).

Semantics follow Torch-Pruning 1.6.1's `GroupMagnitudeImportance` with its defaults: each importance
Slot (Conv/ConvTranspose/Linear weights, out-rows and in-columns alike, and the affine weights of
BatchNorm and LayerNorm; biases only with `bias=True`) gives a per-channel score, the scores are
summed over the Slots and divided by the number of Slots that contributed ("mean" group reduction),
then divided by the group's mean (normalizer "mean"), its max ("max"), or left alone (None).
Per-Slot scores are computed on the Slot's `[G, A, C, B]` view (tritonprune.geometry) in fp32.

Known differences from Torch-Pruning (the regularizers make the same choices): depthwise conv weights
count (Torch-Pruning leaves them out, and raises on a depthwise conv with a multiplier); for the in-columns of a grouped conv the score of channel
j*C + p sums column p over the rows of conv group j only (Torch-Pruning sums it over all rows and
repeats it per group); Taylor importance includes BatchNorm weights (Torch-Pruning's check of the
BatchNorm case never matches); a group with no importance Slot falls back to all its parameter Slots
for magnitude and Taylor (Torch-Pruning skips it), and to None (not pruned) for "bn_scale".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..graph.geometry import slot_geometry, slot_view
from ..graph.group import BATCHNORM, CONV, CONV_T, LAYERNORM, LINEAR, Group, Slot

IMPORTANCE_KINDS = (CONV, CONV_T, LINEAR, BATCHNORM, LAYERNORM)
METHODS = ("l1", "l2", "bn_scale", "taylor", "random")
NORMALIZERS = ("mean", "max", None)

ImportanceFn = Callable[[Group], torch.Tensor]
Importance = str | ImportanceFn


def _view(tensor: torch.Tensor, slot: Slot) -> torch.Tensor:
    return slot_view(tensor, slot_geometry(tensor, slot))


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    """[G, A, C, B] -> [G * C]: a per-channel sum, in the group's channel order."""
    return values.sum(dim=(1, 3)).reshape(-1)


def _importance_slots(group: Group, tensors: Mapping[str, torch.Tensor], kinds, bias: bool) -> list[Slot]:
    return [
        s
        for s in group.slots
        if s.kind in kinds and not s.is_buffer and (bias or not s.is_bias) and s.name in tensors
    ]


def _reduce(group: Group, scores: Sequence[tuple[Slot, torch.Tensor]]) -> torch.Tensor | None:
    """Mean over the contributing Slots (a Slot covering part of the group still counts once)."""
    if not scores:
        return None
    total = torch.zeros(group.size, dtype=torch.float32, device=scores[0][1].device)
    for slot, s in scores:
        total[slot.offset : slot.offset + slot.length] += s
    return total / len(scores)


def normalize(imp: torch.Tensor, normalizer: str | None | Callable) -> torch.Tensor:
    if normalizer is None:
        return imp
    if callable(normalizer):
        return normalizer(imp)
    if normalizer == "mean":
        d = imp.mean()
    elif normalizer == "max":
        d = imp.max()
    else:
        raise ValueError(f"importance normalizer {normalizer!r} is not one of {NORMALIZERS}")
    # Torch-Pruning divides by zero here (NaN); an all-zero group stays all zero
    return imp / d if d != 0 and torch.isfinite(d) else imp


def magnitude(
    group: Group, tensors: Mapping[str, torch.Tensor], p: int = 2, normalizer="mean", bias: bool = False
) -> torch.Tensor | None:
    """Group Lp magnitude: mean over Slots of sum |w|^p over each channel's elements, normalized."""
    slots = _importance_slots(group, tensors, IMPORTANCE_KINDS, bias) or _importance_slots(
        group, tensors, {s.kind for s in group.slots}, True
    )
    scores = []
    for s in slots:
        v = _view(tensors[s.name].detach(), s).float()
        scores.append((s, _per_channel(v.square() if p == 2 else v.abs() if p == 1 else v.abs().pow(p))))
    imp = _reduce(group, scores)
    return None if imp is None else normalize(imp, normalizer)


def bn_scale(group: Group, tensors: Mapping[str, torch.Tensor], normalizer="mean") -> torch.Tensor | None:
    """Network Slimming: mean |gamma| over the group's BatchNorm weights; None without BatchNorm."""
    slots = [
        s
        for s in group.slots
        if s.kind == BATCHNORM and not s.is_bias and not s.is_buffer and s.name in tensors
    ]
    scores = [(s, _per_channel(_view(tensors[s.name].detach(), s).float().abs())) for s in slots]
    imp = _reduce(group, scores)
    return None if imp is None else normalize(imp, normalizer)


def taylor(
    group: Group, tensors: Mapping[str, torch.Tensor], normalizer="mean", bias: bool = False
) -> torch.Tensor | None:
    """First-order Taylor: mean over Slots of sum |w * dL/dw| over each channel's elements."""
    slots = _importance_slots(group, tensors, IMPORTANCE_KINDS, bias) or _importance_slots(
        group, tensors, {s.kind for s in group.slots}, True
    )
    scores = []
    for s in slots:
        t = tensors[s.name]
        w, g = t.detach(), t.grad
        if g is None:
            continue
        if g.stride() != w.stride():  # views must walk both tensors in the same element order
            g = torch.empty_like(w).copy_(g)
        prod = (_view(w, s).float() * _view(g, s).float()).abs()
        scores.append((s, _per_channel(prod)))
    if slots and not scores:
        raise ValueError(
            f"taylor importance: no gradient on {slots[0].name} (group {group.origin!r}); "
            "run loss.backward() before pruning"
        )
    imp = _reduce(group, scores)
    return None if imp is None else normalize(imp, normalizer)


def _from_callable(fn: Callable, g: Group) -> torch.Tensor:
    """The score vector a user's importance callable returned for `g`, or ValueError naming the callable."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    imp = fn(g)
    if isinstance(imp, torch.Tensor):
        if imp.device.type == "meta":
            raise ValueError(f"importance callable {name} returned a meta tensor for group {g.origin!r} (no values); "
                             f"return real scores of shape ({g.size},)")
        if not (imp.dtype.is_floating_point or imp.dtype in (torch.int32, torch.int64, torch.int16, torch.int8,
                                                             torch.uint8)):
            raise ValueError(f"importance callable {name} returned a {imp.dtype} tensor for group {g.origin!r}; "
                             "return real-valued scores")
        return imp.detach().float().cpu()
    if imp is None or isinstance(imp, (str, bytes, bool)):
        raise ValueError(f"importance callable {name} returned {imp!r} for group {g.origin!r}; it must return a "
                         f"tensor (or sequence of numbers) of shape ({g.size},)")
    try:
        return torch.as_tensor(imp, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"importance callable {name} returned a {type(imp).__name__} for group {g.origin!r} that is "
                         f"not a vector of numbers ({e}); return a tensor of shape ({g.size},)") from None


def compute_importance(
    model: nn.Module,
    groups: Sequence[Group],
    importance: Importance = "l2",
    normalizer: str | None | Callable = "mean",
    bias: bool = False,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor | None]:
    """One fp32 score vector of length `group.size` per group (None: the group cannot be scored)."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    for n, b in model.named_buffers():
        tensors.setdefault(n, b)
    out: list[torch.Tensor | None] = []
    with torch.no_grad():
        for g in groups:
            if callable(importance):
                imp = _from_callable(importance, g)
                if imp.shape != (g.size,):
                    raise ValueError(
                        f"importance callable returned shape {tuple(imp.shape)} for group {g.origin!r}; "
                        f"it must return a tensor of shape ({g.size},)"
                    )
            elif importance in ("l1", "l2"):
                imp = magnitude(
                    g, tensors, p=1 if importance == "l1" else 2, normalizer=normalizer, bias=bias
                )
            elif importance == "bn_scale":
                imp = bn_scale(g, tensors, normalizer=normalizer)
            elif importance == "taylor":
                imp = taylor(g, tensors, normalizer=normalizer, bias=bias)
            elif importance == "random":
                imp = torch.rand(g.size, generator=generator)
            else:
                raise ValueError(
                    f"importance {importance!r} is not one of {METHODS} or a callable group -> tensor"
                )
            if imp is not None:
                imp = imp.detach().float().cpu()
                if not torch.isfinite(imp).all():
                    raise ValueError(
                        f"importance of group {g.origin!r} is not finite; check the model's weights"
                    )
            out.append(imp)
    return out
