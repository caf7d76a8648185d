"""Host-side launch plan of the Triton backend: per-parameter matrices, their work tables, and the list of
kernel specializations a plan launches.

The design is the torch backend's matrix path (`kernels/torch_impl.py`, `_Matrix`) and the C loops of
`kernels/cpu_native.c`: a parameter is seen as a dense matrix `M = [G*R, J]` in its physical layout
(out-rows outermost, `J` the rest in memory order, `G` > 1 for grouped-conv in-columns), each of its
slots is a map from rows or from columns to flat channels, so

- the sums kernel reads every element once and produces row sums and column sums of squares;
- the update kernel writes `t += (c_row[r] + c_col[g*J + j]) * f(w)` once per element.

A 1-D parameter (norm weight, bias) is one row: `O = 1`, `J = N`, its channel map is the column map.
Parameters whose slots fit no such form (two non-leading slot dims, overlapping slots, no dense layout)
take the generic per-slot kernels ("other" in the specialization list).

Everything here is built once per structure from `entries`/`geometries`/`flags` and the parameters'
shapes and strides: no device read, no addresses (the kernels read those from `bufs.table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..geometry import physical_order
from ..layout import DTYPE_CODES, FLAG_IMPORTANCE, FLAG_UPDATE

# element size per dtype code and elements per 16-byte vector
ELEM_SIZE = {0: 4, 1: 2, 2: 2, 3: 8}
VEC = {code: 16 // size for code, size in ELEM_SIZE.items()}
DTYPE_NAMES = {0: "fp32", 1: "fp16", 2: "bf16", 3: "fp64"}
NUM_WARPS = 4


@dataclass(frozen=True)
class Tile:
    """Tile of the matrix kernels for one dtype: BR rows (held by every thread) x BJ columns (VEC per
    thread, 32 * NUM_WARPS threads across), a program walks QC columns of BR rows."""

    br: int
    bj: int
    qc: int


def tile_for(code: int, kernel: str) -> Tile:
    vec = VEC[code]
    bj = vec * 32 * NUM_WARPS
    # 64 elements per thread per iteration for the sums (16 for float64, 8 values per register pair);
    # the update holds w and t: half as many rows
    per_thread = 32 if code == 3 else 64
    br = max(1, per_thread // vec)
    if kernel == "update":
        br = max(1, br // 2)
    return Tile(br=br, bj=bj, qc=8 * bj)


# columns per program of the column-sum kernel
COLSUM_BLOCK = 1024

# work-table widths (int64 columns)
SUMS_COLS = 10  # slot, delta, J, r0, nrows, q0, q1, rowpart, colpart, vec_ok
UPD_COLS = 10  # slot, delta, J, r0, nrows, q0, q1, rowc, colc, vec_ok
COLSUM_COLS = 5  # first partial, row blocks, stride, columns, first output (all but columns: multiples of 16)


class Unsupported(Exception):
    """This parameter's slots fit no matrix form: it takes the generic kernels."""


def _index_map(size: int, slots, bufs, lead: int):
    """[lead, size] maps (importance channel, update channel, slot id); -1 where no slot covers."""
    imp = torch.full((lead, size), -1, dtype=torch.int64)
    upd = torch.full((lead, size), -1, dtype=torch.int64)
    sid = torch.full((lead, size), -1, dtype=torch.int64)
    cover = torch.zeros((lead, size), dtype=torch.bool)
    for k, slot, chan, flags in slots:
        per = bufs.geometries[k].C
        pos = slot.start + torch.arange(per * slot.repeat)
        ch = chan + torch.arange(per).repeat_interleave(slot.repeat)
        if slot.blocks > 1:
            ch = ch + per * torch.arange(lead)[:, None]
        if cover[:, pos].any():
            raise Unsupported  # two slots of one dim share an index
        cover[:, pos] = True
        if flags & FLAG_IMPORTANCE:
            imp[:, pos] = ch
        if flags & FLAG_UPDATE:
            upd[:, pos] = ch
        sid[:, pos] = k
    return imp, upd, sid


