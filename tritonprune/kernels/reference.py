"""The reference backend: a plain loop over groups, slots and channels with logical indexing.

It is the oracle the other backends are tested against, so it does not use geometry.py: every channel
is addressed through the Slot's index map as documented in tritonprune.graph.group. Slow; for tests.
"""

from __future__ import annotations

import torch

from ..graph.group import Slot
from . import FLAT_SPREAD_RTOL
from .layout import FLAG_IMPORTANCE, FLAG_UPDATE, GroupBuffers

# views of .grad are taken per call: no pointer table to keep current
USES_POINTER_TABLE = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def channel_elements(t: torch.Tensor, slot: Slot, i: int) -> torch.Tensor:
    """A view of the elements of `t` that channel `slot.offset + i` of the group owns."""
    if slot.blocks == 1:
        return t.narrow(slot.dim, slot.start + i * slot.repeat, slot.repeat)
    # grouped-conv in-columns: channel j*per_block + p owns column start+p of the rows of conv group j
    per_block = slot.length // slot.blocks
    j, p = divmod(i, per_block)
    rows = t.shape[0] // slot.blocks
    return t.narrow(0, j * rows, rows).narrow(slot.dim, slot.start + p, 1)


def _first_channel(bufs: GroupBuffers, group_index: int, slot: Slot) -> int:
    return int(bufs.group_offsets[group_index]) + slot.offset


def channel_sq_sums(bufs: GroupBuffers) -> torch.Tensor:
    sums = torch.zeros(bufs.n_channels, dtype=torch.float64)
    for (gi, slot, p), flags in zip(bufs.entries, bufs.flags):
        if not flags & FLAG_IMPORTANCE:
            continue
        first = _first_channel(bufs, gi, slot)
        w = p.detach()
        for i in range(slot.length):
            x = channel_elements(w, slot, i).to(_acc_dtype(w.dtype))
            sums[first + i] += (x * x).sum().double()
    return sums.to(torch.float32).to(bufs.device)


def group_norm_coef(bufs: GroupBuffers, sums: torch.Tensor, reg: float, alpha: float) -> torch.Tensor:
    coef = torch.zeros(bufs.n_channels, dtype=torch.float64)
    start = 0
    for size in bufs.group_sizes:
        n = sums[start : start + size].double().cpu().sqrt()
        gamma = torch.ones(size, dtype=torch.float64)
        if size > 1:
            n_max = n.max()
            spread = n_max - n.min()
            # flat unless the spread is finite and above FLAT_SPREAD_RTOL * n_max (NaN compares False)
            if bool(spread > FLAT_SPREAD_RTOL * n_max) and torch.isfinite(spread):
                gamma = 2.0 ** (alpha * (n_max - n) / spread)
        coef[start : start + size] = reg * gamma
        start += size
    return coef.to(torch.float32).to(bufs.device)


def group_lasso_coef(bufs: GroupBuffers, sums_bn: torch.Tensor, reg: float) -> torch.Tensor:
    coef = torch.zeros(bufs.n_channels, dtype=torch.float64)
    counts = bufs.n_importance_slots_bn.cpu()
    sums = sums_bn.double().cpu()
    for c in range(bufs.n_channels):
        if counts[c] > 0:
            mean_sq = sums[c] / counts[c]
            coef[c] = reg / torch.sqrt(mean_sq + 1e-9)
    return coef.to(torch.float32).to(bufs.device)


def _apply(bufs: GroupBuffers, term, target: str, slot_scale: torch.Tensor | None) -> None:
    """out[channel c of slot k] += term(k, c, w_c) for every update slot whose parameter has a .grad."""
    if target not in ("grad", "param"):
        raise ValueError(f"tritonprune.kernels.reference: target must be 'grad' or 'param', got {target!r}")
    # every term is computed from the weights as they were before the call
    before = {id(p): p.detach().clone() for _, _, p in bufs.entries}
    for k, ((gi, slot, p), flags) in enumerate(zip(bufs.entries, bufs.flags)):
        if not flags & FLAG_UPDATE or p.grad is None:
            continue
        out = p.grad if target == "grad" else p.detach()
        acc = _acc_dtype(out.dtype)
        scale = None if slot_scale is None else slot_scale[k].float().cpu()
        first = _first_channel(bufs, gi, slot)
        for i in range(slot.length):
            w = channel_elements(before[id(p)], slot, i).to(acc)
            o = channel_elements(out, slot, i)
            o.copy_(o.to(acc) + term(scale, first + i, w).to(acc))


def add_scaled_(bufs: GroupBuffers, coef: torch.Tensor, *, target: str = "grad",
                slot_scale: torch.Tensor | None = None) -> None:
    coef = coef.float().cpu()

    def term(scale, c, w):
        k = coef[c] if scale is None else scale * coef[c]  # float32, as the other backends
        return k.to(w.dtype) * w

    _apply(bufs, term, target, slot_scale)


def add_sign_(bufs: GroupBuffers, reg: float, *, target: str = "grad",
              slot_scale: torch.Tensor | None = None) -> None:
    def term(scale, c, w):
        k = torch.tensor(float(reg), dtype=torch.float32) if scale is None else scale * float(reg)
        return k.to(w.dtype) * torch.sign(w)

    _apply(bufs, term, target, slot_scale)
