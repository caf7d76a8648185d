"""The C loops of kernels/cpu_native against plain torch formulas, on odd shapes and thread counts, and
the torch backend's use of them (and its fallback when they are off or cannot be built)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from test_engine_numerics import clone, grads, hand_groups, make, run

from tritonprune.kernels import cpu_native
from tritonprune.regularizing.engine import Regularization
from tritonprune.regularizing.regularizers import GroupNorm

needs_native = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                  reason="no C compiler on this machine")

# (R, J, rows per conv group): a single row, a single column, primes, grouped (depthwise and 3 groups)
SHAPES = [(1, 1, 1), (1, 37, 1), (53, 1, 53), (31, 17, 31), (97, 389, 97), (12, 9, 1), (15, 22, 5), (256, 300, 256)]
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


@needs_native
def test_builds_where_a_compiler_exists():
    assert cpu_native.library() is not None, cpu_native.why_unavailable()
    assert cpu_native.why_unavailable() is None


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(R, J, generator=g, dtype=dtype) for R, J, _ in SHAPES]
    t = [torch.randn(R, J, generator=g, dtype=dtype) for R, J, _ in SHAPES]
    rowc = [torch.rand(R, generator=g) for R, _, _ in SHAPES]
    colc = [torch.rand((R // Rg) * J, generator=g) for R, J, Rg in SHAPES]
    return w, t, rowc, colc


def _col_view(x, R, J, Rg):  # [R, J] -> per (conv group, column): [G, Rg, J]
    return x.view(R // Rg, Rg, J)


@pytest.fixture(params=["openmp", "pthreads"])
def build(request, monkeypatch, tmp_path_factory):
    """The default build (OpenMP on torch's threads) and the plain-C fallback (POSIX threads)."""
    if request.param == "pthreads":
        monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("pthreads")))
        monkeypatch.setattr(cpu_native, "BUILDS", (("-march=native",), ()))
    cpu_native.reset()
    assert cpu_native.library() is not None, cpu_native.why_unavailable()
    yield request.param
    cpu_native.reset()