@dataclass
class Unit:
    """One parameter on the matrix path."""

    p: torch.nn.Parameter
    code: int
    slot: int  # a slot of the parameter: its table row gives the addresses
    delta: int  # element offset of the parameter's first element from that slot's address
    n_out: int
    J: int
    R: int  # rows per conv group
    G: int
    rows: tuple  # (imp, upd, sid) int64 [O]
    cols: tuple  # (imp, upd, sid) int64 [G*J]
    row_part: int = 0  # first row partial: layout [n_col_items, O]
    col_part: int = 0  # first column partial: layout [G, n_row_blocks, J padded to 16]
    col_sum: int = 0  # first column sum (over the row blocks): layout [G, J padded to 16]
    row_pos: int = 0  # first row coefficient in `gathered`
    col_pos: int = 0  # first column coefficient in `gathered` (G*J of them)

    @property
    def need_sums(self) -> bool:
        return bool((self.rows[0] >= 0).any() or (self.cols[0] >= 0).any())

    @property
    def updates(self) -> bool:
        return bool((self.rows[1] >= 0).any() or (self.cols[1] >= 0).any())


def make_unit(p, slots, bufs) -> Unit:
    """The matrix form of parameter `p` with slots `slots` [(k, slot, chan, flags)], or Unsupported."""
    shape, nd = tuple(p.shape), p.dim()
    if nd == 0 or p.numel() == 0:
        raise Unsupported
    dims = {s.dim for _, s, _, _ in slots}
    col_dims = dims - {0}
    if len(col_dims) > 1:
        raise Unsupported
    blocks = {s.blocks for _, s, _, _ in slots if s.blocks > 1}
    G = 1
    if blocks:
        if len(blocks) > 1 or any((s.blocks > 1) != (s.dim != 0) for _, s, _, _ in slots):
            raise Unsupported
        G = blocks.pop()
    if shape[0] % G:
        raise Unsupported
    order = physical_order(shape, tuple(p.stride()))
    if order is None:
        raise Unsupported
    if shape[0] == 1:
        order = [0] + [d for d in order if d != 0]
    if order[0] != 0:
        raise Unsupported
    k0 = slots[0][0]
    code = DTYPE_CODES[p.dtype]
    delta = -bufs.geometries[k0].offset
    none = torch.full((1,), -1, dtype=torch.int64)
    if nd == 1:  # one row of N columns
        imp, upd, sid = _index_map(shape[0], slots, bufs, 1)
        return Unit(p, code, k0, delta, 1, shape[0], 1, 1, (none, none, none),
                    (imp.reshape(-1), upd.reshape(-1), sid.reshape(-1)))
    n_out, J = shape[0], p.numel() // shape[0]
    rows_s = [s for s in slots if s[1].dim == 0]
    cols_s = [s for s in slots if s[1].dim != 0]
    if rows_s:
        rows = tuple(m.reshape(-1) for m in _index_map(n_out, rows_s, bufs, 1))
    else:
        rows = tuple(torch.full((n_out,), -1, dtype=torch.int64) for _ in range(3))
    if cols_s:
        d = col_dims.pop()
        maps = _index_map(shape[d], cols_s, bufs, G)
        view = [G] + [shape[i] if i == d else 1 for i in range(1, nd)]
        perm = [0] + list(order[1:])
        cols = tuple(m.view(view).expand([G, *shape[1:]]).permute(perm).reshape(G * J) for m in maps)
    else:
        cols = tuple(torch.full((G * J,), -1, dtype=torch.int64) for _ in range(3))
    return Unit(p, code, k0, delta, n_out, J, n_out // G, G, rows, cols)


@dataclass
class MatrixPlan:
    """Matrix-path units, their work tables (host tensors) and the reduction entries of their sums."""

    units: list = field(default_factory=list)
    sums: dict = field(default_factory=dict)  # dtype code -> list of work rows
    update: dict = field(default_factory=dict)
    colsum: list = field(default_factory=list)  # work rows of the column-sum kernel
    n_parts: int = 0  # partials written by the matrix sums kernel
    n_pos: int = 0  # coefficient positions (`gathered`)
    # reduction entries: int64 [n, 4] blocks of (channel, first partial, count, stride), in summation order
    entries: list = field(default_factory=list)
    # gather maps over the positions
    pos_upd: list = field(default_factory=list)
    pos_sid: list = field(default_factory=list)


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def build_matrix_plan(bufs, units: list[Unit]) -> MatrixPlan:
    plan = MatrixPlan(units=units)
    part = pos = 0
    for u in units:
        ts, tu = tile_for(u.code, "sums"), tile_for(u.code, "update")
        vec = VEC[u.code]
        vec_ok = int(u.J % vec == 0)  # the kernel also checks the addresses' alignment at run time
        # coefficient positions: rows, then columns on a 16-element boundary (aligned vector loads)
        u.row_pos = pos
        u.col_pos = _pad16(pos + u.n_out)
        pos = _pad16(u.col_pos + u.G * u.J)
        plan.pos_upd += [u.rows[1], torch.full((u.col_pos - u.row_pos - u.n_out,), -1, dtype=torch.int64),
                         u.cols[1], torch.full((pos - u.col_pos - u.G * u.J,), -1, dtype=torch.int64)]
        plan.pos_sid += [u.rows[2], torch.full((u.col_pos - u.row_pos - u.n_out,), -1, dtype=torch.int64),
                         u.cols[2], torch.full((pos - u.col_pos - u.G * u.J,), -1, dtype=torch.int64)]
        if u.need_sums:
            n_ci = math.ceil(u.J / ts.qc)
            n_rb = math.ceil(u.R / ts.br)
            # rows of column partials and of column sums start on 16-element boundaries (vector access)
            jp = _pad16(u.J)
            u.row_part = part
            u.col_part = _pad16(part + n_ci * u.n_out)
            u.col_sum = u.col_part + u.G * n_rb * jp
            part = u.col_sum + u.G * jp
            # column sums: each column's partials over its group's row blocks, summed in row-block order
            for g in range(u.G):
                for j0 in range(0, u.J, COLSUM_BLOCK):
                    plan.colsum.append([u.col_part + g * n_rb * jp + j0, n_rb, jp, min(COLSUM_BLOCK, u.J - j0),
                                        u.col_sum + g * jp + j0])
            rows = plan.sums.setdefault(u.code, [])
            for g in range(u.G):
                for rb in range(n_rb):
                    r0 = g * u.R + rb * ts.br
                    nr = min(ts.br, u.R - rb * ts.br)
                    for ci in range(n_ci):
                        q0 = ci * ts.qc
                        rows.append([u.slot, u.delta, u.J, r0, nr, q0, min(u.J, q0 + ts.qc),
                                     u.row_part + ci * u.n_out + r0, u.col_part + (g * n_rb + rb) * jp + q0, vec_ok])
            # entries: a row's partials over the column items, a column's over the row blocks of its group
            r = torch.nonzero(u.rows[0] >= 0).flatten()
            plan.entries.append(torch.stack([u.rows[0][r], u.row_part + r, torch.full_like(r, n_ci),
                                             torch.full_like(r, u.n_out)], 1))
            c = torch.nonzero(u.cols[0] >= 0).flatten()
            at = u.col_sum + (c // u.J) * jp + c % u.J
            plan.entries.append(torch.stack([u.cols[0][c], at, torch.ones_like(c), torch.zeros_like(c)], 1))
        if u.updates:
            rows = plan.update.setdefault(u.code, [])
            n_rb = math.ceil(u.R / tu.br)
            for g in range(u.G):
                for rb in range(n_rb):
                    r0 = g * u.R + rb * tu.br
                    nr = min(tu.br, u.R - rb * tu.br)
                    for q0 in range(0, u.J, tu.qc):
                        rows.append([u.slot, u.delta, u.J, r0, nr, q0, min(u.J, q0 + tu.qc),
                                     u.row_pos + r0, u.col_pos + g * u.J + q0, vec_ok])
    plan.n_parts, plan.n_pos = part, pos
    return plan


def split_params(bufs, matrix: bool = True):
    """(units on the matrix path, slot ids left to the generic kernels)."""
    params: dict[int, torch.nn.Parameter] = {}
    slots_of: dict[int, list] = {}
    for k, ((_, slot, p), geo, flags) in enumerate(zip(bufs.entries, bufs.geometries, bufs.flags)):
        if geo.numel == 0:
            continue
        params.setdefault(id(p), p)
        slots_of.setdefault(id(p), []).append((k, slot, bufs.chans[k], flags))
    units, rest = [], []
    for pid, p in params.items():
        try:
            if not matrix:
                raise Unsupported
            units.append(make_unit(p, slots_of[pid], bufs))
        except Unsupported:
            rest += [k for k, _, _, _ in slots_of[pid]]
    return units, sorted(rest)


# -------------------------------------------------------------------------------- specializations


@dataclass(frozen=True)
class Spec:
    """One compiled form of a kernel: its name, kind ("sums" | "update" | "other") and constexprs."""

    kernel: str
    kind: str
    constexprs: tuple  # ((name, value), ...)

    @property
    def label(self) -> str:
        return self.kernel + "[" + ",".join(f"{k}={v}" for k, v in self.constexprs) + "]"


def _spec(kernel: str, kind: str, **constexprs) -> Spec:
    return Spec(kernel, kind, tuple(constexprs.items()))
