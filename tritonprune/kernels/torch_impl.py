"""The vectorised PyTorch backend: per-parameter work planned once per structure, a constant number of ops.

A conv/linear weight usually sits in two slots (its out-rows in one group, its in-columns in another),
so working per slot reads it twice for the sums of squares and updates it twice. This backend works per
PARAMETER instead (the "matrix" path): the weight is seen in its matrix form `M = [G, R, J]` with a
row and a column map to flat channels (`kernels/matrix_form.py`, shared with the Triton backend), and

- one read of w gives both row and column sums of squares (the squared temporary is a scratch block,
  row chunks of at most CHUNK_ELEMS elements so it stays in cache), scattered into the flat channel
  sums with one `index_add_` for the whole model;
- one pass updates it: `t += coef_rows[:, None] * w`, then `t += coef_cols[None, :] * w` on the same
  row chunk while it is in cache (for the gradient; a sign or in-place target gets the coefficient
  block `coef_rows + coef_cols` built per row chunk in the same scratch).

That is 4-5 ops per weight (square, two sums; two broadcast addcmul_) where the per-slot form needed
about 7 and read the weight 4 times. On the CPU, float32/float64/bfloat16/float16 weights go instead through the C
loops of `cpu_native` (one read of w for both sums, one pass for the update; half types computed in
float32 and rounded once on store) where they build; these torch ops are the fallback and the path for
other devices and dtypes.

1-D parameters (norm weights, biases; O rows of one column) are batched with `torch._foreach_*` ops.
Parameters with no matrix form (`Unsupported`: slots on two non-leading dims, overlapping slots, no dense
layout, ...) take the per-slot path (`_SlotPath`): strided views of each slot, as the reference computes
them.

Everything indexable (maps, views, chunk lists, scratch) is built once per structure and cached in
`bufs.cache["torch"]`; a step has no Python loop over channels and no host sync.
"""

from __future__ import annotations

import math

import torch

from .._gc import fewer_collections
from ..graph.geometry import slot_geometry, slot_view
from . import FLAT_SPREAD_RTOL, cpu_native
from .layout import FLAG_IMPORTANCE, FLAG_UPDATE, GroupBuffers
from .matrix_form import Unsupported, matrix_form

# views of .grad are taken per call: no pointer table to keep current
USES_POINTER_TABLE = False

_F32 = torch.float32

# elements per row chunk of the matrix path: the squared / coefficient block of a chunk stays in cache
# (only the largest weights are split: more, smaller ops cost more than they save on 2 busy cores)
CHUNK_ELEMS = 1 << 20
# False sends every parameter through the per-slot path (tests keep both paths checked)
MATRIX_PATH = True
# False keeps the matrix path on torch ops even where the C loops of cpu_native are available
NATIVE = True


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, _F32)


def _target(p: torch.Tensor, target: str) -> torch.Tensor:
    if target == "grad":
        return p.grad
    if target == "param":
        return p.detach()
    raise ValueError(f"tritonprune.kernels.torch: target must be 'grad' or 'param', got {target!r}")


# ----------------------------------------------------------------------------------- matrix path plan


