"""Host-side launch plan of the Triton backend: per-parameter matrices, their work tables, and the list of
kernel specializations a plan launches.

Every parameter that has one is run in its matrix form `M = [G, R, J]` (`kernels/matrix_form.py`, the
form the torch backend and its C loops run too), with both row and column maps always present (-1 where
a side has no slot), so

- the sums kernel reads every element once and produces row sums and column sums of squares;
- the update kernel writes `t += (c_row[r] + c_col[g*J + j]) * f(w)` once per element.

A 1-D parameter (norm weight, bias) is laid on its side here: one row (`O = 1`, `J = N`), its channel
map the column map, so its N elements are spread across the vector lanes. Parameters with no matrix
form (`Unsupported`) take the generic per-slot kernels ("other" in the specialization list).

Everything here is built once per structure from `entries`/`geometries`/`flags` and the parameters'
shapes and strides: no device read, no addresses (the kernels read those from `bufs.table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .layout import DTYPE_CODES
from .matrix_form import Unsupported, matrix_form

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


def _uncovered(n: int) -> tuple:
    """Maps of a side without slots: the kernels read every side, -1 everywhere."""
    return tuple(torch.full((n,), -1, dtype=torch.int64) for _ in range(3))


def make_unit(p, slots, bufs) -> Unit:
    """The Triton unit of parameter `p` with slots `slots` [(k, slot, chan, flags)], or Unsupported."""
    form = matrix_form(p, slots, bufs)
    k0 = slots[0][0]
    code = DTYPE_CODES[p.dtype]
    delta = -bufs.geometries[k0].offset
    if p.dim() == 1:  # on its side: one row of N columns, the row map is the column map
        none = torch.full((1,), -1, dtype=torch.int64)
        return Unit(p, code, k0, delta, 1, form.n_rows, 1, 1, (none, none, none), tuple(form.rows))
    rows = tuple(form.rows) if form.rows is not None else _uncovered(form.n_rows)
    cols = tuple(form.cols) if form.cols is not None else _uncovered(form.G * form.J)
    return Unit(p, code, k0, delta, form.n_rows, form.J, form.R, form.G, rows, cols)


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
