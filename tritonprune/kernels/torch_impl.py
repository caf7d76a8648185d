"""The vectorised PyTorch backend: strided views of every slot, a constant number of ops per slot.

Per step there is no Python loop over channels and no host sync: index tensors, coefficient buffers and
the weight views are built once per structure (GroupBuffers.cache) and reused; per-group max/min are
segment reductions over `channel_group`.

A slot's channels are one contiguous range of the flat channel space, so per-slot sums land with one
`index_add_`. Two shapes of slot get different treatment because CPU reductions and broadcasts are fast
only along the innermost dims:
- rows (A == 1: out-rows, norm weights): `[G, C, B]`, reduce/broadcast along B;
- columns (A > 1: in-columns): `[G, A, C*B]`, reduce over A first, and update with a coefficient vector
  expanded to `[G, 1, C*B]`, so the inner loop runs over C*B contiguous elements.
"""

from __future__ import annotations

import torch

from ..geometry import slot_geometry, slot_view
from ..layout import FLAG_IMPORTANCE, FLAG_UPDATE, GroupBuffers

_F32 = torch.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, _F32)


class _Plan:
    """Per-structure state of one GroupBuffers: slot lists, index tensors, coefficient buffers."""

    def __init__(self, bufs: GroupBuffers):
        dev = bufs.device
        self.imp: list[int] = []
        self.rows: list[int] = []  # update slots with A == 1
        self.cols: list[int] = []  # update slots with A > 1
        imp_idx, row_idx, col_idx, row_sid, col_sid = [], [], [], [], []
        self.row_off: dict[int, int] = {}
        self.col_off: dict[int, int] = {}
        n_upd: dict[int, int] = {}
        chans = bufs.chans
        for k, ((_, _, p), geo, flags) in enumerate(zip(bufs.entries, bufs.geometries, bufs.flags)):
            if geo.numel == 0:
                continue
            chan, n = chans[k], geo.G * geo.C
            if flags & FLAG_IMPORTANCE:
                self.imp.append(k)
                imp_idx.append(torch.arange(chan, chan + n))
            if flags & FLAG_UPDATE:
                n_upd[id(p)] = n_upd.get(id(p), 0) + 1
                if geo.A == 1:
                    self.rows.append(k)
                    self.row_off[k] = sum(len(t) for t in row_idx)
                    row_idx.append(torch.arange(chan, chan + n))
                    row_sid.append(torch.full((n,), k))
                else:
                    self.cols.append(k)
                    self.col_off[k] = sum(len(t) for t in col_idx)
                    col_idx.append(torch.arange(chan, chan + n).repeat_interleave(geo.B))
                    col_sid.append(torch.full((n * geo.B,), k))

        def cat(xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(xs).to(dev) if xs else torch.zeros(0, dtype=torch.int64, device=dev)

        self.imp_idx = cat(imp_idx)
        self.row_idx, self.row_sid = cat(row_idx), cat(row_sid)
        self.col_idx, self.col_sid = cat(col_idx), cat(col_sid)
        self.row_coef = torch.zeros(len(self.row_idx), dtype=_F32, device=dev)
        self.col_coef = torch.zeros(len(self.col_idx), dtype=_F32, device=dev)
        # weights written by several update slots: with target="param" they are read from a snapshot
        self.shared = {pid for pid, c in n_upd.items() if c > 1}
        self.coef_views: dict[int, torch.Tensor] = {}
        for k in self.rows:
            geo = bufs.geometries[k]
            n = geo.G * geo.C
            self.coef_views[k] = self.row_coef.narrow(0, self.row_off[k], n).view(geo.G, geo.C, 1)
        for k in self.cols:
            geo = bufs.geometries[k]
            n = geo.G * geo.C * geo.B
            self.coef_views[k] = self.col_coef.narrow(0, self.col_off[k], n).view(geo.G, 1, geo.C * geo.B)
        self.views_version = -1
        self.wviews: dict[int, torch.Tensor] = {}


def _plan(bufs: GroupBuffers) -> _Plan:
    plan = bufs.cache.get("torch")
    if plan is None:
        plan = bufs.cache["torch"] = _Plan(bufs)
    if plan.views_version != bufs.version:
        # weight views depend only on the parameters' storage; rebuilding them is cheap anyway
        plan.wviews = {k: _view(p.detach(), bufs.geometries[k], k, plan) for k, (_, _, p) in enumerate(bufs.entries)
                       if k in plan.coef_views or k in plan.imp}
        plan.views_version = bufs.version
    return plan


def _view(t: torch.Tensor, geo, k: int, plan: _Plan) -> torch.Tensor:
    """Rows as [G, C, B]; columns as [G, A, C*B] (importance-only slots: rows if A == 1 else columns)."""
    if geo.A == 1:
        return t.as_strided((geo.G, geo.C, geo.B), (geo.stride_g, geo.stride_c, 1), t.storage_offset() + geo.offset)
    return t.as_strided((geo.G, geo.A, geo.C * geo.B), (geo.stride_g, geo.stride_a, 1),
                        t.storage_offset() + geo.offset)


def _other_layout(bufs: GroupBuffers, k: int, t: torch.Tensor, w: torch.Tensor):
    """`[G, A, C, B]` views of a target laid out differently from its parameter (a .grad with other
    strides) and of the weight copied into that layout, so both views index the same elements."""
    slot = bufs.entries[k][1]
    geo = slot_geometry(t, slot)
    w_same = torch.empty_like(t).copy_(w)
    return slot_view(t, geo), slot_view(w_same, geo), geo


# ------------------------------------------------------------------------------------------ importance


def channel_sq_sums(bufs: GroupBuffers) -> torch.Tensor:
    """Sum of w**2 per flat channel over the importance slots; returns bufs.acc (overwritten next call)."""
    plan = _plan(bufs)
    parts = []
    for k in plan.imp:
        v = plan.wviews[k]
        acc = _acc_dtype(v.dtype)
        if bufs.geometries[k].A == 1:  # [G, C, B]: inner reduction
            s = torch.linalg.vector_norm(v, dim=2, dtype=acc if acc != v.dtype else None).square_()
        else:  # [G, A, C*B]: reduce over A (outer, vectorised), then over B
            geo = bufs.geometries[k]
            s = v.to(acc).square().sum(1)
            if geo.B > 1:
                s = s.view(geo.G, geo.C, geo.B).sum(2)
        parts.append(s.reshape(-1).to(_F32))
    acc = bufs.acc.zero_()
    if parts:
        acc.index_add_(0, plan.imp_idx, torch.cat(parts))
    return acc


def group_norm_coef(bufs: GroupBuffers, sums: torch.Tensor, reg: float, alpha: float) -> torch.Tensor:
    """reg * gamma per flat channel (see kernels/__init__.py)."""
    cg = bufs.channel_group
    n = sums.to(_F32).sqrt()
    ng = bufs.n_groups
    nmax = torch.full((ng,), -float("inf"), dtype=_F32, device=n.device).scatter_reduce_(0, cg, n, "amax")
    nmin = torch.full((ng,), float("inf"), dtype=_F32, device=n.device).scatter_reduce_(0, cg, n, "amin")
    d = nmax - nmin
    ok = (d > 0) & torch.isfinite(d)
    dc, mc = d.index_select(0, cg), nmax.index_select(0, cg)
    gamma = torch.exp2((mc - n) / torch.where(ok.index_select(0, cg), dc, 1.0) * float(alpha))
    return torch.where(ok.index_select(0, cg), gamma, 1.0).mul_(float(reg))


def group_lasso_coef(bufs: GroupBuffers, sums_bn: torch.Tensor, reg: float) -> torch.Tensor:
    """reg / sqrt(mean over BatchNorm slots of w**2 + 1e-9) per flat channel; 0 where no BatchNorm slot."""
    cnt = bufs.n_importance_slots_bn
    q = sums_bn.to(_F32) / cnt.clamp(min=1.0)
    return torch.where(cnt > 0, float(reg) * torch.rsqrt(q + 1e-9), 0.0)


# -------------------------------------------------------------------------------------------- updates


def _snapshots(bufs: GroupBuffers, plan: _Plan, target: str, ks: list[int]) -> dict[int, torch.Tensor]:
    """With target="param", weights written by several slots are read from a copy taken first."""
    if target != "param" or not plan.shared:
        return {}
    snap: dict[int, torch.Tensor] = {}
    for k in ks:
        p = bufs.entries[k][2]
        if id(p) in plan.shared and id(p) not in snap and p.grad is not None:
            snap[id(p)] = p.detach().clone()
    return snap


def _target(p: torch.Tensor, target: str) -> torch.Tensor:
    if target == "grad":
        return p.grad
    if target == "param":
        return p.detach()
    raise ValueError(f"tritonprune.kernels.torch: target must be 'grad' or 'param', got {target!r}")


def add_scaled_(bufs: GroupBuffers, coef: torch.Tensor, *, target: str = "grad",
                slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * coef[c] * w on the update slots."""
    plan = _plan(bufs)
    coef = coef.to(_F32)
    torch.index_select(coef, 0, plan.row_idx, out=plan.row_coef)
    torch.index_select(coef, 0, plan.col_idx, out=plan.col_coef)
    if slot_scale is not None:
        slot_scale = slot_scale.to(device=coef.device, dtype=_F32)
        plan.row_coef.mul_(slot_scale.index_select(0, plan.row_sid))
        plan.col_coef.mul_(slot_scale.index_select(0, plan.col_sid))
    ks = plan.rows + plan.cols
    snap = _snapshots(bufs, plan, target, ks)
    for k in ks:
        p = bufs.entries[k][2]
        if p.grad is None:
            continue
        t = _target(p, target)
        if t.stride() != p.stride():
            tv, wv, geo = _other_layout(bufs, k, t, snap.get(id(p), p.detach()))
            c = coef.narrow(0, bufs.chans[k], geo.G * geo.C).view(geo.G, 1, geo.C, 1)
            tv.addcmul_(wv, c if slot_scale is None else c * slot_scale[k])
            continue
        w = plan.wviews[k] if id(p) not in snap else _view(snap[id(p)], bufs.geometries[k], k, plan)
        _view(t, bufs.geometries[k], k, plan).addcmul_(w, plan.coef_views[k])


def add_sign_(bufs: GroupBuffers, reg: float, *, target: str = "grad",
              slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * reg * sign(w) on the update slots."""
    plan = _plan(bufs)
    ks = plan.rows + plan.cols
    snap = _snapshots(bufs, plan, target, ks)
    if slot_scale is not None:
        slot_scale = slot_scale.to(_F32) * float(reg)
    for k in ks:
        p = bufs.entries[k][2]
        if p.grad is None:
            continue
        t = _target(p, target)
        if t.stride() != p.stride():
            t, w, _ = _other_layout(bufs, k, t, snap.get(id(p), p.detach()))
        else:
            w = plan.wviews[k] if id(p) not in snap else _view(snap[id(p)], bufs.geometries[k], k, plan)
            t = _view(t, bufs.geometries[k], k, plan)
        if slot_scale is None:
            t.add_(torch.sign(w).to(_F32), alpha=float(reg))
        else:
            t.addcmul_(torch.sign(w), slot_scale.narrow(0, k, 1))
