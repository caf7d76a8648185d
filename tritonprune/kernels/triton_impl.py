"""Triton backend: the five backend operations over GroupBuffers, each a fixed handful of launches.

A step never launches per group or per parameter. The launch metadata ("plan") is built once per
GroupBuffers from host-side structure only (`entries`, `geometries`, `flags`: no device read, no sync)
and kept in `bufs.cache["triton"]`; the kernels read the parameter and .grad addresses from `bufs.table`
at run time, so a pointer change (which GroupBuffers writes into the table) needs no new plan.

Launches per operation (one per dtype present among the slots involved; usually one dtype):

- `channel_sq_sums`: `_sumsq_kernel` over work items (slot, block of the slot's channels, tile of its
  A*B elements per channel) writes one fp32 partial per (item, channel) into a partials buffer; then
  `_reduce_kernel` sums, per flat channel, its partials in a fixed order (slot order, then tile order).
  The two tile orientations (channels along the fast thread axis when B == 1, elements otherwise) are
  two launches of the same kernel.
- `group_norm_coef`: `_gamma_kernel`, one program per group (min/max of the norms, then gamma).
- `group_lasso_coef`: `_lasso_kernel`, elementwise over channels.
- `add_scaled_` / `add_sign_`: `_update_kernel` over work items (parameter, tile of its elements): every
  element is read and written by exactly one program, which adds the contributions of all the update
  slots that cover it (a weight can be the out-rows of one group and the in-columns of another). So
  there are no races, `target="param"` reads each w before any write, and each element moves once.

Determinism: NO float atomics anywhere. Every sum is a register reduction inside one program or a
sequential loop in a fixed order, so the results are bitwise identical from run to run (on the same
device and Triton version).

Numerics: load as fp32 (fp64 for float64 parameters), compute in that type, cast on store. Element
offsets are int64 (tensors over 2**31 elements); per-slot tile coordinates are int32, which needs
G*C and A*B (the elements of one channel in one slot) below 2**31 (checked when the plan is built).

CUDA graphs: a step issues only kernel launches on the current stream and allocates its outputs with
`torch.empty` (served by the graph's private pool during capture); it never reads device memory on the
host, so `torch.cuda.graph` can capture `opt.step()`. Gradients must keep their addresses between
replays (`zero_grad(set_to_none=False)`), because the captured kernels read the pointer table as it was
filled before capture; `GroupBuffers.refresh_pointers` (host-only) must not find a change during
capture. Scalars (`reg`, `alpha`) are baked into a captured graph as kernel arguments.

torch.compile: the launchers are plain Python that calls `triton.jit` kernels with raw addresses read
from an int64 table, which Dynamo cannot trace as tensor dataflow; compile the training step with the
regularization outside the compiled region (the wrapper's `step()` is not compiled: Dynamo breaks the
graph around it), or mark the call with `torch.compiler.disable`. Not tested on a GPU here.

On CPU tensors the kernels run only under the Triton interpreter, which is how CI tests them.
`TRITON_INTERPRET=1` must be set before triton is first imported in the process (Triton decorates its
own library then); `check_available` says so if it was set too late.

Performance: not measured (written without a GPU; see bench/bench_triton_gpu.py). Known costs: a weight
that is the out-rows of one group and the in-columns of another is read once per importance slot by
the sums (the update reads it once); the sums' tile coordinates use one int32 division per element and
the update three per element and slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency, but CPU-only installs may lack it
    triton = None
    tl = None
    HAS_TRITON = False

from ..layout import DTYPE_CODES, FLAG_IMPORTANCE, FLAG_UPDATE, N_COLS

# work-table widths
_SQ_COLS = 5  # slot, first slot channel, k0, k1, first partial
_UP_COLS = 4  # first slot-list index, end slot-list index, q0, q1



@dataclass(frozen=True)
class _Tiles:
    rows: tuple[int, int, int]  # (BLOCK_C, BLOCK_K, K elements per item) for slots with B > 1
    cols: tuple[int, int, int]  # the same for B == 1 (consecutive channels contiguous: CH_FAST)
    up_block: int  # update: elements per loop iteration
    up_item: int  # update: elements per work item


_GPU_TILES = _Tiles(rows=(8, 256, 4096), cols=(64, 32, 512), up_block=1024, up_item=16384)
# The interpreter pays Python time per program and per op, whatever the block size: fewer, wider programs.
# Items still take several loop iterations, so the loops are exercised the same way.
_INTERP_TILES = _Tiles(rows=(64, 512, 4096), cols=(256, 64, 512), up_block=4096, up_item=16384)
_RED_BLOCK = 128  # channels per program in the partial reduction
_GAMMA_BLOCK = 256
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
# Kernels are plain functions decorated on first use (`_kernels`), so importing this module costs no
# Triton work and a process without a GPU can import it freely. They call no jit helpers of their own.


def _sumsq_kernel(table_ptr, work_ptr, part_ptr, DTYPE: tl.constexpr, CH_FAST: tl.constexpr,
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


def _reduce_kernel(part_ptr, pidx_ptr, pstart_ptr, blen_ptr, out_ptr, n_channels, BLOCK: tl.constexpr):
    # out[ch] = sum of part[pidx[j]] for j in [pstart[ch], pstart[ch+1]), summed sequentially in j order
    pid = tl.program_id(0).to(tl.int64)
    ch = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = ch < n_channels
    start = tl.load(pstart_ptr + ch, mask=ok, other=0)
    count = tl.load(pstart_ptr + ch + 1, mask=ok, other=0) - start
    n = tl.load(blen_ptr + pid)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, n):
        m = ok & (j < count)
        p = tl.load(pidx_ptr + start + j, mask=m, other=0)
        acc += tl.load(part_ptr + p, mask=m, other=0.0)
    tl.store(out_ptr + ch, acc, mask=ok)


def _gamma_kernel(sums_ptr, goff_ptr, out_ptr, reg, alpha, BLOCK: tl.constexpr):
    # one program per group: n = sqrt(sums); out = reg * 2 ** (alpha * (nmax - n) / (nmax - nmin))
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
        bad = bad | (m & (n != n)).to(tl.int32)  # a NaN norm makes the spread non-finite, as in torch
    nmax = tl.max(vmax, axis=0)
    nmin = tl.min(vmin, axis=0)
    spread = nmax - nmin
    flat = (tl.max(bad, axis=0) > 0) | (spread == 0) | (spread != spread) | (tl.abs(spread) == float("inf"))
    for c0 in range(lo, hi, BLOCK):
        ch = c0 + r
        m = ch < hi
        n = tl.sqrt_rn(tl.load(sums_ptr + ch, mask=m, other=0.0))
        e = tl.where(flat | (m == 0), 0.0, (nmax - n) / tl.where(flat, 1.0, spread) * alpha)  # torch's op order
        gamma = tl.exp2(e)
        tl.store(out_ptr + ch, reg * gamma, mask=m)


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


def _update_kernel(table_ptr, work_ptr, slist_ptr, coef_ptr, scale_ptr, reg, DTYPE: tl.constexpr,
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
    "sumsq": _sumsq_kernel,
    "reduce": _reduce_kernel,
    "gamma": _gamma_kernel,
    "lasso": _lasso_kernel,
    "update": _update_kernel,
}
_JITTED: dict = {}


def _kernels() -> dict:
    if not _JITTED:
        _JITTED.update({name: triton.jit(fn) for name, fn in _RAW.items()})
    return _JITTED


# ------------------------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """Launch metadata for one GroupBuffers, all derived from host-side structure."""

    n_channels: int
    tiles: _Tiles
    sumsq: list = field(default_factory=list)  # (dtype, ch_fast, work[int64 device], n_items)
    n_partials: int = 0
    pidx: torch.Tensor | None = None
    pstart: torch.Tensor | None = None
    blen: torch.Tensor | None = None
    update: list = field(default_factory=list)  # (dtype, idx32, work, slist, n_items)


def _sumsq_items(s: int, geo, first_partial: int, tile) -> tuple[list, int, list]:
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


def _build_plan(bufs) -> _Plan:
    dev = bufs.device
    n_channels = bufs.n_channels
    tiles = _INTERP_TILES if _interpreting() else _GPU_TILES
    plan = _Plan(n_channels=n_channels, tiles=tiles)
    chans = bufs.chans  # host copy of the CHAN column
    codes = [DTYPE_CODES[prm.dtype] for _, _, prm in bufs.entries]

    # -- sums of squares: items per (dtype, orientation); partial ids are global across launches
    groups: dict[tuple[int, bool], list] = {}
    ch_list, p_list = [], []  # flat channel and partial id, in (slot, tile) order per channel
    p = 0
    for s, ((_, slot, _), geo, flags) in enumerate(zip(bufs.entries, bufs.geometries, bufs.flags)):
        if not flags & FLAG_IMPORTANCE or geo.numel == 0:
            continue
        if geo.G * geo.C > _INT32_MAX or geo.A * geo.B > _INT32_MAX:
            raise ValueError(f"tritonprune.kernels.triton_impl: slot {slot.name} has a channel with over 2**31 "
                             "elements; use backend='torch'")
        ch_fast = geo.B == 1
        items, p_end, owners = _sumsq_items(s, geo, p, tiles.cols if ch_fast else tiles.rows)
        groups.setdefault((codes[s], ch_fast), []).extend(items)
        for i0, nc, pp in owners:
            ch_list.append(torch.arange(nc) + chans[s] + i0)
            p_list.append(torch.arange(nc) + pp)
        p = p_end
    plan.n_partials = p
    for (code, ch_fast), items in sorted(groups.items()):
        work = torch.tensor(items, dtype=torch.int64).reshape(-1, _SQ_COLS)
        plan.sumsq.append((code, ch_fast, work.to(dev), len(items)))
    if ch_list:
        chs, pids = torch.cat(ch_list), torch.cat(p_list)
    else:
        chs = pids = torch.zeros(0, dtype=torch.int64)
    order = torch.sort(chs, stable=True).indices  # keeps (slot, tile) order within a channel
    counts = torch.bincount(chs, minlength=n_channels)
    pstart = torch.zeros(n_channels + 1, dtype=torch.int64)
    pstart[1:] = torch.cumsum(counts, 0)
    n_blocks = max(1, -(-n_channels // _RED_BLOCK))
    padded = torch.zeros(n_blocks * _RED_BLOCK, dtype=torch.int64)
    padded[:n_channels] = counts
    plan.pidx = pids[order].to(dev)
    plan.pstart = pstart.to(dev)
    plan.blen = padded.reshape(n_blocks, _RED_BLOCK).amax(1).to(dev)

    # -- update: items per (dtype) over tiles of each parameter's update slots
    by_param: dict[int, list[int]] = {}
    for s, ((_, slot, prm), flags) in enumerate(zip(bufs.entries, bufs.flags)):
        geo = bufs.geometries[s]
        if geo.stride_c != geo.B or geo.stride_g != geo.A * geo.stride_a:
            # the update walks the parameter's memory and relies on the dense [G*A, C*B] row structure
            raise ValueError(f"tritonprune.kernels.triton_impl: slot {slot.name} has an unexpected geometry {geo}; "
                             "use backend='torch'")
        if flags & FLAG_UPDATE and geo.numel:
            by_param.setdefault(id(prm), []).append(s)
    up: dict[int, tuple[list, list]] = {}
    small: dict[int, bool] = {}  # per dtype: every parameter's positions fit in int32
    for slots in by_param.values():
        s0 = slots[0]
        off0 = bufs.geometries[s0].offset
        items, slist = up.setdefault(codes[s0], ([], []))
        l0 = len(slist)
        lo, hi = None, None
        for s in slots:
            geo = bufs.geometries[s]
            delta = off0 - geo.offset  # slot position = q + delta
            extent = (geo.G * geo.A - 1) * geo.stride_a + geo.C * geo.B
            lo = -delta if lo is None else min(lo, -delta)
            hi = extent - delta if hi is None else max(hi, extent - delta)
            slist.append([s, delta])
        small[codes[s0]] = small.get(codes[s0], True) and -_INT32_MAX < lo and hi < _INT32_MAX
        for q0 in range(lo, hi, tiles.up_item):
            items.append([l0, len(slist), q0, min(hi, q0 + tiles.up_item)])
    for code, (items, slist) in sorted(up.items()):
        plan.update.append((
            code,
            small[code],
            torch.tensor(items, dtype=torch.int64).reshape(-1, _UP_COLS).to(dev),
            torch.tensor(slist, dtype=torch.int64).reshape(-1, 2).to(dev),
            len(items),
        ))
    return plan


def _plan(bufs) -> _Plan:
    if bufs.table.shape[1:] != (N_COLS,):
        raise ValueError(f"tritonprune.kernels.triton_impl: table has {bufs.table.shape[1]} columns, expected {N_COLS}")
    key = (bufs.n_slots, bufs.n_channels, id(bufs.table))
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


# ---------------------------------------------------------------------------------------- backend API


def channel_sq_sums(bufs) -> torch.Tensor:
    """float32 [n_channels]: per flat channel, the sum of w**2 over the importance slots (2 launches + 1
    per extra dtype/orientation); deterministic (fixed-order reduction of partials, no atomics).
    Returns `bufs.acc`, every channel written (overwritten by the next call), like the torch backend."""
    plan = _plan(bufs)
    out = bufs.acc
    if plan.n_channels == 0:
        return out
    k = _kernels()
    part = torch.empty(max(1, plan.n_partials), dtype=torch.float32, device=bufs.device)
    with _guard(bufs.device):
        for code, ch_fast, work, n_items in plan.sumsq:
            block_c, block_k, _ = plan.tiles.cols if ch_fast else plan.tiles.rows
            k["sumsq"][(n_items,)](bufs.table, work, part, DTYPE=code, CH_FAST=ch_fast,
                                   BLOCK_C=block_c, BLOCK_K=block_k)
        k["reduce"][(plan.blen.numel(),)](part, plan.pidx, plan.pstart, plan.blen, out, plan.n_channels,
                                         BLOCK=_RED_BLOCK)
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
                                             BLOCK=_GAMMA_BLOCK)
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
        _kernels()["lasso"][(-(-plan.n_channels // 1024),)](sums_bn, count, out, plan.n_channels, float(reg),
                                                            BLOCK=1024)
    return out


def _update(bufs, coef, reg, sign: bool, target: str, slot_scale) -> None:
    if target not in ("grad", "param"):
        raise ValueError(f"tritonprune.kernels.triton_impl: target must be 'grad' or 'param', got {target!r}")
    plan = _plan(bufs)
    if not plan.update:
        return
    if slot_scale is not None:
        slot_scale = slot_scale.to(device=bufs.device, dtype=torch.float32).contiguous()
        if slot_scale.numel() != bufs.n_slots:
            raise ValueError(f"tritonprune.kernels.triton_impl: slot_scale has {slot_scale.numel()} entries, "
                             f"expected one per slot ({bufs.n_slots})")
    if coef is not None:
        coef = coef.to(device=bufs.device, dtype=torch.float32).contiguous()
    dummy = bufs.table  # any tensor: an unused pointer argument
    k = _kernels()["update"]
    with _guard(bufs.device):
        for code, idx32, work, slist, n_items in plan.update:
            k[(n_items,)](bufs.table, work, slist, dummy if coef is None else coef,
                          dummy if slot_scale is None else slot_scale, float(reg), DTYPE=code, SIGN=sign,
                          TO_PARAM=target == "param", HAS_SCALE=slot_scale is not None, IDX32=idx32,
                          BLOCK=plan.tiles.up_block)


def add_scaled_(bufs, coef: torch.Tensor, *, target: str = "grad", slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * coef[c] * w on the update slots: one launch per parameter dtype; each
    element is updated once with the sum of its slots' terms, from w as it was before the call."""
    _update(bufs, coef, 0.0, False, target, slot_scale)


def add_sign_(bufs, reg: float, *, target: str = "grad", slot_scale: torch.Tensor | None = None) -> None:
    """target += slot_scale[slot] * reg * sign(w) on the update slots: one launch per parameter dtype."""
    _update(bufs, None, reg, True, target, slot_scale)
