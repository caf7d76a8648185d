"""GrowingReg's per-channel coefficients: choose the channels to remove from the current group norms
(the same rules as tpr.prune, graph/allocation.py) and grow the coefficient of the chosen ones only.

The result is an ordinary per-channel coefficient vector: every backend applies it with its
`add_scaled_` kernel (`t += c * w` on every update slot of the channel), as it does GroupNorm's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..graph.allocation import kind_key, select
from ..graph.group import Group
from .regularizers import GrowingReg


def chosen_mask(reg: GrowingReg, groups: Sequence[Group], offsets: Sequence[int], sums: torch.Tensor,
                shapes: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """bool [n_channels]: the channels the target removes, ranked by their squared group norms
    normalized by the group mean (the ranking of prune's default L2 importance)."""
    s = sums.detach().double().cpu()
    imps = []
    for g, a in zip(groups, offsets):
        x = s[a : a + g.size]
        m = x.mean() if g.size else x.new_zeros(())
        imps.append(x / m if m > 0 and torch.isfinite(m) else x)
    kinds = [kind_key(g, shapes) for g in groups] if reg.allocation == "isomorphic" else None
    removed = select(groups, imps, reg.ratio, kinds=kinds, kind_ratios=reg.kind_ratios)
    mask = torch.zeros(len(s), dtype=torch.bool)
    for rem, a in zip(removed, offsets):
        if rem:
            mask[torch.tensor(rem, dtype=torch.long) + a] = True
    return mask


def growing_coef(reg: GrowingReg, groups: Sequence[Group], offsets: Sequence[int], sums: torch.Tensor,
                 previous: torch.Tensor | None, shapes: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """float32 [n_channels] on the sums' device: previous + delta (capped at reg_max) on the chosen
    channels, 0 elsewhere (a channel no longer chosen starts again from 0 if chosen later)."""
    mask = chosen_mask(reg, groups, offsets, sums, shapes)
    prev = torch.zeros(len(mask), dtype=torch.float64) if previous is None else previous.detach().double().cpu()
    coef = torch.where(mask, (prev + reg.delta).clamp(max=reg.reg_max), torch.zeros_like(prev))
    return coef.to(torch.float32).to(sums.device)
