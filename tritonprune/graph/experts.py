"""Mixture-of-experts layers: each expert's intermediate channels, pruned per expert.

Hugging Face stores the experts of a sparse MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) as two 3-D
parameters of one `...Experts` module: `gate_up_proj [E, 2I, H]` (gate rows 0..I, up rows I..2I, the
forward splits them with `chunk(2)`) and `down_proj [E, H, I]`. The router picks experts per token, and
tokens are gathered and scattered by index (`topk`, `index`, a grouped matmul): no channel flows through
those ops, so the graph walk cannot couple anything there and leaves these tensors out. Inside an expert,
intermediate channel j is gate row j, up row I+j and down column j, and nothing else reads them: the
experts' channels form one group of E blocks (one per expert, each losing the same count, chosen per
expert) that this rule adds by the module's layout. Routers, the hidden size and the residual stream are
untouched (the residual stream of these layers goes through the untraceable routing and stays whole).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import group as g


def _experts_layout(m: nn.Module) -> tuple[int, int, int] | None:
    """(E, I, H) if `m` holds fused experts in the gate_up/down layout and nothing else, else None."""
    params = dict(m.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or list(m.children()) not in ([], [m.act_fn] if hasattr(m, "act_fn") else []):
        return None
    gu, down = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or down.dim() != 3:
        return None
    E, I2, H = gu.shape
    if I2 % 2 or tuple(down.shape) != (E, H, I2 // 2) or getattr(m, "num_experts", E) != E:
        return None
    if getattr(m, "is_transposed", False) or getattr(m, "has_bias", False) or not getattr(m, "is_concatenated", True):
        return None  # other layouts (gpt-oss style) are not this rule's
    return E, I2 // 2, H


def expert_groups(model: nn.Module, ignored: set[str], taken: set[str]) -> list[g.Group]:
    """One group per fused-experts module whose tensors no other group holds."""
    from .assemble import is_ignored

    out = []
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Experts") or is_ignored(name, ignored):
            continue
        layout = _experts_layout(m)
        if layout is None:
            continue
        experts, inter, _ = layout
        gu, down = f"{name}.gate_up_proj", f"{name}.down_proj"
        if gu in taken or down in taken or inter < 2 or not all(p.requires_grad for p in m.parameters()):
            continue
        size = experts * inter
        slots = tuple(
            g.Slot(name=t, module=name, kind=g.LINEAR, role=role, dim=dim, offset=0, length=size, start=start,
                   blocks=experts)
            for t, dim, role, start in ((gu, 1, g.OUT, 0), (gu, 1, g.OUT, inter), (down, 2, g.IN, 0))
        )
        out.append(g.Group(size=size, slots=slots, blocks=experts, origin=name, exact=True))
    return out


def expert_modules(model: nn.Module) -> list[str]:
    """Names of the fused-experts modules of `model`."""
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("Experts") and _experts_layout(m)]


def intermediate_updates(model: nn.Module, new_shapes: dict[str, torch.Size]) -> list[tuple[object, str, object]]:
    """`intermediate_dim` / `intermediate_size` of experts modules whose down_proj was cut; and where the new
    size leaves rows that are not 16-byte aligned, which torch's grouped matmul refuses, the eager experts
    implementation (same results, slower; keep the size a multiple of 8 to keep the grouped one)."""
    ups: list[tuple[object, str, object]] = []
    misaligned = []
    for name, m in model.named_modules():
        shape = new_shapes.get(f"{name}.down_proj")
        if shape is None or _experts_layout(m) is None:
            continue
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if isinstance(getattr(m, attr, None), int):
                ups.append((m, attr, int(shape[2])))
        if (int(shape[2]) * m.down_proj.element_size()) % 16:
            misaligned.append((name, int(shape[2])))
    config = getattr(model, "config", None)
    if misaligned and getattr(config, "_experts_implementation", None) not in (None, "eager"):
        warnings.warn(
            f"tritonprune: experts of {misaligned[0][0]} keep {misaligned[0][1]} channels, rows not 16-byte aligned "
            f"for torch's grouped matmul: the model now uses the eager experts implementation instead of "
            f"{config._experts_implementation!r} (prune to a multiple of 8 per expert to keep it)",
            stacklevel=4,
        )
        ups.append((config, "_experts_implementation", "eager"))
    return ups