class _Matrix:
    """One parameter of dim >= 1 on the matrix path: its matrix form (`matrix_form.py`), chunk plans."""

    def __init__(self, p: torch.nn.Parameter, slots: list, bufs: GroupBuffers):
        form = matrix_form(p, slots, bufs)
        self.p, self.order, self.G = p, form.order, form.G
        self.O, self.R, self.J = form.n_rows, form.R, form.J
        self.dtype, self.acc = p.dtype, _acc_dtype(p.dtype)
        # rows then columns, each present only where the parameter has slots on that side
        maps = [m for m in (form.rows, form.cols) if m is not None]
        self.has_rows, self.has_cols = form.rows is not None, form.cols is not None
        self.map_imp = torch.cat([m.imp for m in maps])
        self.map_upd = torch.cat([m.upd for m in maps])
        self.map_sid = torch.cat([m.sid for m in maps])
        self.need_rows = self.has_rows and bool((form.rows.imp >= 0).any())
        self.need_cols = self.has_cols and bool((form.cols.imp >= 0).any())
        self.upd_rows = self.has_rows and bool((form.rows.upd >= 0).any())
        self.upd_cols = self.has_cols and bool((form.cols.upd >= 0).any())
        self.updates = self.upd_rows or self.upd_cols
        self.length = len(self.map_imp)
        G = self.G
        # chunk plan (G == 1 only: grouped convs are small, they are done in one block)
        self.rpc = self.R if G > 1 else max(1, min(self.R, CHUNK_ELEMS // max(self.J, 1)))
        self.n_chunks = math.ceil(self.R / self.rpc)
        self.scratch_elems = self.G * self.rpc * self.J
        self.w_ptr = -1
        self.identity = form.identity
        self.mshape = (self.R, self.J) if G == 1 else (G, self.R, self.J)

    def bind(self, offset: int, parts: torch.Tensor, gathered: torch.Tensor, scratch: dict,
             colpart: dict) -> None:
        """Static views into the plan's flat buffers (called once the offsets are known)."""
        G, R, J = self.G, self.R, self.J
        self.mshape = (R, J) if G == 1 else (G, R, J)
        o = offset
        self.rows_dst = self.cols_dst = self.rowc = self.colc = None
        if self.has_rows:
            self.rows_dst = parts.narrow(0, o, self.O)
            self.rowc = gathered.narrow(0, o, self.O).view(self.mshape[:-1] + (1,))
            o += self.O
        if self.has_cols:
            self.cols_dst = parts.narrow(0, o, G * J)
            self.colc = gathered.narrow(0, o, G * J).view((1, J) if G == 1 else (G, 1, J))
        # sums of a float64 weight accumulate in float64, then land in the float32 parts
        self.wide = self.acc != _F32
        dev = parts.device
        if self.wide:
            self.rows_acc = None if self.rows_dst is None else torch.empty(self.O, dtype=self.acc, device=dev)
            self.cols_acc = None if self.cols_dst is None else torch.empty(G * J, dtype=self.acc, device=dev)
        else:
            self.rows_acc, self.cols_acc = self.rows_dst, self.cols_dst
        self.sq = scratch[self.acc].narrow(0, 0, self.scratch_elems)
        self.cbuf = scratch[_F32].narrow(0, 0, self.scratch_elems)
        self.colpart = colpart[self.acc]

    def refresh_weight(self) -> None:
        """Weight views and chunk lists; rebuilt only when the parameter's storage moved."""
        self.w_ptr = self.p.data_ptr()
        w = self.p.detach()
        try:
            self.wm = (w if self.identity else w.permute(self.order)).view(self.mshape)
        except RuntimeError:  # pragma: no cover - the build checked the layout
            raise RuntimeError(f"tritonprune.kernels.torch: a parameter of shape {tuple(w.shape)} changed layout; "
                               "rebuild the buffers") from None
        G, J, rpc = self.G, self.J, self.rpc
        rows_acc = None if self.rows_acc is None else self.rows_acc.view(self.mshape[:-1])
        cols_acc = None if self.cols_acc is None else self.cols_acc.view((J,) if G == 1 else (G, J))
        if self.n_chunks == 1:  # sums of squares / coefficient block over the whole matrix
            self.sum_chunks = [(self.wm, self.sq.view(self.mshape), rows_acc, cols_acc)]
            self.upd_chunks = [(self.wm, self.rowc, self.cbuf.view(self.mshape))]
            self.colpart_view = None
            return
        cp = self.colpart.narrow(0, 0, self.n_chunks * J).view(self.n_chunks, J)
        self.colpart_view = cp
        self.sum_chunks, self.upd_chunks = [], []
        for i, wc in enumerate(self.wm.split(rpc)):
            n = wc.shape[0]
            sq = self.sq.narrow(0, 0, n * J).view(n, J)
            self.sum_chunks.append((wc, sq, None if rows_acc is None else rows_acc.narrow(0, i * rpc, n), cp[i]))
            rc = None if self.rowc is None else self.rowc.narrow(0, i * rpc, n)
            self.upd_chunks.append((wc, rc, self.cbuf.narrow(0, 0, n * J).view(n, J)))

    # ---------------------------------------------------------------------------------------- sums

    def sq_sums(self) -> None:
        need_r, need_c = self.need_rows, self.need_cols
        if not (need_r or need_c):
            return
        if self.p.data_ptr() != self.w_ptr:
            self.refresh_weight()
        same = self.dtype == self.acc
        red_r, red_c = len(self.mshape) - 1, len(self.mshape) - 2  # reduce over columns / over rows
        if need_r and not need_c:  # one fused pass
            n = torch.linalg.vector_norm(self.wm, dim=red_r, dtype=None if same else self.acc)
            torch.mul(n, n, out=self.sum_chunks[0][2] if self.n_chunks == 1 else self.rows_acc.view(n.shape))
        else:
            for wc, sq, rdst, cdst in self.sum_chunks:
                if same:
                    torch.mul(wc, wc, out=sq)
                else:
                    sq.copy_(wc)
                    sq.mul_(sq)
                if need_r:
                    torch.sum(sq, red_r, out=rdst)
                torch.sum(sq, red_c, out=cdst)
            if self.colpart_view is not None:
                torch.sum(self.colpart_view, 0, out=self.cols_acc)
        self.land_wide_sums()

    def land_wide_sums(self) -> None:
        """Sums of a float64 weight accumulate in float64 buffers; they land in the float32 parts here."""
        if self.wide:
            if self.need_rows:
                self.rows_dst.copy_(self.rows_acc)
            if self.need_cols:
                self.cols_dst.copy_(self.cols_acc)

    # -------------------------------------------------------------------------------------- update

    def update(self, target: str, sign: bool) -> None:
        """t += (coef_rows + coef_cols) * f(w), f = identity or sign; the coefficients are in `gathered`.

        Views of the target are made per call, never cached: holding them would keep a .grad that
        zero_grad(set_to_none=True) released alive through the next backward."""
        g = self.p.grad
        if g is None or not self.updates:
            return
        if self.p.data_ptr() != self.w_ptr:
            self.refresh_weight()
        if target == "grad":
            try:
                tm = (g if self.identity else g.permute(self.order)).view(self.mshape)
            except RuntimeError:  # a .grad laid out unlike its parameter: a logical-shape coefficient
                self._update_other_layout(g, sign)
                return
        else:
            tm = self.wm
        if not (self.upd_rows and self.upd_cols):
            c = self.rowc if self.upd_rows else self.colc
            tm.addcmul_(torch.sign(self.wm) if sign else self.wm, c)
            return
        colc = self.colc
        if target == "grad" and not sign:
            # two broadcast passes beat materialising the (rows + cols) block: no temporary, and
            # torch's broadcast addcmul kernel is cheap (2x faster on the ResNet-50 weights)
            for (wc, rc, _), tc in zip(self.upd_chunks, tm.split(self.rpc) if self.n_chunks > 1 else [tm]):
                tc.addcmul_(wc, rc)
                tc.addcmul_(wc, colc)
            return
        if self.n_chunks == 1:
            wc, rc, cb = self.upd_chunks[0]
            torch.add(rc, colc, out=cb)
            tm.addcmul_(torch.sign(wc) if sign else wc, cb)
            return
        for (wc, rc, cb), tc in zip(self.upd_chunks, tm.split(self.rpc)):
            torch.add(rc, colc, out=cb)
            tc.addcmul_(torch.sign(wc) if sign else wc, cb)

    def _update_other_layout(self, t: torch.Tensor, sign: bool) -> None:
        rowc = self.rowc if self.upd_rows else torch.zeros((), device=t.device)
        colc = self.colc if self.upd_cols else torch.zeros((), device=t.device)
        c = (rowc + colc).expand(self.mshape).contiguous()
        # back to the parameter's logical shape: undo the flattening and the physical permutation
        phys = [self.p.shape[d] for d in self.order]
        c = c.view(phys).permute([self.order.index(d) for d in range(self.p.dim())])
        w = self.p.detach()
        t.addcmul_(torch.sign(w) if sign else w, c)


class _Vectors:
    """1-D parameters of one dtype on the matrix path, batched: one contiguous segment of `parts`."""

    def __init__(self, units: list[_Matrix]):
        self.units = units
        self.params = [u.p for u in units]
        self.dtype = units[0].dtype
        self.upd_units = [u for u in units if u.updates]
        self.need = any(u.need_rows for u in units)

    def bind(self, offset: int, parts: torch.Tensor, gathered: torch.Tensor) -> None:
        n = sum(u.O for u in self.units)
        self.seg = parts.narrow(0, offset, n)
        o = offset
        for u in self.units:
            u.rowc = gathered.narrow(0, o, u.O)
            o += u.O
        self.coefs = [u.rowc for u in self.upd_units]

    def sq_sums(self) -> None:
        if not self.need:
            return
        ws = [p.detach() for p in self.params]
        if self.dtype != torch.float64:
            torch.cat(ws, out=self.seg)  # half types widen on the copy
            self.seg.mul_(self.seg)
        else:  # square in float64 first
            x = torch.cat(ws)
            self.seg.copy_(x * x)

    def update(self, target: str, sign: bool) -> None:
        us = [u for u in self.upd_units if u.p.grad is not None]
        if not us:
            return
        ts = [_target(u.p, target) for u in us]
        ws = [u.p.detach() for u in us]
        cs = self.coefs if len(us) == len(self.upd_units) else [u.rowc for u in us]
        if sign:
            ws = torch._foreach_sign(ws)
        torch._foreach_addcmul_(ts, ws, cs)


class _MatrixPath:
    """All matrix-path parameters: flat `parts` (sums per row/column), `gathered` (coefficients), maps."""

    def __init__(self, bufs: GroupBuffers, params: list, slots_of: dict):
        dev = bufs.device
        n, S = bufs.n_channels, bufs.n_slots
        self.mats: list[_Matrix] = []
        vecs: dict[torch.dtype, list[_Matrix]] = {}
        self.rejected: list = []
        for p in params:
            try:
                u = _Matrix(p, slots_of[id(p)], bufs)
            except Unsupported:
                self.rejected.append(p)
                continue
            if p.dim() == 1:
                vecs.setdefault(p.dtype, []).append(u)
            else:
                self.mats.append(u)
        self.vecs = [_Vectors(us) for us in vecs.values()]
        ordered = [u for v in self.vecs for u in v.units] + self.mats
        total = sum(u.length for u in ordered)
        self.parts = torch.zeros(total, dtype=_F32, device=dev)
        self.gathered = torch.zeros(total, dtype=_F32, device=dev)
        # sentinel channel n / slot S: a dropped sum, a zero coefficient
        fix = lambda m, s: torch.where(m >= 0, m, s)  # noqa: E731
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)  # noqa: E731
        self.map_imp = fix(cat([u.map_imp for u in ordered]), n).to(dev)
        self.map_upd = fix(cat([u.map_upd for u in ordered]), n).to(dev)
        self.map_sid = fix(cat([u.map_sid for u in ordered]), S).to(dev)
        self.upd_mask = (cat([u.map_upd for u in ordered]) >= 0).to(_F32).to(dev)
        self.acc_ext = torch.zeros(n + 1, dtype=_F32, device=dev)
        self.coef_ext = torch.zeros(n + 1, dtype=_F32, device=dev)
        self.scale_ext = torch.zeros(S + 1, dtype=_F32, device=dev)
        self.scale_ext[S] = 1.0
        o = 0
        for v in self.vecs:
            v.bind(o, self.parts, self.gathered)
            o += sum(u.length for u in v.units)
        offsets = {}
        for u in self.mats:
            offsets[id(u)] = o
            o += u.length
        # one scratch buffer per accumulation dtype, sized for the largest chunk; partial column sums
        if self.mats:
            dtypes = {u.acc for u in self.mats} | {_F32}
            biggest = max(u.scratch_elems for u in self.mats)
            cp = max(u.n_chunks * u.J if u.n_chunks > 1 else 0 for u in self.mats)
            scratch = {d: torch.empty(biggest, dtype=d, device=dev) for d in dtypes}
            colpart = {d: torch.empty(cp, dtype=d, device=dev) for d in dtypes}
            for u in self.mats:
                u.bind(offsets[id(u)], self.parts, self.gathered, scratch, colpart)
                u.refresh_weight()
        self.native = self._native_tables(dev)
        native = {id(u) for _, us in self.native for u in us}
        self.torch_mats = [u for u in self.mats if id(u) not in native]
        self.empty = total == 0

    def _native_tables(self, dev: torch.device) -> list:
        """(table, units) per dtype for the weights the C loops take: float32/64 on the CPU, dense."""
        if not (NATIVE and dev.type == "cpu" and self.mats) or cpu_native.library() is None:
            return []
        by_dtype: dict[torch.dtype, list[_Matrix]] = {}
        for u in self.mats:
            if cpu_native.supports(u.dtype) and u.wm.is_contiguous():
                by_dtype.setdefault(u.dtype, []).append(u)
        tables = []
        for dtype, us in by_dtype.items():
            table = cpu_native.Table(dtype, [(u.O, u.J, u.R) for u in us])
            for m, u in zip(table.mats, us):  # the sums and coefficients live in fixed buffers
                m.rows = u.rows_acc.data_ptr() if u.need_rows else None
                m.cols = u.cols_acc.data_ptr() if u.need_cols else None
                m.rowc = u.rowc.data_ptr() if u.upd_rows else None
                m.colc = u.colc.data_ptr() if u.upd_cols else None
            tables.append((table, us))
        return tables

    def sq_sums_into(self, acc: torch.Tensor) -> None:
        """acc += sums of squares of the matrix-path importance slots (acc: float32 [n_channels])."""
        if self.empty:
            return
        for v in self.vecs:
            v.sq_sums()
        for table, us in self.native:
            for m, u in zip(table.mats, us):
                m.w = u.p.data_ptr()
            table.sq_sums()
            for u in us:
                u.land_wide_sums()
        for u in self.torch_mats:
            u.sq_sums()
        ext = self.acc_ext.zero_()
        ext.index_add_(0, self.map_imp, self.parts)
        acc.add_(ext.narrow(0, 0, acc.numel()))

    def gather(self, coef: torch.Tensor | None, value: float, slot_scale: torch.Tensor | None) -> None:
        """gathered = coef[channel] (or `value` on update positions when coef is None), times slot_scale."""
        if coef is None:
            torch.mul(self.upd_mask, float(value), out=self.gathered)
        else:
            self.coef_ext.narrow(0, 0, coef.numel()).copy_(coef)
            torch.index_select(self.coef_ext, 0, self.map_upd, out=self.gathered)
        if slot_scale is not None:
            self.scale_ext.narrow(0, 0, slot_scale.numel()).copy_(slot_scale)
            self.gathered.mul_(self.scale_ext.index_select(0, self.map_sid))

    def update(self, target: str, sign: bool) -> None:
        for v in self.vecs:
            v.update(target, sign)
        rest = self.mats if sign else self._update_native(target) + self.torch_mats
        for u in rest:
            u.update(target, sign)

    def _update_native(self, target: str) -> list:
        """t += (coef_rows + coef_cols) * w through the C loops; returns the units they could not take
        (a .grad laid out unlike its parameter)."""
        rest, written = [], []
        for table, us in self.native:
            for m, u in zip(table.mats, us):
                g, t = u.p.grad, None
                if g is not None and u.updates:
                    if target == "param":
                        t = u.p.data_ptr()
                        written.append(u.p)
                    elif g.layout == torch.strided and g.stride() == u.p.stride() and g.dtype == u.p.dtype:
                        t = g.data_ptr()
                        written.append(g)
                    else:
                        rest.append(u)
                m.w, m.t = u.p.data_ptr(), t
            table.update()
        # what torch's in-place ops do: autograd then refuses a backward through a changed weight
        torch.autograd.graph.increment_version(written)
        return rest


# ------------------------------------------------------------------------------------- per-slot path


class _SlotPath:
    """The per-slot path for the slots in `ks`: strided views of each slot, one index_add_ for all sums.

    Two shapes of slot get different treatment because CPU reductions and broadcasts are fast only along
    the innermost dims: rows (A == 1) as `[G, C, B]`, reduced/broadcast along B; columns (A > 1) as
    `[G, A, C*B]`, reduced over A first and updated with a coefficient vector expanded to `[G, 1, C*B]`.
    """

    def __init__(self, bufs: GroupBuffers, ks: list[int]):
        dev = bufs.device
        self.imp: list[int] = []
        self.rows: list[int] = []  # update slots with A == 1
        self.cols: list[int] = []  # update slots with A > 1
        imp_idx, row_idx, col_idx, row_sid, col_sid = [], [], [], [], []
        row_off: dict[int, int] = {}
        col_off: dict[int, int] = {}
        n_upd: dict[int, int] = {}
        chans = bufs.chans
        for k in ks:
            _, _, p = bufs.entries[k]
            geo, flags = bufs.geometries[k], bufs.flags[k]
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
                    row_off[k] = sum(len(t) for t in row_idx)
                    row_idx.append(torch.arange(chan, chan + n))
                    row_sid.append(torch.full((n,), k))
                else:
                    self.cols.append(k)
                    col_off[k] = sum(len(t) for t in col_idx)
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
            self.coef_views[k] = self.row_coef.narrow(0, row_off[k], geo.G * geo.C).view(geo.G, geo.C, 1)
        for k in self.cols:
            geo = bufs.geometries[k]
            n = geo.G * geo.C * geo.B
            self.coef_views[k] = self.col_coef.narrow(0, col_off[k], n).view(geo.G, 1, geo.C * geo.B)
        self.empty = not (self.imp or self.rows or self.cols)
        self.w_ptrs: tuple = ()
        self.wviews: dict[int, torch.Tensor] = {}

    def views(self, bufs: GroupBuffers) -> dict[int, torch.Tensor]:
        ks = set(self.imp) | set(self.coef_views)
        ptrs = tuple(bufs.entries[k][2].data_ptr() for k in sorted(ks))
        if ptrs != self.w_ptrs:
            self.wviews = {k: _view(bufs.entries[k][2].detach(), bufs.geometries[k]) for k in ks}
            self.w_ptrs = ptrs
        return self.wviews

    def sq_sums_into(self, bufs: GroupBuffers, acc: torch.Tensor) -> None:
        if not self.imp:
            return
        wviews = self.views(bufs)
        parts = []
        for k in self.imp:
            v = wviews[k]
            acc_t = _acc_dtype(v.dtype)
            geo = bufs.geometries[k]
            if geo.A == 1:  # [G, C, B]: inner reduction
                s = torch.linalg.vector_norm(v, dim=2, dtype=acc_t if acc_t != v.dtype else None).square_()
            else:  # [G, A, C*B]: reduce over A (outer, vectorised), then over B
                s = v.to(acc_t).square().sum(1)
                if geo.B > 1:
                    s = s.view(geo.G, geo.C, geo.B).sum(2)
            parts.append(s.reshape(-1).to(_F32))
        acc.index_add_(0, self.imp_idx, torch.cat(parts))

    def _snapshots(self, bufs: GroupBuffers, target: str) -> dict[int, torch.Tensor]:
        """With target="param", weights written by several slots are read from a copy taken first."""
        if target != "param" or not self.shared:
            return {}
        snap: dict[int, torch.Tensor] = {}
        for k in self.rows + self.cols:
            p = bufs.entries[k][2]
            if id(p) in self.shared and id(p) not in snap and p.grad is not None:
                snap[id(p)] = p.detach().clone()
        return snap

    def add_scaled_(self, bufs: GroupBuffers, coef: torch.Tensor, target: str,
                    slot_scale: torch.Tensor | None) -> None:
        if not (self.rows or self.cols):
            return
        torch.index_select(coef, 0, self.row_idx, out=self.row_coef)
        torch.index_select(coef, 0, self.col_idx, out=self.col_coef)
        if slot_scale is not None:
            self.row_coef.mul_(slot_scale.index_select(0, self.row_sid))
            self.col_coef.mul_(slot_scale.index_select(0, self.col_sid))
        for k, t, w, other in self._update_views(bufs, target):
            if other is None:
                t.addcmul_(w, self.coef_views[k])
                continue
            c = coef.narrow(0, bufs.chans[k], other.G * other.C).view(other.G, 1, other.C, 1)
            t.addcmul_(w, c if slot_scale is None else c * slot_scale[k])

    def add_sign_(self, bufs: GroupBuffers, reg: float, target: str, slot_scale: torch.Tensor | None) -> None:
        if not (self.rows or self.cols):
            return
        if slot_scale is not None:
            slot_scale = slot_scale * float(reg)
        for k, t, w, _ in self._update_views(bufs, target):
            if slot_scale is None:
                t.add_(torch.sign(w).to(_F32), alpha=float(reg))
            else:
                t.addcmul_(torch.sign(w), slot_scale.narrow(0, k, 1))

    def _update_views(self, bufs: GroupBuffers, target: str):
        """(slot, target view, weight view, None) per update slot whose parameter has a .grad; for a
        target laid out unlike its parameter, `[G, A, C, B]` views of it and of the weight copied into
        its layout, with their geometry last."""
        wviews = self.views(bufs)
        snap = self._snapshots(bufs, target)
        for k in self.rows + self.cols:
            p = bufs.entries[k][2]
            if p.grad is None:
                continue
            t = _target(p, target)
            if t.stride() != p.stride():
                yield (k, *_other_layout(bufs, k, t, snap.get(id(p), p.detach())))
                continue
            w = wviews[k] if id(p) not in snap else _view(snap[id(p)], bufs.geometries[k])
            yield k, _view(t, bufs.geometries[k]), w, None

def _view(t: torch.Tensor, geo) -> torch.Tensor:
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


# -------------------------------------------------------------------------------------------- the plan


class _Plan:
    """Per-structure state of one GroupBuffers: which parameters take which path, and their buffers."""

    def __init__(self, bufs: GroupBuffers):
        params: dict[int, torch.nn.Parameter] = {}
        slots_of: dict[int, list] = {}
        ks_of: dict[int, list[int]] = {}
        chans = bufs.chans
        for k, ((_, slot, p), geo, flags) in enumerate(zip(bufs.entries, bufs.geometries, bufs.flags)):
            if geo.numel == 0:
                continue
            params.setdefault(id(p), p)
            slots_of.setdefault(id(p), []).append((k, slot, chans[k], flags))
            ks_of.setdefault(id(p), []).append(k)
        candidates = list(params.values()) if MATRIX_PATH else []
        self.matrix = _MatrixPath(bufs, candidates, slots_of)
        slow = [p for p in params.values() if not MATRIX_PATH] + self.matrix.rejected
        self.slot_path = _SlotPath(bufs, sorted(k for p in slow for k in ks_of[id(p)]))


def _plan(bufs: GroupBuffers) -> _Plan:
    plan = bufs.cache.get("torch")
    if plan is None:
        with fewer_collections():
            plan = bufs.cache["torch"] = _Plan(bufs)
    return plan


# ------------------------------------------------------------------------------------------ importance


def channel_sq_sums(bufs: GroupBuffers) -> torch.Tensor:
    """Sum of w**2 per flat channel over the importance slots; returns bufs.acc (overwritten next call)."""
    plan = _plan(bufs)
    acc = bufs.acc.zero_()
    plan.matrix.sq_sums_into(acc)
    plan.slot_path.sq_sums_into(bufs, acc)
    return acc


def group_norm_coef(bufs: GroupBuffers, sums: torch.Tensor, reg: float, alpha: float) -> torch.Tensor:
    """reg * gamma per flat channel (see kernels/__init__.py)."""
    cg = bufs.channel_group
    n = sums.to(_F32).sqrt()
    ng = bufs.n_groups
    nmax = torch.full((ng,), -float("inf"), dtype=_F32, device=n.device).scatter_reduce_(0, cg, n, "amax")
    nmin = torch.full((ng,), float("inf"), dtype=_F32, device=n.device).scatter_reduce_(0, cg, n, "amin")
    d = nmax - nmin
    # flat (gamma 1) unless the spread is finite and above FLAT_SPREAD_RTOL * n_max; one-channel groups
    # have d = 0; NaN compares False
    ok = (d > nmax * FLAT_SPREAD_RTOL) & torch.isfinite(d)
    dc, mc = d.index_select(0, cg), nmax.index_select(0, cg)
    gamma = torch.exp2((mc - n) / torch.where(ok.index_select(0, cg), dc, 1.0) * float(alpha))
    return torch.where(ok.index_select(0, cg), gamma, 1.0).mul_(float(reg))


def group_lasso_coef(bufs: GroupBuffers, sums_bn: torch.Tensor, reg: float) -> torch.Tensor:
    """reg / sqrt(mean over BatchNorm slots of w**2 + 1e-9) per flat channel; 0 where no BatchNorm slot."""
    cnt = bufs.n_importance_slots_bn
    q = sums_bn.to(_F32) / cnt.clamp(min=1.0)
    return torch.where(cnt > 0, float(reg) * torch.rsqrt(q + 1e-9), 0.0)


# -------------------------------------------------------------------------------------------- updates


def add_scaled_(bufs: GroupBuffers, coef: torch.Tensor, *, target: str = "grad",
                slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * coef[c] * w on the update slots."""
    if target not in ("grad", "param"):
        raise ValueError(f"tritonprune.kernels.torch: target must be 'grad' or 'param', got {target!r}")
    plan = _plan(bufs)
    coef = coef.to(_F32)
    if slot_scale is not None:
        slot_scale = slot_scale.to(device=coef.device, dtype=_F32)
    if not plan.matrix.empty:
        plan.matrix.gather(coef, 0.0, slot_scale)
        plan.matrix.update(target, sign=False)
    plan.slot_path.add_scaled_(bufs, coef, target, slot_scale)


def add_sign_(bufs: GroupBuffers, reg: float, *, target: str = "grad",
              slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * reg * sign(w) on the update slots."""
    if target not in ("grad", "param"):
        raise ValueError(f"tritonprune.kernels.torch: target must be 'grad' or 'param', got {target!r}")
    plan = _plan(bufs)
    if slot_scale is not None:
        slot_scale = slot_scale.to(device=bufs.device, dtype=_F32)
    if not plan.matrix.empty:
        plan.matrix.gather(None, reg, slot_scale)
        plan.matrix.update(target, sign=True)
    plan.slot_path.add_sign_(bufs, reg, target, slot_scale)
