"""Triton backend: the five backend operations over GroupBuffers, each a fixed handful of launches.

Same design as the torch backend's matrix path and its C loops (see `triton_plan.py`): every parameter
is a dense matrix `[G*R, J]` in its physical layout with a row and a column channel map, so

- `channel_sq_sums`: `_mat_sums_kernel` reads each weight once in 2-D tiles `[BR, BJ]` (BR rows held by
  every thread, VEC contiguous columns per thread: 16-byte loads) and writes both its row sums (a row's
  sum over one program's columns) and its column sums (a column's sum over one program's rows) as fp32
  partials; `_colsum_kernel` sums each column's partials over its row blocks (coalesced), and
  `_reduce_kernel` sums, per flat channel, its row and column sums in a fixed order. A channel's row
  and column maps are resolved once, on the host, into those index lists: no per-element index
  arithmetic, no division.
- `group_norm_coef`: `_gamma_kernel`, one program per group; `group_lasso_coef`: `_lasso_kernel`.
- `add_scaled_` / `add_sign_`: `_gather_kernel` turns the channel coefficients into one coefficient per
  matrix row and per matrix column (times `slot_scale`), then `_mat_update_kernel` writes
  `t += (c_row[r] + c_col[g*J + j]) * f(w)`, f = identity or sign, each element read and written once
  by one thread: `target="param"` reads every w before its write, a weight in two groups (out-rows of
  one, in-columns of another) gets both terms in one pass.

All matrix parameters of one dtype go in one launch, over a work table of tiles. A tile takes the
vectorised branch when its row length is a multiple of VEC and its addresses are 16-byte aligned
(checked in the kernel, so a pointer refresh never needs a new plan), the scalar branch otherwise.
Parameters whose slots fit no matrix form (rare: slots on two non-leading dims, overlapping slots) go
through the generic per-slot kernels `_slot_sums_kernel` / `_slot_update_kernel` ("other").

Determinism: NO float atomics anywhere. Every sum is a register reduction inside one program or a
sequential loop in a fixed order, so the results are bitwise identical from run to run (on the same
device and Triton version).

Numerics: load as fp32 (fp64 for float64 parameters), compute in that type, cast on store; partial
sums are fp32. Element offsets are int64.

CUDA graphs: a step issues only kernel launches on the current stream, into buffers owned by the plan
or allocated with `torch.empty` (served by the graph's private pool during capture); it never reads
device memory on the host, so `torch.cuda.graph` can capture `opt.step()`. The kernels read parameter
and .grad addresses from `bufs.table` at run time; gradients must keep their addresses between replays
(`zero_grad(set_to_none=False)`). Scalars (`reg`, `alpha`) are baked into a captured graph.

torch.compile: the engine marks the regularization `torch.compiler.disable`, so a compiled training
step breaks its graph only around it.

On CPU tensors the kernels run only under the Triton interpreter, which is how CI tests them.
`TRITON_INTERPRET=1` must be set before triton is first imported in the process (Triton decorates its
own library then); `check_available` says so if it was set too late. `static_report.py` compiles the
same kernels for sm_80/sm_90 without a GPU and counts their instructions.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is the `gpu` extra
    triton = None
    tl = None
    HAS_TRITON = False

from . import FLAT_SPREAD_RTOL
from .layout import DTYPE_CODES, FLAG_IMPORTANCE, FLAG_UPDATE, N_COLS
from .triton_plan import (
    COLSUM_BLOCK,
    COLSUM_COLS,
    NUM_WARPS,
    SUMS_COLS,
    UPD_COLS,
    VEC,
    Spec,
    build_matrix_plan,
    split_params,
    tile_for,
)

# False sends every parameter through the generic per-slot kernels (tests keep both paths checked)
MATRIX_PATH = True

_SQ_COLS = 5  # generic sums work rows: slot, first slot channel, k0, k1, first partial
_UP_COLS = 4  # generic update work rows: first slot-list index, end slot-list index, q0, q1
_SLOT_TILES = {"rows": (8, 256, 4096), "cols": (64, 32, 512), "up_block": 1024, "up_item": 16384}
_RED_BLOCK = 128  # channels per program in the partial reduction
_GAMMA_BLOCK = 256
_LASSO_BLOCK = 1024
_GATHER_BLOCK = 1024
_INT32_MAX = 2**31 - 1


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter. Triton fixes this for the whole process when it is
    first imported (its own library functions are decorated then), so TRITON_INTERPRET=1 must be set
    before that."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def check_available(device: torch.device | str) -> None:
    """Raise a ValueError saying what to do if the Triton backend cannot run on `device`."""
    device = torch.device(device)
    if not HAS_TRITON:
        raise ValueError("tritonprune.kernels.triton_impl: triton is not installed; use backend='torch'")
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    if device.type == "cpu" and _env_interpret():
        raise ValueError(
            "tritonprune.kernels.triton_impl: TRITON_INTERPRET=1 was set after triton was imported; set it before "
            "the first `import triton` (e.g. at the start of the process) or use backend='torch'"
        )
    raise ValueError(
        f"tritonprune.kernels.triton_impl: the Triton backend needs CUDA tensors, the parameters are on {device}; "
        "use backend='torch' (or set TRITON_INTERPRET=1 to run the kernels slowly in the interpreter)"
    )


# ------------------------------------------------------------------------------------------ kernels
#
# Plain functions, decorated on first use (`_kernels`), so importing this module costs no Triton work.
# The helpers are called by their kernels by name: `_kernels` binds the decorated helpers in
# the kernels' globals.


def _elem_ptr(addr, DTYPE: tl.constexpr):
    if DTYPE == 0:
        return addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        return addr.to(tl.pointer_type(tl.float16))
    elif DTYPE == 2:
        return addr.to(tl.pointer_type(tl.bfloat16))
    else:
        return addr.to(tl.pointer_type(tl.float64))


def _tile_item(work_ptr):
    # this program's tile of a matrix-path launch: the 10 int64 fields of its work item (triton_plan)
    item = work_ptr + tl.program_id(0).to(tl.int64) * 10
    return (tl.load(item), tl.load(item + 1), tl.load(item + 2), tl.load(item + 3), tl.load(item + 4),
            tl.load(item + 5), tl.load(item + 6), tl.load(item + 7), tl.load(item + 8), tl.load(item + 9))


def _vec_bounds(J, q0, q1, c0, VEC: tl.constexpr):
    # the caller checked these are multiples of VEC (and the address of 16): rounding them makes new
    # values the compiler can prove aligned (a hint on the loaded value would also bind the caller's
    # scalar branch)
    return J // VEC * VEC, q0 // VEC * VEC, q1 // VEC * VEC, c0 // VEC * VEC


def _sums_tile(addr, part_ptr, J, r0, nrows, q0, q1, rp, cp, DTYPE: tl.constexpr, BR: tl.constexpr,
               BJ: tl.constexpr, VEC: tl.constexpr):
    # rows r0..r0+nrows, columns q0..q1 of a [*, J] matrix: row sums -> part[rp + i], column sums ->
    # part[cp + j - q0]. Every thread holds all BR rows of its VEC columns: the column sum of a tile is
    # a sum in registers, the row sums accumulate elementwise and are reduced once at the end.
    ACC: tl.constexpr = tl.float64 if DTYPE == 3 else tl.float32
    if VEC > 1:
        J, q0, q1, cp = _vec_bounds(J, q0, q1, cp, VEC)
        w_ptr = tl.multiple_of(_elem_ptr(addr // 16 * 16, DTYPE), 16)
    else:
        w_ptr = _elem_ptr(addr, DTYPE)
    rr = tl.arange(0, BR)
    jj = tl.arange(0, BJ)
    rmask = rr < nrows
    roff = (r0 + rr).to(tl.int64) * J
    rowacc = tl.zeros([BR, BJ], dtype=ACC)
    for j0 in range(q0, q1, BJ):
        cols = j0 + jj
        cm = cols < q1
        x = tl.load(w_ptr + (roff[:, None] + cols[None, :]), mask=rmask[:, None] & cm[None, :], other=0.0)
        x = x.to(ACC)
        sq = x * x
        rowacc += sq
        tl.store(part_ptr + (cp - q0 + cols), tl.sum(sq, axis=0).to(tl.float32), mask=cm)
    tl.store(part_ptr + (rp + rr), tl.sum(rowacc, axis=1).to(tl.float32), mask=rmask)


def _mat_sums_kernel(table_ptr, work_ptr, part_ptr, DTYPE: tl.constexpr, BR: tl.constexpr,
                     BJ: tl.constexpr, VEC: tl.constexpr):
    k, delta, J, r0, nrows, q0, q1, rp, cp, vec_ok = _tile_item(work_ptr)
    ES: tl.constexpr = 8 if DTYPE == 3 else (4 if DTYPE == 0 else 2)
    addr = tl.load(table_ptr + k * 16) + delta * ES  # the parameter's first element
    if (vec_ok != 0) & (addr % 16 == 0):
        _sums_tile(addr, part_ptr, J, r0, nrows, q0, q1, rp, cp, DTYPE, BR, BJ, VEC)
    else:
        _sums_tile(addr, part_ptr, J, r0, nrows, q0, q1, rp, cp, DTYPE, BR, BJ, 1)


def _update_tile(wa, ta, coef_ptr, J, r0, nrows, q0, q1, rc, cc, DTYPE: tl.constexpr,
                 SIGN: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, VEC: tl.constexpr):
    # t[r, j] += (coef[rc + r - r0] + coef[cc + j - q0]) * f(w[r, j]) over the tile
    ACC: tl.constexpr = tl.float64 if DTYPE == 3 else tl.float32
    if VEC > 1:
        J, q0, q1, cc = _vec_bounds(J, q0, q1, cc, VEC)
        w_ptr = tl.multiple_of(_elem_ptr(wa // 16 * 16, DTYPE), 16)
        t_ptr = tl.multiple_of(_elem_ptr(ta // 16 * 16, DTYPE), 16)
    else:
        w_ptr = _elem_ptr(wa, DTYPE)
        t_ptr = _elem_ptr(ta, DTYPE)
    rr = tl.arange(0, BR)
    jj = tl.arange(0, BJ)
    rmask = rr < nrows
    roff = (r0 + rr).to(tl.int64) * J
    c_row = tl.load(coef_ptr + (rc + rr), mask=rmask, other=0.0)
    for j0 in range(q0, q1, BJ):
        cols = j0 + jj
        cm = cols < q1
        m = rmask[:, None] & cm[None, :]
        off = roff[:, None] + cols[None, :]
        w = tl.load(w_ptr + off, mask=m, other=0.0).to(ACC)
        t = tl.load(t_ptr + off, mask=m, other=0.0).to(ACC)
        c_col = tl.load(coef_ptr + (cc - q0 + cols), mask=cm, other=0.0)
        c = (c_row[:, None] + c_col[None, :]).to(ACC)
        if SIGN:
            d = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0)).to(ACC)
        else:
            d = w
        tl.store(t_ptr + off, (t + c * d).to(t_ptr.dtype.element_ty), mask=m)


def _mat_update_kernel(table_ptr, work_ptr, coef_ptr, DTYPE: tl.constexpr, SIGN: tl.constexpr,
                       TO_PARAM: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, VEC: tl.constexpr):
    k, delta, J, r0, nrows, q0, q1, rc, cc, vec_ok = _tile_item(work_ptr)
    ES: tl.constexpr = 8 if DTYPE == 3 else (4 if DTYPE == 0 else 2)
    row = table_ptr + k * 16
    wa = tl.load(row)
    ga = tl.load(row + 1)
    if ga != 0:  # parameters without .grad are skipped whatever the target
        wa = wa + delta * ES
        ta = wa if TO_PARAM else ga + delta * ES
        if (vec_ok != 0) & ((wa | ta) % 16 == 0):
            _update_tile(wa, ta, coef_ptr, J, r0, nrows, q0, q1, rc, cc, DTYPE, SIGN, BR, BJ, VEC)
        else:
            _update_tile(wa, ta, coef_ptr, J, r0, nrows, q0, q1, rc, cc, DTYPE, SIGN, BR, BJ, 1)


def _gather_kernel(upd_ptr, sid_ptr, coef_ptr, scale_ptr, out_ptr, n, reg, SIGN: tl.constexpr,
                   HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    # out[i] = coef[upd[i]] (or reg) * scale[sid[i]]; 0 where no update slot covers position i
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    ch = tl.load(upd_ptr + i, mask=ok, other=-1)
    hit = ch >= 0
    if SIGN:
        c = tl.where(hit, reg, 0.0)
    else:
        c = tl.load(coef_ptr + ch, mask=hit, other=0.0)
    if HAS_SCALE:
        s = tl.load(sid_ptr + i, mask=hit, other=0)
        c = c * tl.load(scale_ptr + s, mask=hit, other=0.0)
    tl.store(out_ptr + i, c, mask=ok)


def _colsum_kernel(part_ptr, work_ptr, BLOCK: tl.constexpr):
    # part[dst + j] = sum over rb < n_rb (in order) of part[src + rb * stride + j], j < n: the column sums
    # of one conv group of a matrix from its row blocks' partials (coalesced rows of partials)
    # (src, stride, dst are multiples of 16 by construction: rounding them lets the compiler see it)
    item = work_ptr + tl.program_id(0).to(tl.int64) * 5
    src = tl.load(item) // 16 * 16
    n_rb = tl.load(item + 1)
    stride = tl.load(item + 2) // 16 * 16
    n = tl.load(item + 3)
    dst = tl.load(item + 4) // 16 * 16
    j = tl.arange(0, BLOCK).to(tl.int64)
    # rows are padded to 16: the padding is read and written (unused) so the mask stays 16-aligned
    m = j < (n + 15) // 16 * 16
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for rb in range(0, n_rb):
        acc += tl.load(part_ptr + src + rb * stride + j, mask=m, other=0.0)
    tl.store(part_ptr + dst + j, acc, mask=m)


def _reduce_kernel(part_ptr, first_ptr, count_ptr, stride_ptr, start_ptr, bne_ptr, bnc_ptr, out_ptr,
                   n_channels, BLOCK: tl.constexpr):
    # out[ch] = sum over the runs e of channel ch (in order) of part[first[e] + i*stride[e]], i < count[e]
    pid = tl.program_id(0).to(tl.int64)
    ch = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = ch < n_channels
    s0 = tl.load(start_ptr + ch, mask=ok, other=0)
    ne = tl.load(start_ptr + ch + 1, mask=ok, other=0) - s0
    n_runs = tl.load(bne_ptr + pid)
    n_len = tl.load(bnc_ptr + pid)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for e in range(0, n_runs):
        m = ok & (e < ne)
        f = tl.load(first_ptr + s0 + e, mask=m, other=0)
        c = tl.load(count_ptr + s0 + e, mask=m, other=0)
        st = tl.load(stride_ptr + s0 + e, mask=m, other=0)
        for i in range(0, n_len):
            mm = m & (i < c)
            acc += tl.load(part_ptr + f + i * st, mask=mm, other=0.0)
    tl.store(out_ptr + ch, acc, mask=ok)


def _gamma_kernel(sums_ptr, goff_ptr, out_ptr, reg, alpha, rtol, BLOCK: tl.constexpr):
    # one program per group: n = sqrt(sums); out = reg * 2 ** (alpha * (nmax - n) / (nmax - nmin)), or reg
    # where the group is flat: one channel, or not (spread > rtol * nmax) (covers NaN and inf)
    gid = tl.program_id(0).to(tl.int64)
    lo = tl.load(goff_ptr + gid)
    hi = tl.load(goff_ptr + gid + 1)
    r = tl.arange(0, BLOCK).to(tl.int64)
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    vmin = tl.full([BLOCK], float("inf"), tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for c0 in range(lo, hi, BLOCK):
        ch = c0 + r
        m = ch < hi
        n = tl.sqrt_rn(tl.load(sums_ptr + ch, mask=m, other=0.0))
        vmax = tl.maximum(vmax, tl.where(m, n, float("-inf")))
        vmin = tl.minimum(vmin, tl.where(m, n, float("inf")))
        bad = bad | (m & (n != n)).to(tl.int32)  # max/min may drop a NaN: remember it
    nmax = tl.max(vmax, axis=0)
    nmin = tl.min(vmin, axis=0)
    spread = nmax - nmin
    # products of 0/1 rather than `&` of scalar booleans, which the interpreter rejects
    keep = tl.where(spread > rtol * nmax, 1, 0) * tl.where(tl.max(bad, axis=0) == 0, 1, 0) * tl.where(hi - lo > 1, 1, 0)
    spread_ok = keep != 0
    for c0 in range(lo, hi, BLOCK):
        ch = c0 + r
        m = ch < hi
        n = tl.sqrt_rn(tl.load(sums_ptr + ch, mask=m, other=0.0))
        e = tl.where(m, (nmax - n) / tl.where(spread_ok, spread, 1.0) * alpha, 0.0)
        e = tl.where(spread_ok, e, 0.0)
        tl.store(out_ptr + ch, reg * tl.exp2(e), mask=m)


def _lasso_kernel(sums_ptr, count_ptr, out_ptr, n_channels, reg, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ch = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = ch < n_channels
    s = tl.load(sums_ptr + ch, mask=m, other=0.0)
    cnt = tl.load(count_ptr + ch, mask=m, other=0.0)
    has = cnt > 0
    q = s / tl.where(has, cnt, 1.0)
    coef = reg / tl.sqrt_rn(q + 1e-9)
    tl.store(out_ptr + ch, tl.where(has, coef, 0.0), mask=m)


def _slot_sums_kernel(table_ptr, work_ptr, part_ptr, DTYPE: tl.constexpr, CH_FAST: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    item = work_ptr + pid * 5
    s = tl.load(item)
    i0 = tl.load(item + 1).to(tl.int32)
    k0 = tl.load(item + 2).to(tl.int32)
    k1 = tl.load(item + 3).to(tl.int32)
    p0 = tl.load(item + 4)
    row = table_ptr + s * 16
    base = tl.load(row)
    n_g = tl.load(row + 2).to(tl.int32)
    n_c = tl.load(row + 4).to(tl.int32)
    n_b = tl.load(row + 5).to(tl.int32)
    st_g = tl.load(row + 6)
    st_a = tl.load(row + 7)
    st_c = tl.load(row + 8)
    if DTYPE == 0:
        w_ptr = base.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        w_ptr = base.to(tl.pointer_type(tl.float16))
    elif DTYPE == 2:
        w_ptr = base.to(tl.pointer_type(tl.bfloat16))
    else:
        w_ptr = base.to(tl.pointer_type(tl.float64))
    ACC = tl.float64 if DTYPE == 3 else tl.float32

    idx = i0 + tl.arange(0, BLOCK_C)  # slot channel g*C + c
    c_ok = idx < n_g * n_c
    g = idx // n_c
    c_off = g.to(tl.int64) * st_g + (idx - g * n_c).to(tl.int64) * st_c
    kr = tl.arange(0, BLOCK_K)
    if CH_FAST:
        acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
    for kk in range(k0, k1, BLOCK_K):
        k = kk + kr
        a = k // n_b
        k_off = a.to(tl.int64) * st_a + (k - a * n_b).to(tl.int64)
        k_ok = k < k1
        if CH_FAST:
            m = k_ok[:, None] & c_ok[None, :]
            x = tl.load(w_ptr + (k_off[:, None] + c_off[None, :]), mask=m, other=0.0).to(ACC)
        else:
            m = c_ok[:, None] & k_ok[None, :]
            x = tl.load(w_ptr + (c_off[:, None] + k_off[None, :]), mask=m, other=0.0).to(ACC)
        acc += x * x
    if CH_FAST:
        part = tl.sum(acc, axis=0)
    else:
        part = tl.sum(acc, axis=1)
    tl.store(part_ptr + p0 + (idx - i0).to(tl.int64), part.to(tl.float32), mask=c_ok)


def _slot_update_kernel(table_ptr, work_ptr, slist_ptr, coef_ptr, scale_ptr, reg, DTYPE: tl.constexpr,
                   SIGN: tl.constexpr, TO_PARAM: tl.constexpr, HAS_SCALE: tl.constexpr,
                   IDX32: tl.constexpr, BLOCK: tl.constexpr):
    # One work item = one tile [q0, q1) of a parameter, in element positions relative to the W_PTR of the
    # parameter's first update slot. slist rows (slot, delta): the slot's position of element q is q + delta.
    pid = tl.program_id(0).to(tl.int64)
    item = work_ptr + pid * 4
    l0 = tl.load(item)
    l1 = tl.load(item + 1)
    q0 = tl.load(item + 2)
    q1 = tl.load(item + 3)
    s0 = tl.load(slist_ptr + l0 * 2)
    row0 = table_ptr + s0 * 16
    wbase = tl.load(row0)
    gbase = tl.load(row0 + 1)
    tbase = wbase if TO_PARAM else gbase
    if DTYPE == 0:
        w_ptr = wbase.to(tl.pointer_type(tl.float32))
        t_ptr = tbase.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        w_ptr = wbase.to(tl.pointer_type(tl.float16))
        t_ptr = tbase.to(tl.pointer_type(tl.float16))
    elif DTYPE == 2:
        w_ptr = wbase.to(tl.pointer_type(tl.bfloat16))
        t_ptr = tbase.to(tl.pointer_type(tl.bfloat16))
    else:
        w_ptr = wbase.to(tl.pointer_type(tl.float64))
        t_ptr = tbase.to(tl.pointer_type(tl.float64))
    ACC = tl.float64 if DTYPE == 3 else tl.float32
    IT = tl.int32 if IDX32 else tl.int64
    r = tl.arange(0, BLOCK).to(tl.int64)
    # parameters without .grad are skipped whatever the target (a block, not a scalar: the interpreter
    # turns `block & scalar-bool` into an int64 mask)
    live = (r * 0 + gbase) != 0
    for qq in range(q0, q1, BLOCK):
        q = qq + r
        in_tile = (q < q1) & live
        fac = tl.zeros([BLOCK], dtype=ACC)
        n_hit = tl.zeros([BLOCK], dtype=tl.int32)
        for li in range(l0, l1):
            s = tl.load(slist_ptr + li * 2)
            delta = tl.load(slist_ptr + li * 2 + 1)
            row = table_ptr + s * 16
            n_a = tl.load(row + 3).to(IT)
            n_c = tl.load(row + 4).to(IT)
            n_b = tl.load(row + 5).to(IT)
            st_a = tl.load(row + 7).to(IT)
            n_rows = tl.load(row + 2).to(IT) * n_a
            p = tl.maximum(q + delta, 0).to(IT)  # int32 division is much cheaper than int64 on GPUs
            a = p // st_a  # g*A + a: the stride of g is A*stride_a
            col = p - a * st_a
            ok = in_tile & (q + delta >= 0) & (a < n_rows) & (col < n_c * n_b)
            idx = (a // n_a) * n_c + col // n_b  # slot channel g*C + c
            if SIGN:
                f = tl.zeros([BLOCK], dtype=ACC) + reg
            else:
                chan = tl.load(row + 9)
                f = tl.load(coef_ptr + chan + idx, mask=ok, other=0.0).to(ACC)
            if HAS_SCALE:
                f = f * tl.load(scale_ptr + s).to(ACC)
            fac += tl.where(ok, f, 0.0)
            n_hit += ok.to(tl.int32)
        hit = n_hit > 0
        w = tl.load(w_ptr + q, mask=hit, other=0.0).to(ACC)
        t = tl.load(t_ptr + q, mask=hit, other=0.0).to(ACC)
        if SIGN:
            d = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0)).to(ACC)
        else:
            d = w
        tl.store(t_ptr + q, (t + fac * d).to(t_ptr.dtype.element_ty), mask=hit)


_RAW = {
    "mat_sums": _mat_sums_kernel,
    "mat_update": _mat_update_kernel,
    "gather": _gather_kernel,
    "colsum": _colsum_kernel,
    "reduce": _reduce_kernel,
    "gamma": _gamma_kernel,
    "lasso": _lasso_kernel,
    "slot_sums": _slot_sums_kernel,
    "slot_update": _slot_update_kernel,
}
_HELPERS = {"_elem_ptr": _elem_ptr, "_tile_item": _tile_item, "_vec_bounds": _vec_bounds,
            "_sums_tile": _sums_tile, "_update_tile": _update_tile}
_JITTED: dict = {}

# argument types of each kernel (constexprs excepted), for ahead-of-time compilation (static_report)
SIGNATURES = {
    "mat_sums": {"table_ptr": "*i64", "work_ptr": "*i64", "part_ptr": "*fp32"},
    "mat_update": {"table_ptr": "*i64", "work_ptr": "*i64", "coef_ptr": "*fp32"},
    "gather": {"upd_ptr": "*i64", "sid_ptr": "*i64", "coef_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32",
               "n": "i32", "reg": "fp32"},
    "colsum": {"part_ptr": "*fp32", "work_ptr": "*i64"},
    "reduce": {"part_ptr": "*fp32", "first_ptr": "*i64", "count_ptr": "*i64", "stride_ptr": "*i64",
               "start_ptr": "*i64", "bne_ptr": "*i64", "bnc_ptr": "*i64", "out_ptr": "*fp32", "n_channels": "i32"},
    "gamma": {"sums_ptr": "*fp32", "goff_ptr": "*i64", "out_ptr": "*fp32", "reg": "fp32", "alpha": "fp32",
              "rtol": "fp32"},
    "lasso": {"sums_ptr": "*fp32", "count_ptr": "*fp32", "out_ptr": "*fp32", "n_channels": "i32", "reg": "fp32"},
    "slot_sums": {"table_ptr": "*i64", "work_ptr": "*i64", "part_ptr": "*fp32"},
    "slot_update": {"table_ptr": "*i64", "work_ptr": "*i64", "slist_ptr": "*i64", "coef_ptr": "*fp32",
                    "scale_ptr": "*fp32", "reg": "fp32"},
}


def _bind(decorate) -> dict:
    """The kernels decorated with `decorate`, each a copy of its function whose globals name the
    decorated helpers (so interpreted and compiled copies can live in one process)."""
    env = dict(globals())

    def rebound(fn):
        copy = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__module__, copy.__qualname__, copy.__annotations__ = fn.__module__, fn.__qualname__, fn.__annotations__
        return decorate(copy)

    env.update({name: rebound(fn) for name, fn in _HELPERS.items()})
    return {name: rebound(fn) for name, fn in _RAW.items()}


def _kernels() -> dict:
    if not _JITTED:
        _JITTED.update(_bind(triton.jit))
    return _JITTED


def compiled_kernels() -> dict:
    """The kernels as `triton.runtime.JITFunction`s whatever TRITON_INTERPRET says, for
    `triton.compile(ASTSource(...))` (which needs a process where triton was imported without it)."""
    from triton.runtime.jit import JITFunction

    return _bind(JITFunction)


# constexprs of each launch: the launchers and `launch_specs` share these
def _mat_consts(code: int, kernel: str) -> dict:
    t = tile_for(code, kernel)
    return {"BR": t.br, "BJ": t.bj, "VEC": VEC[code]}


def _slot_sums_consts(code: int, ch_fast: bool) -> dict:
    block_c, block_k, _ = _SLOT_TILES["cols" if ch_fast else "rows"]
    return {"DTYPE": code, "CH_FAST": ch_fast, "BLOCK_C": block_c, "BLOCK_K": block_k}


# ------------------------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """Launch metadata for one GroupBuffers, all derived from host-side structure."""

    n_channels: int
    n_groups: int
    mat_sums: list = field(default_factory=list)  # (dtype code, work, n_items)
    mat_update: list = field(default_factory=list)  # (dtype code, work, n_items)
    colsum: tuple | None = None  # (work, n_items)
    n_parts: int = 0
    red: tuple = ()  # first, count, stride, start, bne, bnc (device int64)
    n_red_blocks: int = 0
    pos_upd: torch.Tensor | None = None
    pos_sid: torch.Tensor | None = None
    gathered: torch.Tensor | None = None
    n_pos: int = 0
    slot_sums: list = field(default_factory=list)  # (dtype code, ch_fast, work, n_items)
    slot_update: list = field(default_factory=list)  # (dtype code, idx32, work, slist, n_items)
    n_units: int = 0
    n_slot_params: int = 0


def _slot_sums_items(s: int, geo, first_partial: int, tile) -> tuple[list, int, list]:
    """Work items of importance slot `s` and the (channel-in-slot, partial) pairs they write."""
    block_c, _, item_k = tile
    n_ch, n_k = geo.G * geo.C, geo.A * geo.B
    items, owners = [], []
    p = first_partial
    for k0 in range(0, n_k, item_k):
        k1 = min(n_k, k0 + item_k)
        for i0 in range(0, n_ch, block_c):
            nc = min(block_c, n_ch - i0)
            items.append([s, i0, k0, k1, p])
            owners.append((i0, nc, p))
            p += nc
    return items, p, owners


def _build_slot_path(bufs, plan: _Plan, rest: list[int], first_partial: int) -> torch.Tensor:
    """Generic per-slot work for the slots in `rest`; returns their reduction entries [n, 4]."""
    dev = bufs.device
    codes = [DTYPE_CODES[p.dtype] for _, _, p in bufs.entries]
    groups: dict[tuple[int, bool], list] = {}
    entries = []
    p = first_partial
    for s in rest:
        (_, slot, _), geo, flags = bufs.entries[s], bufs.geometries[s], bufs.flags[s]
        if not flags & FLAG_IMPORTANCE or geo.numel == 0:
            continue
        if geo.G * geo.C > _INT32_MAX or geo.A * geo.B > _INT32_MAX:
            raise ValueError(f"tritonprune.kernels.triton_impl: slot {slot.name} has a channel with over 2**31 "
                             "elements; use backend='torch'")
        ch_fast = geo.B == 1
        items, p, owners = _slot_sums_items(s, geo, p, _SLOT_TILES["cols" if ch_fast else "rows"])
        groups.setdefault((codes[s], ch_fast), []).extend(items)
        for i0, nc, pp in owners:
            ch = torch.arange(nc) + bufs.chans[s] + i0
            entries.append(torch.stack([ch, torch.arange(nc) + pp, torch.ones_like(ch), torch.zeros_like(ch)], 1))
    plan.n_parts = p
    for (code, ch_fast), items in sorted(groups.items()):
        work = torch.tensor(items, dtype=torch.int64).reshape(-1, _SQ_COLS)
        plan.slot_sums.append((code, ch_fast, work.to(dev), len(items)))

    by_param: dict[int, list[int]] = {}
    for s in rest:
        (_, slot, prm), geo, flags = bufs.entries[s], bufs.geometries[s], bufs.flags[s]
        if geo.stride_c != geo.B or geo.stride_g != geo.A * geo.stride_a:
            # the update walks the parameter's memory and relies on the dense [G*A, C*B] row structure
            raise ValueError(f"tritonprune.kernels.triton_impl: slot {slot.name} has an unexpected geometry {geo}; "
                             "use backend='torch'")
        if flags & FLAG_UPDATE and geo.numel:
            by_param.setdefault(id(prm), []).append(s)
    plan.n_slot_params = len({id(bufs.entries[s][2]) for s in rest})
    up: dict[int, tuple[list, list]] = {}
    small: dict[int, bool] = {}  # per dtype: every parameter's positions fit in int32
    for slots in by_param.values():
        s0 = slots[0]
        off0 = bufs.geometries[s0].offset
        items, slist = up.setdefault(codes[s0], ([], []))
        l0 = len(slist)
        lo = hi = None
        for s in slots:
            geo = bufs.geometries[s]
            delta = off0 - geo.offset  # slot position = q + delta
            extent = (geo.G * geo.A - 1) * geo.stride_a + geo.C * geo.B
            lo = -delta if lo is None else min(lo, -delta)
            hi = extent - delta if hi is None else max(hi, extent - delta)
            slist.append([s, delta])
        small[codes[s0]] = small.get(codes[s0], True) and -_INT32_MAX < lo and hi < _INT32_MAX
        for q0 in range(lo, hi, _SLOT_TILES["up_item"]):
            items.append([l0, len(slist), q0, min(hi, q0 + _SLOT_TILES["up_item"])])
    for code, (items, slist) in sorted(up.items()):
        plan.slot_update.append((
            code, small[code],
            torch.tensor(items, dtype=torch.int64).reshape(-1, _UP_COLS).to(dev),
            torch.tensor(slist, dtype=torch.int64).reshape(-1, 2).to(dev),
            len(items),
        ))
    return torch.cat(entries) if entries else torch.zeros(0, 4, dtype=torch.int64)


def _reduction(plan: _Plan, entries: torch.Tensor, dev: torch.device) -> None:
    """CSR of the partial runs per flat channel (stable: the order of `entries` within a channel) and
    per block of _RED_BLOCK channels the largest run count and run length."""
    n = plan.n_channels
    order = torch.sort(entries[:, 0], stable=True).indices
    e = entries[order]
    counts = torch.bincount(e[:, 0], minlength=n)
    start = torch.zeros(n + 1, dtype=torch.int64)
    start[1:] = torch.cumsum(counts, 0)
    n_blocks = max(1, -(-n // _RED_BLOCK))
    padded = torch.zeros(n_blocks * _RED_BLOCK, dtype=torch.int64)
    padded[:n] = counts
    bne = padded.view(n_blocks, _RED_BLOCK).amax(1)
    blk = torch.div(e[:, 0], _RED_BLOCK, rounding_mode="floor")
    bnc = torch.zeros(n_blocks, dtype=torch.int64).scatter_reduce_(0, blk, e[:, 2], "amax")
    plan.red = tuple(t.contiguous().to(dev) for t in (e[:, 1], e[:, 2], e[:, 3], start, bne, bnc))
    plan.n_red_blocks = n_blocks


def _build_plan(bufs) -> _Plan:
    dev = bufs.device
    plan = _Plan(n_channels=bufs.n_channels, n_groups=bufs.n_groups)
    units, rest = split_params(bufs, MATRIX_PATH)
    mp = build_matrix_plan(bufs, units)
    plan.n_units = len(units)
    for code, rows in sorted(mp.sums.items()):
        plan.mat_sums.append((code, torch.tensor(rows, dtype=torch.int64).reshape(-1, SUMS_COLS).to(dev), len(rows)))
    for code, rows in sorted(mp.update.items()):
        plan.mat_update.append((code, torch.tensor(rows, dtype=torch.int64).reshape(-1, UPD_COLS).to(dev), len(rows)))
    if mp.colsum:
        plan.colsum = (torch.tensor(mp.colsum, dtype=torch.int64).reshape(-1, COLSUM_COLS).to(dev), len(mp.colsum))
    slot_entries = _build_slot_path(bufs, plan, rest, mp.n_parts)
    entries = torch.cat(mp.entries + [slot_entries]) if mp.entries else slot_entries
    _reduction(plan, entries, dev)
    plan.n_pos = mp.n_pos
    if mp.pos_upd:
        plan.pos_upd = torch.cat(mp.pos_upd).to(dev)
        plan.pos_sid = torch.cat(mp.pos_sid).to(dev)
    plan.gathered = torch.zeros(max(1, mp.n_pos), dtype=torch.float32, device=dev)
    return plan


def _plan(bufs) -> _Plan:
    if bufs.table.shape[1:] != (N_COLS,):
        raise ValueError(f"tritonprune.kernels.triton_impl: table has {bufs.table.shape[1]} columns, expected {N_COLS}")
    key = (bufs.n_slots, bufs.n_channels, id(bufs.table), MATRIX_PATH)
    hit = bufs.cache.get("triton")
    if hit is None or hit[0] != key:
        check_available(bufs.device)
        hit = (key, _build_plan(bufs))
        bufs.cache["triton"] = hit
    return hit[1]


class _guard:
    """`torch.cuda.device(dev)` on CUDA, nothing elsewhere."""

    def __init__(self, dev: torch.device):
        self.ctx = torch.cuda.device(dev) if dev.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ------------------------------------------------------------------------------------ specializations


def _sums_specs(plan: _Plan) -> list[tuple[Spec, object]]:
    out = [(Spec("mat_sums", "sums", tuple({"DTYPE": code, **_mat_consts(code, "sums")}.items())), (work, n))
           for code, work, n in plan.mat_sums]
    if plan.colsum is not None:
        out.append((Spec("colsum", "other", (("BLOCK", COLSUM_BLOCK),)), plan.colsum))
    out += [(Spec("slot_sums", "other", tuple(_slot_sums_consts(code, ch_fast).items())), (work, n))
            for code, ch_fast, work, n in plan.slot_sums]
    out.append((Spec("reduce", "other", (("BLOCK", _RED_BLOCK),)), None))
    return out


def _update_specs(plan: _Plan, sign: bool, to_param: bool, has_scale: bool) -> list[tuple[Spec, object]]:
    out = []
    if plan.mat_update:
        out.append((Spec("gather", "other", (("SIGN", sign), ("HAS_SCALE", has_scale), ("BLOCK", _GATHER_BLOCK))),
                    None))
    for code, work, n in plan.mat_update:
        c = {"DTYPE": code, "SIGN": sign, "TO_PARAM": to_param, **_mat_consts(code, "update")}
        out.append((Spec("mat_update", "update", tuple(c.items())), (work, n)))
    for code, idx32, work, slist, n in plan.slot_update:
        c = {"DTYPE": code, "SIGN": sign, "TO_PARAM": to_param, "HAS_SCALE": has_scale, "IDX32": idx32,
             "BLOCK": _SLOT_TILES["up_block"]}
        out.append((Spec("slot_update", "other", tuple(c.items())), (work, slist, n)))
    return out


def launch_specs(bufs, regularizer: str, decoupled: bool = False) -> list[Spec]:
    """The kernel specializations one step of `regularizer` ("group_norm" | "group_lasso" | "bn_scale";
    `decoupled`: the target="param" form with a slot_scale) launches on `bufs`, in launch order.
    Builds the plan (host-side only); launches nothing."""
    if bufs.n_slots == 0:  # the engine launches nothing then
        return []
    plan = _plan_host(bufs)
    specs: list[Spec] = []
    if regularizer in ("group_norm", "group_lasso"):
        specs += [s for s, _ in _sums_specs(plan)]
        specs.append(Spec("gamma", "other", (("BLOCK", _GAMMA_BLOCK),)) if regularizer == "group_norm"
                     else Spec("lasso", "other", (("BLOCK", _LASSO_BLOCK),)))
    elif regularizer != "bn_scale":
        raise ValueError(f"tritonprune.kernels.triton_impl: unknown regularizer {regularizer!r}")
    specs += [s for s, _ in _update_specs(plan, regularizer == "bn_scale", decoupled, decoupled)]
    return specs


def _plan_host(bufs) -> _Plan:
    """The plan without the device check (listing specializations needs no device)."""
    hit = bufs.cache.get("triton")
    key = (bufs.n_slots, bufs.n_channels, id(bufs.table), MATRIX_PATH)
    if hit is not None and hit[0] == key:
        return hit[1]
    plan = _build_plan(bufs)
    bufs.cache["triton"] = (key, plan)
    return plan


# ---------------------------------------------------------------------------------------- backend API


def channel_sq_sums(bufs) -> torch.Tensor:
    """float32 [n_channels]: per flat channel, the sum of w**2 over the importance slots; one sums launch
    per dtype and one reduction; deterministic (fixed-order reduction of partials, no atomics).
    Returns `bufs.acc`, every channel written (overwritten by the next call), like the torch backend."""
    plan = _plan(bufs)
    out = bufs.acc
    if plan.n_channels == 0:
        return out
    k = _kernels()
    part = torch.empty(max(1, plan.n_parts), dtype=torch.float32, device=bufs.device)
    with _guard(bufs.device):
        for spec, payload in _sums_specs(plan):
            c = dict(spec.constexprs)
            if spec.kernel == "reduce":
                k["reduce"][(plan.n_red_blocks,)](part, *plan.red, out, plan.n_channels, **c)
            elif spec.kernel == "colsum":
                work, n = payload
                k["colsum"][(n,)](part, work, **c)
            else:
                work, n = payload
                k[spec.kernel][(n,)](bufs.table, work, part, **c, num_warps=NUM_WARPS)
    return out


def group_norm_coef(bufs, sums: torch.Tensor, reg: float, alpha: float) -> torch.Tensor:
    """float32 [n_channels]: reg * gamma per channel, one program per group (one launch)."""
    plan = _plan(bufs)
    out = torch.empty(plan.n_channels, dtype=torch.float32, device=bufs.device)
    if plan.n_channels == 0 or bufs.n_groups == 0:
        return out
    sums = sums.to(device=bufs.device, dtype=torch.float32).contiguous()
    with _guard(bufs.device):
        _kernels()["gamma"][(bufs.n_groups,)](sums, bufs.group_offsets, out, float(reg), float(alpha),
                                             FLAT_SPREAD_RTOL, BLOCK=_GAMMA_BLOCK)
    return out


def group_lasso_coef(bufs, sums_bn: torch.Tensor, reg: float) -> torch.Tensor:
    """float32 [n_channels]: reg / sqrt(sums_bn / n_importance_slots_bn + 1e-9), 0 without a BatchNorm slot."""
    plan = _plan(bufs)
    out = torch.empty(plan.n_channels, dtype=torch.float32, device=bufs.device)
    if plan.n_channels == 0:
        return out
    sums_bn = sums_bn.to(device=bufs.device, dtype=torch.float32).contiguous()
    count = bufs.n_importance_slots_bn.to(dtype=torch.float32).contiguous()
    with _guard(bufs.device):
        _kernels()["lasso"][(-(-plan.n_channels // _LASSO_BLOCK),)](sums_bn, count, out, plan.n_channels,
                                                                    float(reg), BLOCK=_LASSO_BLOCK)
    return out


def _update(bufs, coef, reg, sign: bool, target: str, slot_scale) -> None:
    if target not in ("grad", "param"):
        raise ValueError(f"tritonprune.kernels.triton_impl: target must be 'grad' or 'param', got {target!r}")
    plan = _plan(bufs)
    if slot_scale is not None:
        slot_scale = slot_scale.to(device=bufs.device, dtype=torch.float32).contiguous()
        if slot_scale.numel() != bufs.n_slots:
            raise ValueError(f"tritonprune.kernels.triton_impl: slot_scale has {slot_scale.numel()} entries, "
                             f"expected one per slot ({bufs.n_slots})")
    if coef is not None:
        coef = coef.to(device=bufs.device, dtype=torch.float32).contiguous()
        if coef.numel() != plan.n_channels:
            raise ValueError(f"tritonprune.kernels.triton_impl: coef has {coef.numel()} entries, expected one per "
                             f"channel ({plan.n_channels})")
    dummy = plan.gathered  # any float32 tensor: an unused pointer argument
    coef_arg = dummy if coef is None else coef
    scale_arg = dummy if slot_scale is None else slot_scale
    k = _kernels()
    with _guard(bufs.device):
        for spec, payload in _update_specs(plan, sign, target == "param", slot_scale is not None):
            c = dict(spec.constexprs)
            if spec.kernel == "gather":
                k["gather"][(-(-plan.n_pos // _GATHER_BLOCK),)](plan.pos_upd, plan.pos_sid, coef_arg, scale_arg,
                                                                plan.gathered, plan.n_pos, float(reg), **c)
            elif spec.kernel == "mat_update":
                work, n = payload
                k["mat_update"][(n,)](bufs.table, work, plan.gathered, **c, num_warps=NUM_WARPS)
            else:
                work, slist, n = payload
                k["slot_update"][(n,)](bufs.table, work, slist, coef_arg, scale_arg, float(reg), **c)


def add_scaled_(bufs, coef: torch.Tensor, *, target: str = "grad", slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * coef[c] * w on the update slots: a gather and one launch per parameter
    dtype; each element is updated once with the sum of its slots' terms, from w as it was before the call."""
    _update(bufs, coef, 0.0, False, target, slot_scale)


def add_sign_(bufs, reg: float, *, target: str = "grad", slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * reg * sign(w) on the update slots: a gather and one launch per dtype."""
    _update(bufs, None, reg, True, target, slot_scale)