def _bind_and_run(table, w, t, rows, cols, rowc, colc, skip=None) -> list[torch.Tensor]:
    """Point the table's entries at these tensors (entry `skip` with no target and no sums), run both
    loops, and return the targets as they were before the update."""
    for i, m in enumerate(table.mats):
        m.w, m.t = w[i].data_ptr(), (None if i == skip else t[i].data_ptr())
        m.rows, m.cols = (None, None) if i == skip else (rows[i].data_ptr(), cols[i].data_ptr())
        m.rowc, m.colc = rowc[i].data_ptr(), colc[i].data_ptr()
    t0 = [x.clone() for x in t]
    table.sq_sums()
    table.update()
    return t0


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sums_and_update_match_torch(dtype, threads, build, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # 8: more threads than rows on some shapes
    w, t, rowc, colc = _case(dtype)
    table = cpu_native.Table(dtype, SHAPES)
    rows = [torch.full((R,), -1.0, dtype=dtype) for R, _, _ in SHAPES]
    cols = [torch.full(((R // Rg) * J,), -1.0, dtype=dtype) for R, J, Rg in SHAPES]
    skip = 2  # one entry neither summed nor updated: its outputs stay as they were
    t0 = _bind_and_run(table, w, t, rows, cols, rowc, colc, skip=skip)
    for i, (R, J, Rg) in enumerate(SHAPES):
        sq = w[i].double() ** 2
        if i == skip:
            assert (rows[i] == -1).all() and (cols[i] == -1).all() and torch.equal(t[i], t0[i])
            continue
        torch.testing.assert_close(rows[i].double(), sq.sum(1), **TOL[dtype])
        torch.testing.assert_close(cols[i].double(), _col_view(sq, R, J, Rg).sum(1).reshape(-1), **TOL[dtype])
        col_of_row = colc[i].double().view(R // Rg, 1, J).expand(-1, Rg, -1).reshape(R, J)
        coef = rowc[i].double()[:, None] + col_of_row
        torch.testing.assert_close(t[i].double(), t0[i].double() + coef * w[i].double(), **TOL[dtype])


@needs_native
def test_one_side_only_and_update_in_place():
    """Rows only / columns only, and t == w (the decoupled shrink reads each element before writing it)."""
    R, J = 7, 5
    w = torch.randn(R, J, dtype=torch.float64)
    rowc, colc = torch.rand(R), torch.rand(J)
    table = cpu_native.Table(torch.float64, [(R, J, R), (R, J, R)])
    w2, rows, cols = w.clone(), torch.zeros(R, dtype=torch.float64), torch.zeros(J, dtype=torch.float64)
    a, b = table.mats
    a.w, a.t, a.rowc, a.rows = w.data_ptr(), w.data_ptr(), rowc.data_ptr(), rows.data_ptr()
    b.w, b.t, b.colc, b.cols = w2.data_ptr(), w2.data_ptr(), colc.data_ptr(), cols.data_ptr()
    w0 = w.clone()
    table.sq_sums()
    table.update()
    torch.testing.assert_close(rows, (w0 ** 2).sum(1))
    torch.testing.assert_close(cols, (w0 ** 2).sum(0))
    torch.testing.assert_close(w, w0 + rowc.double()[:, None] * w0)
    torch.testing.assert_close(w2, w0 + colc.double()[None, :] * w0)


@needs_native
def test_engine_takes_the_c_loops_and_agrees_with_torch_ops(monkeypatch):
    from tritonprune.kernels import torch_impl

    m = make()
    eng = Regularization(native := clone(m), hand_groups(), GroupNorm(0.1), backend="torch")
    eng.apply_to_grads()
    plan = eng.buffers.cache["torch"].matrix
    assert plan.native and not plan.torch_mats  # every float32 weight of the hand net
    monkeypatch.setattr(torch_impl, "NATIVE", False)
    ops = run(m, GroupNorm(0.1), "torch")
    for k, v in grads(ops).items():
        torch.testing.assert_close(grads(native)[k], v, atol=1e-6, rtol=1e-5)


def test_switched_off_falls_back_silently(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    cpu_native.reset()
    try:
        assert cpu_native.library() is None
        assert "TRITONPRUNE_NATIVE=0" in cpu_native.why_unavailable()
        m = make()
        eng = Regularization(clone(m), hand_groups(), GroupNorm(0.1), backend="torch")
        eng.apply_to_grads()
        assert not eng.buffers.cache["torch"].matrix.native
    finally:
        monkeypatch.delenv(cpu_native.ENV_SWITCH)
        cpu_native.reset()


def test_failed_build_warns_once_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path))
    cpu_native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="CPU accelerator is unavailable"):
            assert cpu_native.library() is None
        assert "no-such-cc" in cpu_native.why_unavailable()
        m = make()
        ref, tor = grads(run(m, GroupNorm(0.1), "reference")), grads(run(m, GroupNorm(0.1), "torch"))
        for k in ref:
            torch.testing.assert_close(tor[k], ref[k], atol=1e-6, rtol=1e-5)
    finally:
        cpu_native.reset()


@needs_native
def test_cached_build_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path))
    cpu_native.reset()
    try:
        assert cpu_native.library() is not None
        built = list(tmp_path.glob("cpu_native-*.so"))
        assert len(built) == 1  # and no temporaries: the object and its size/SHA-256 sidecar only
        assert sorted(p.name for p in tmp_path.iterdir()) == [built[0].name, built[0].name + ".sha256"]
        stamp = built[0].stat().st_mtime_ns
        cpu_native.reset()
        assert cpu_native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        cpu_native.reset()


@needs_native
def test_in_place_writes_bump_the_version_counter():
    """A backward through a graph that saved a weight the decoupled shrink changed fails as with torch ops."""
    m = make()
    x = torch.randn(2, 3, 4, 4)
    out = m.conv3(m.conv2(m.conv1(x))).sum()  # conv weights saved for backward
    v = m.conv2.weight._version
    eng = Regularization(m, hand_groups(), GroupNorm(0.1, decoupled=True), backend="torch")
    eng.apply_decoupled({id(p): 0.5 for p in m.parameters()})
    assert eng.buffers.cache["torch"].matrix.native
    assert m.conv2.weight._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@needs_native
def test_unusable_cache_dir_falls_back_to_a_private_temp_dir(monkeypatch, tmp_path):
    (blocker := tmp_path / "a-file").write_text("")  # the cache dir cannot be created under a file
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu_native.reset()
    try:
        assert cpu_native.library() is not None, cpu_native.why_unavailable()
        assert len(list((tmp_path / "tmp").glob(f"tritonprune-{os.getuid()}/cpu_native-*.so"))) == 1
    finally:
        cpu_native.reset()


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
def test_same_thread_count_gives_bitwise_equal_sums(threads, monkeypatch):
    """Each thread's column partials are added in a fixed order: no float atomics, no run-to-run drift."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    w, _, _, _ = _case(torch.float32, seed=3)
    outs = []
    for _ in range(3):
        table = cpu_native.Table(torch.float32, SHAPES)
        rows = [torch.empty(R) for R, _, _ in SHAPES]
        cols = [torch.empty((R // Rg) * J) for R, J, Rg in SHAPES]
        for m, x, r, c in zip(table.mats, w, rows, cols):
            m.w, m.rows, m.cols = x.data_ptr(), r.data_ptr(), c.data_ptr()
        table.sq_sums()
        outs.append(torch.cat(rows + cols))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_compute_in_float32_and_round_once(dtype, threads, monkeypatch):
    """bf16/fp16 weights: sums in float32 of the widened values; t = round(t + (rowc + colc) * w) computed
    in float32, one rounding on store (what the contract asks: compute in fp32, store in the grad's dtype)."""
    if not cpu_native.supports(dtype):
        pytest.skip(f"the C compiler here has no {dtype}")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    w, t, rowc, colc = _case(torch.float32, seed=5)
    w, t = [x.to(dtype) for x in w], [x.to(dtype) for x in t]
    table = cpu_native.Table(dtype, SHAPES)
    rows = [torch.empty(R) for R, _, _ in SHAPES]
    cols = [torch.empty((R // Rg) * J) for R, J, Rg in SHAPES]
    t0 = _bind_and_run(table, w, t, rows, cols, rowc, colc)
    for i, (R, J, Rg) in enumerate(SHAPES):
        sq = w[i].double() ** 2
        torch.testing.assert_close(rows[i].double(), sq.sum(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cols[i].double(), _col_view(sq, R, J, Rg).sum(1).reshape(-1), atol=1e-5, rtol=1e-5)
        col_of_row = colc[i].view(R // Rg, 1, J).expand(-1, Rg, -1).reshape(R, J)
        want = (t0[i].float() + (rowc[i][:, None] + col_of_row) * w[i].float()).to(dtype)
        # float32 sums in another order may round to the neighbouring half value; never further
        assert ((t[i].float() - want.float()).abs() <= (want.float().abs() * 2.0 ** -7 + 1e-6)).all()
        assert (t[i] == want).float().mean() > 0.99


@needs_native
@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_conversions_are_exact_on_every_value(dtype):
    """Every 16-bit pattern: load + store is the identity (NaNs stay NaN), and t + c * w computed in float32
    rounds to nearest even exactly as torch rounds the same float32 value."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    w = bits.view(dtype).reshape(256, 256).clone()
    t = torch.zeros_like(w)
    table = cpu_native.Table(dtype, [(256, 256, 256)])
    one = torch.ones(256)
    (m,) = table.mats
    m.w, m.t, m.rowc = w.data_ptr(), t.data_ptr(), one.data_ptr()
    table.update()
    nan = w.isnan()
    want = (torch.zeros_like(w).float() + w.float()).to(dtype)  # w itself, except +0 for -0 (IEEE 0 + -0)
    assert torch.equal(t[~nan].view(torch.int16), want[~nan].view(torch.int16)) and t[nan].isnan().all()
    # rounding: random float32 results of both signs, tiny (subnormal halves) to overflowing
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 256, generator=g) * torch.logspace(-9, 6, 256)[:, None]).to(dtype)
    t = (torch.randn(256, 256, generator=g) * torch.logspace(-9, 6, 256)[None, :]).to(dtype)
    c = torch.randn(256, generator=g) * 3
    want = (t.float() + c[:, None] * w.float()).to(dtype)
    m.w, m.t, m.rowc = w.data_ptr(), t.data_ptr(), c.data_ptr()
    table.update()
    fin = want.isfinite()
    assert torch.equal(t[fin].view(torch.int16), want[fin].view(torch.int16))
    assert torch.equal(t[~fin].isinf(), want[~fin].isinf())


def test_half_precision_engine_matches_the_reference():
    """The torch backend takes the C loops for bf16/fp16 weights and agrees with the reference."""
    for dtype in (torch.bfloat16, torch.float16):
        if not cpu_native.supports(dtype):
            continue
        m = make(dtype)
        eng = Regularization(native := clone(m), hand_groups(), GroupNorm(0.1), backend="torch")
        eng.apply_to_grads()
        assert eng.buffers.cache["torch"].matrix.native and not eng.buffers.cache["torch"].matrix.torch_mats
        ref = grads(run(m, GroupNorm(0.1), "reference"))
        for k, v in grads(native).items():
            torch.testing.assert_close(v.float(), ref[k].float(), atol=1e-2, rtol=1e-2)


def _in_subprocess(code: str, cache: os.PathLike, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter: a bad shared object can kill the process that loads it."""
    full_env = {**os.environ, "TRITONPRUNE_CACHE_DIR": str(cache), **env}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=root,
                          capture_output=True, text=True, timeout=600)


_REPORT = """
    from tritonprune.kernels import cpu_native
    print("LOADED" if cpu_native.library() is not None else "NONE", cpu_native.why_unavailable())
"""


@needs_native
def test_truncated_cached_build_is_rebuilt_not_loaded(tmp_path):
    """A cached object cut short (a full disk, a killed copy) used to SIGBUS every later process in dlopen."""
    first = _in_subprocess(_REPORT, tmp_path)
    assert first.returncode == 0 and "LOADED" in first.stdout, first.stderr
    (so,) = tmp_path.glob("cpu_native-*.so")
    size = so.stat().st_size
    with open(so, "r+b") as f:
        f.truncate(size // 3)
    again = _in_subprocess(_REPORT, tmp_path)
    assert again.returncode == 0 and "LOADED" in again.stdout, (again.returncode, again.stderr)
    assert so.stat().st_size == size  # rebuilt in place


@needs_native
def test_cached_build_without_the_symbols_is_rebuilt(tmp_path):
    """A library with a matching sidecar but without tp_run_* (another build, a stale file) is rebuilt."""
    first = _in_subprocess(_REPORT, tmp_path)
    assert "LOADED" in first.stdout, first.stderr
    (so,) = tmp_path.glob("cpu_native-*.so")
    (src := tmp_path / "empty.c").write_text("int tp_something_else(void) { return 1; }\n")
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    size, digest = cpu_native._digest(so)
    (tmp_path / (so.name + ".sha256")).write_text(f"{size} {digest}\n")
    again = _in_subprocess(_REPORT, tmp_path)
    assert again.returncode == 0 and "LOADED" in again.stdout, again.stderr
    assert cpu_native._verified(so) and so.stat().st_size != size


@needs_native
def test_a_compiler_that_never_gives_the_symbols_falls_back_with_a_warning(monkeypatch, tmp_path):
    (src := tmp_path / "empty.c").write_text("int tp_something_else(void) { return 1; }\n")
    monkeypatch.setattr(cpu_native, "SOURCE", src)
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    cpu_native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="lacks tp_run_f32"):
            assert cpu_native.library() is None
    finally:
        cpu_native.reset()


@needs_native
def test_group_or_world_writable_cache_dir_is_not_used(monkeypatch, tmp_path):
    """Another user could plant a library there: fall back to this user's private temp dir."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(shared))
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu_native.reset()
    try:
        assert cpu_native.library() is not None, cpu_native.why_unavailable()
        assert not list(shared.iterdir())
        private = tmp_path / "tmp" / f"tritonprune-{os.getuid()}"
        assert len(list(private.glob("cpu_native-*.so"))) == 1
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        cpu_native.reset()


@needs_native
def test_foreign_owned_cache_dirs_are_never_loaded_from(monkeypatch, tmp_path):
    """Directories owned by another uid are refused, even the temp-dir fallback: torch ops, and why."""
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    real = os.getuid()
    monkeypatch.setattr(cpu_native.os, "getuid", lambda: real + 1)  # as if another user made them
    cpu_native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="not by this user"):
            assert cpu_native.library() is None
        assert "owned by uid" in cpu_native.why_unavailable()
    finally:
        cpu_native.reset()


def test_private_dir_is_made_0700(tmp_path):
    assert cpu_native.private_dir(tmp_path / "a" / "b") is None
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    (f := tmp_path / "file").write_text("")
    assert cpu_native.private_dir(f) is not None
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert "not a directory" in cpu_native.private_dir(tmp_path / "link")


@needs_native
def test_cc_with_arguments(monkeypatch, tmp_path):
    """CC="ccache gcc" style: a wrapper and its arguments, split as a shell would."""
    cc = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"env TRITONPRUNE_TEST=1 {cc}")
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path))
    cpu_native.reset()
    try:
        assert cpu_native.compiler() == ["env", "TRITONPRUNE_TEST=1", cc]
        assert cpu_native.library() is not None, cpu_native.why_unavailable()
    finally:
        cpu_native.reset()
