"""Triton backend (and the torch/reference backends beside it) against a float64 oracle written here.

Every result is judged in units of its dtype's rounding: |got - float64| <= k * u * scale, with u the
unit roundoff of the dtype the value passes through (2**-24 float32, 2**-8 bfloat16, 2**-11 float16)
and k the number of roundings the arithmetic does (an n-term float32 sum: n; an update: a few float32
roundings at |t| + |c*w| and one to the parameter's dtype at the result), not by comparing two
roundings with each other. On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set
below before any kernel is built); with CUDA the same cases run compiled (marker `cuda`). Sizes are
small: the interpreter runs every program of a grid in Python.
"""

from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

# Triton fixes interpreted vs compiled mode when it is first imported: without CUDA, interpret
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn
from zoo import ZOO

import tritonprune.regularizing.optimizer as optim
from tritonprune.graph import find_groups
from tritonprune.graph.geometry import slot_view
from tritonprune.graph.group import AFFINE, BATCHNORM, CONV, IN, LAYERNORM, LINEAR, OUT, Group, Slot
from tritonprune.kernels import FLAT_SPREAD_RTOL
from tritonprune.kernels.layout import FLAG_IMPORTANCE, FLAG_UPDATE, GroupBuffers
from tritonprune.regularizing.regularizers import BNScale, GroupLasso, GroupNorm

ti = pytest.importorskip("tritonprune.kernels.triton_impl")
if not ti.HAS_TRITON:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

pytestmark = pytest.mark.triton

INTERPRETING = ti._interpreting()
DEVICES = (["cpu"] if INTERPRETING else []) + (["cuda"] if torch.cuda.is_available() else [])
DEVICE = "cpu" if INTERPRETING else "cuda"  # for the tests that run on one device only
if not DEVICES:  # pragma: no cover
    pytest.skip("no CUDA and triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
# unit roundoff (half an ulp at 1) of each dtype
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
U32 = U[torch.float32]
# roundings to the parameter's dtype, in units of u: Triton's interpreter converts float32 to bfloat16 by
# truncation (under 1 ulp = 2u; compiled code rounds to nearest even, u)
ROUND_UNITS = {torch.bfloat16: 2.0} if INTERPRETING else {}


def _dev_param(device):
    return pytest.param(device, marks=pytest.mark.cuda) if device == "cuda" else device


DEVICE_PARAMS = [_dev_param(d) for d in DEVICES]


# ---------------------------------------------------------------------------------------- the model


class Bag(nn.Module):
    """Bare parameters with the shapes of a small network; slots are written by hand below."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], channels_last: tuple[str, ...] = ()):
        super().__init__()
        for name, shape in shapes.items():
            t = torch.randn(shape)
            if name in channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            self.register_parameter(name, nn.Parameter(t))


def _case() -> tuple[Bag, list[Group]]:
    """Groups covering: prime channel counts, a 1-channel group, A*B == 1 slots, a blocked (grouped-conv)
    slot, repeat > 1 (Linear after Flatten), concatenated producers, a channels_last weight, a weight in
    two groups (out-rows of one, in-columns of another), importance-only and update-only slots."""
    shapes = {
        "c1": (7, 3, 3, 3), "bn1w": (7,), "bn1b": (7,),
        "c2": (11, 7, 3, 3), "bn2w": (11,),
        "c3": (5, 7, 1, 1),  # concatenated with c2's 11 out channels into a 16-channel space... of c4
        "c4": (6, 16, 3, 3),  # in-columns over the concat; out-rows feed a grouped conv
        "c5": (4, 3, 3, 3),  # groups=2: weight [O=4, I/G=3, 3, 3] over 6 channels
        "c6": (1, 4, 1, 1), "bn6w": (1,),  # 1-channel group
        "fc": (3, 4),  # Linear reading c6 ... and an IN slot with B=1 over the 4 channels of c5
        "ln": (4,),
        "fc2": (2, 12),  # Linear after Flatten of a [3 x 2 x 2] map: repeat 4 over fc's 3 outputs
    }
    m = Bag(shapes, channels_last=("c2",))
    g = [
        Group(7, (
            Slot("c1", "", CONV, OUT, 0, 0, 7),
            Slot("bn1w", "", BATCHNORM, AFFINE, 0, 0, 7),
            Slot("bn1b", "", BATCHNORM, AFFINE, 0, 0, 7, is_bias=True),
            Slot("c2", "", CONV, IN, 1, 0, 7),
            Slot("c3", "", CONV, IN, 1, 0, 7),
        )),
        Group(16, (
            Slot("c2", "", CONV, OUT, 0, 0, 11),
            Slot("bn2w", "", BATCHNORM, AFFINE, 0, 0, 11),
            Slot("c3", "", CONV, OUT, 0, 11, 5),
            Slot("c4", "", CONV, IN, 1, 0, 16),
        )),
        Group(6, (
            Slot("c4", "", CONV, OUT, 0, 0, 6),
            Slot("c5", "", CONV, IN, 1, 0, 6, blocks=2),
        ), blocks=2),
        Group(4, (
            Slot("c5", "", CONV, OUT, 0, 0, 4),
            Slot("c6", "", CONV, IN, 1, 0, 4),
            Slot("fc", "", LINEAR, IN, 1, 0, 4),
            Slot("ln", "", LAYERNORM, AFFINE, 0, 0, 4),
        )),
        Group(1, (
            Slot("c6", "", CONV, OUT, 0, 0, 1),
            Slot("bn6w", "", BATCHNORM, AFFINE, 0, 0, 1),
        )),
        Group(3, (
            Slot("fc", "", LINEAR, OUT, 0, 0, 3),
            Slot("fc2", "", LINEAR, IN, 1, 0, 3, repeat=4),
        )),
    ]
    return m, g


def _select_groupnorm(slot: Slot) -> tuple[bool, bool]:
    if slot.kind == LAYERNORM:
        return True, False  # importance only
    if slot.is_bias:
        return False, True  # update only
    return True, True


def _select_bn(slot: Slot) -> tuple[bool, bool]:
    ok = slot.kind == BATCHNORM and not slot.is_bias
    return ok, ok


def _build(select, dtype=torch.float32, device=DEVICE, seed=0, grads=True):
    torch.manual_seed(seed)
    m, groups = _case()
    m = m.to(device=device, dtype=dtype)
    if grads:
        for p in m.parameters():
            p.grad = torch.randn_like(p)  # randn_like keeps channels_last
    m.bn6w.grad = None  # a parameter without .grad is skipped
    return m, GroupBuffers.build(m, groups, select)


# ------------------------------------------------------------------------------------------ oracle


def _oracle_sums(bufs) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 sums of squares per channel and the number of terms each sums."""
    out = torch.zeros(bufs.n_channels, dtype=torch.float64)
    terms = torch.zeros(bufs.n_channels, dtype=torch.float64)
    for (_, _, p), geo, flags, chan in zip(bufs.entries, bufs.geometries, bufs.flags, bufs.chans):
        if flags & FLAG_IMPORTANCE:
            v = slot_view(p.detach(), geo).double().cpu()
            out[chan : chan + geo.G * geo.C] += (v * v).sum(dim=(1, 3)).reshape(-1)
            terms[chan : chan + geo.G * geo.C] += geo.A * geo.B
    return out, terms


def _oracle_gamma(bufs, sums, reg, alpha) -> torch.Tensor:
    """reg * gamma in float64 from the given (float32) sums, with the flat-group rule of kernels/__init__."""
    out = torch.empty(bufs.n_channels, dtype=torch.float64)
    offs = bufs.group_offsets.tolist()
    for lo, hi in zip(offs[:-1], offs[1:]):
        n = sums[lo:hi].double().cpu().sqrt()
        spread = n.max() - n.min()
        if hi - lo == 1 or not (spread > FLAT_SPREAD_RTOL * n.max()):
            out[lo:hi] = reg
        else:
            out[lo:hi] = reg * 2 ** (alpha * (n.max() - n) / spread)
    return out


def _oracle_update(bufs, coef_or_reg, sign, target, slot_scale) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(new target, scale, terms) of every updated parameter in float64, from w as it was before; `scale`
    is |t| + sum of |term|, the magnitude the float32 arithmetic rounds at; `terms` the number of slots
    that update each element."""
    new = {}
    w0 = {id(p): p.detach().double().cpu() for _, _, p in bufs.entries}
    for s, ((_, slot, p), geo, flags, chan) in enumerate(zip(bufs.entries, bufs.geometries, bufs.flags, bufs.chans)):
        if not flags & FLAG_UPDATE or p.grad is None:
            continue
        key = slot.name
        if key not in new:
            t = (p.detach() if target == "param" else p.grad).double().cpu().clone()
            new[key] = (t, t.abs(), torch.zeros_like(t))
        w = slot_view(w0[id(p)], geo)
        scale = 1.0 if slot_scale is None else float(slot_scale[s])
        if sign:
            term = scale * torch.tensor(coef_or_reg, dtype=torch.float32).double() * torch.sign(w)
        else:
            c = coef_or_reg.float().double().cpu()[chan : chan + geo.G * geo.C].reshape(geo.G, 1, geo.C, 1)
            term = scale * c * w
        slot_view(new[key][0], geo).add_(term)
        slot_view(new[key][1], geo).add_(term.abs())
        slot_view(new[key][2], geo).add_(1.0)
    return new


def _assert_ulps(got, want, bound, what):
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, what
    err = (got - want).abs()
    ok = err <= bound
    if not bool(ok.all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{what}: error {err.flatten()[i]:.3g} > bound {bound.flatten()[i]:.3g} at {i} "
                             f"(got {got.flatten()[i]:.8g}, float64 {want.flatten()[i]:.8g})")


def _check_sums(sums, bufs, what):
    want, terms = _oracle_sums(bufs)
    # recursive float32 summation of n nonnegative terms (exact squares: no half format loses bits there)
    _assert_ulps(sums, want, (terms + 1) * U32 * want + 1e-30, what)


def _check_gamma(coef, bufs, sums, reg, alpha, what):
    want = _oracle_gamma(bufs, sums, reg, alpha)
    # the float32 norms carry u each; the exponent alpha * (n_max - n) / spread magnifies that by up to
    # alpha * n_max / spread (a few u more from the divide, exp2 and the product with reg)
    amp = torch.ones(bufs.n_channels, dtype=torch.float64)
    offs = bufs.group_offsets.tolist()
    for lo, hi in zip(offs[:-1], offs[1:]):
        n = sums[lo:hi].double().cpu().sqrt()
        if hi - lo > 1 and n.max() - n.min() > FLAT_SPREAD_RTOL * n.max():  # not flat (NaN compares False)
            amp[lo:hi] = float(n.max() / (n.max() - n.min()))
    _assert_ulps(coef, want, (16 + 8 * alpha * amp) * U32 * want.abs(), what)


def _check_update(got: dict, want: dict, what, per_slot: bool = False):
    """float32 roundings at the operands' magnitude, then one rounding to the parameter's dtype (the
    Triton kernels add all slots' terms in one pass; `per_slot`: a store per slot, as the torch and
    reference backends do, so one rounding per term)."""
    for name, (t, scale, terms) in want.items():
        dtype = got[name].dtype
        stores = terms.clamp(min=1) if per_slot else 1.0
        bound = 4 * U32 * scale + stores * ROUND_UNITS.get(dtype, 1.0) * U[dtype] * scale + 1e-30
        _assert_ulps(got[name], t, bound, f"{what} {name} ({dtype})")


def _targets(bufs, target) -> dict[str, torch.Tensor]:
    return {slot.name: (p.detach() if target == "param" else p.grad) for _, slot, p in bufs.entries
            if p.grad is not None}


# ------------------------------------------------------------------------------------------- tests


def test_geometry_of_case_covers_the_edge_cases():
    _, bufs = _build(_select_groupnorm)
    geos = {slot.name + ":" + slot.role: geo for (_, slot, _), geo in zip(bufs.entries, bufs.geometries)}
    assert geos["c5:in"].G == 2 and geos["c5:in"].C == 3  # blocked
    assert geos["c2:in"].B == 1  # channels_last in-columns: channels contiguous
    assert geos["fc2:in"].B == 4  # repeat
    assert geos["bn1w:affine"].A * geos["bn1w:affine"].B == 1
    assert bufs.group_sizes == [7, 16, 6, 4, 1, 3]


PATHS = ["matrix", pytest.param("slot", id="slot-kernels")]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test on the matrix kernels and again with every parameter on the generic per-slot kernels."""
    monkeypatch.setattr(ti, "MATRIX_PATH", request.param == "matrix")
    return request.param


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sums_and_group_norm_coef(device, dtype, path):
    _, bufs = _build(_select_groupnorm, dtype, device)
    sums = ti.channel_sq_sums(bufs).clone()
    _check_sums(sums, bufs, f"channel_sq_sums {path}")
    bufs.acc.fill_(float("nan"))  # the result lands in bufs.acc, every channel written
    assert torch.equal(sums, ti.channel_sq_sums(bufs)), "sums differ between two runs"
    coef = ti.group_norm_coef(bufs, sums, 1e-3, 4.0)
    _check_gamma(coef, bufs, sums, 1e-3, 4.0, "group_norm_coef")
    assert coef.cpu()[bufs.group_offsets[4].item()] == 1e-3 * 1.0  # 1-channel group: gamma 1 exactly
    if path == "matrix":
        assert ti._plan(bufs).n_units == 13 and not ti._plan(bufs).slot_sums


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf in the interpreter's numpy
def test_gamma_flat_rule():
    """gamma is 1 on a group with one channel, a non-finite spread, or a spread not above
    FLAT_SPREAD_RTOL * n_max; a spread just above that threshold is a real one."""
    _, bufs = _build(_select_groupnorm)
    sums = torch.ones(bufs.n_channels, device=DEVICE)
    sums[:7] = torch.tensor([4.0, float("inf"), 1, 1, 1, 1, 1])  # non-finite spread
    n_max = 3.0
    tiny = (n_max * (1 - FLAT_SPREAD_RTOL / 4)) ** 2  # a residue-sized spread: flat
    sums[7:23] = n_max**2
    sums[8] = tiny
    real = (n_max * (1 - 4 * FLAT_SPREAD_RTOL)) ** 2  # 4x the threshold: not flat
    sums[23:29] = torch.tensor([n_max**2, real, n_max**2, n_max**2, n_max**2, n_max**2])
    sums[29:33] = torch.tensor([0.0, 1, 4, float("nan")])  # a NaN norm: flat
    coef = ti.group_norm_coef(bufs, sums, 0.5, 4.0)
    assert torch.all(coef[:7] == 0.5) and torch.all(coef[7:23] == 0.5) and torch.all(coef[29:33] == 0.5)
    assert coef[33].item() == 0.5  # the 1-channel group
    assert coef[24].item() == pytest.approx(0.5 * 16, rel=1e-3) and coef[23].item() == pytest.approx(0.5)
    sums[29:33] = torch.tensor([0.0, 1, 4, 9])  # a normal group: gamma from 16 down to 1
    coef = ti.group_norm_coef(bufs, sums, 0.5, 4.0)
    _check_gamma(coef, bufs, sums, 0.5, 4.0, "gamma")
    assert coef[29].item() == pytest.approx(8.0) and coef[32].item() == pytest.approx(0.5)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("target", ["grad", "param"])
def test_add_scaled(device, dtype, target, path):
    _, bufs = _build(_select_groupnorm, dtype, device)
    coef = torch.rand(bufs.n_channels, device=device)
    scale = torch.linspace(-1, 2, bufs.n_slots, device=device) if target == "param" else None
    want = _oracle_update(bufs, coef, False, target, scale)
    untouched = {k: v.clone() for k, v in _targets(bufs, target).items()}
    ti.add_scaled_(bufs, coef, target=target, slot_scale=scale)
    got = _targets(bufs, target)
    _check_update(got, want, f"add_scaled_ {path}")
    assert set(want) < set(got)  # the bn1b-style update-only slot is in, parameters outside stay as they were
    for name in set(got) - set(want):
        assert torch.equal(got[name], untouched[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_sign_and_group_lasso(dtype, path):
    _, bufs = _build(_select_bn, dtype)
    want = _oracle_update(bufs, 1e-2, True, "grad", None)
    ti.add_sign_(bufs, 1e-2)
    _check_update(_targets(bufs, "grad"), want, f"add_sign_ {path}")
    assert "bn6w" not in want  # no .grad: skipped

    sums = ti.channel_sq_sums(bufs)
    _check_sums(sums, bufs, "bn sums")
    coef = ti.group_lasso_coef(bufs, sums, 1e-3)
    cnt = bufs.n_importance_slots_bn.double()
    want_coef = torch.where(cnt > 0, 1e-3 / torch.sqrt(sums.double() / cnt.clamp(min=1) + 1e-9), 0.0)
    _assert_ulps(coef, want_coef, 8 * U32 * want_coef, "group_lasso_coef")
    assert torch.all(coef[7:23][11:] == 0)  # c3's concatenated channels have no BatchNorm


def test_mixed_dtypes_and_float64():
    """One launch per dtype present: fp16, bf16, fp32 and fp64 parameters in one set of buffers."""
    torch.manual_seed(1)
    m, groups = _case()
    for name, dt in (("c2", torch.float16), ("c4", torch.bfloat16), ("fc", torch.float64), ("bn2w", torch.float16)):
        p = getattr(m, name)
        p.data = p.data.to(dt)
    m = m.to(DEVICE)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    bufs = GroupBuffers.build(m, groups, _select_groupnorm)
    plan = ti._plan(bufs)
    assert len({code for code, *_ in plan.mat_update}) == 4 and len(plan.mat_sums) == 4
    sums = ti.channel_sq_sums(bufs)
    _check_sums(sums, bufs, "mixed sums")
    coef = ti.group_norm_coef(bufs, sums, 1e-2, 4.0)
    want = _oracle_update(bufs, coef, False, "grad", None)
    ti.add_scaled_(bufs, coef)
    got = _targets(bufs, "grad")
    _check_update(got, want, "mixed add_scaled_")
    for name in want:
        assert got[name].dtype == getattr(m, name).dtype


def _big_case(dtype):
    """Weights past one tile in both directions: 37 rows (> BR, several row blocks), 4100 columns (> QC
    for float32: two column items; a multiple of 4: the vector branch) and 4099 (the scalar branch)."""
    torch.manual_seed(3)
    m = Bag({"w": (37, 4100), "v": (37, 4099), "b": (37,)}).to(device=DEVICE, dtype=dtype)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    groups = [
        Group(37, (Slot("w", "", LINEAR, OUT, 0, 0, 37), Slot("v", "", LINEAR, OUT, 0, 0, 37),
                   Slot("b", "", LINEAR, OUT, 0, 0, 37, is_bias=True))),
        Group(41, (Slot("w", "", LINEAR, IN, 1, 0, 41, repeat=100),)),
        Group(4099, (Slot("v", "", LINEAR, IN, 1, 0, 4099),)),
    ]
    return m, GroupBuffers.build(m, groups, _select_groupnorm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_past_one_block(dtype):
    _, bufs = _big_case(dtype)
    sums = ti.channel_sq_sums(bufs)
    _check_sums(sums, bufs, "big sums")
    coef = ti.group_norm_coef(bufs, sums, 1e-2, 4.0)
    _check_gamma(coef, bufs, sums, 1e-2, 4.0, "big gamma")
    want = _oracle_update(bufs, coef, False, "grad", None)
    ti.add_scaled_(bufs, coef)
    _check_update(_targets(bufs, "grad"), want, "big add_scaled_")


def test_bitwise_identical_runs_and_grad_pointer_change():
    m, bufs = _build(_select_groupnorm)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    coef = torch.rand(bufs.n_channels, device=DEVICE)
    plan = ti._plan(bufs)
    outs = []
    for _ in range(2):
        for n, p in m.named_parameters():
            if n in grads:
                p.grad = grads[n].clone()  # new addresses: the table is refreshed, the plan is kept
        assert bufs.refresh_pointers()
        ti.add_scaled_(bufs, coef)
        outs.append([p.grad.clone() for n, p in m.named_parameters() if n in grads])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert ti._plan(bufs) is plan  # launch metadata does not depend on the addresses


def test_unaligned_grad_takes_the_scalar_branch():
    """A .grad that is a view at an odd offset (a flat gradient buffer) is updated right: the kernel
    checks the alignment of the addresses it reads, the plan does not."""
    m, bufs = _build(_select_groupnorm)
    flat = torch.zeros(m.c4.numel() + 1, device=DEVICE)
    g = flat[1:].view_as(m.c4).copy_(torch.randn_like(m.c4))
    m.c4.grad = g
    bufs.refresh_pointers()
    coef = torch.rand(bufs.n_channels, device=DEVICE)
    want = _oracle_update(bufs, coef, False, "grad", None)
    ti.add_scaled_(bufs, coef)
    _check_update(_targets(bufs, "grad"), want, "unaligned")
    assert m.c4.grad.data_ptr() == g.data_ptr()


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(ti, "_interpreting", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ti.check_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set, but after triton was imported compiled
    with pytest.raises(ValueError, match="before the first `import triton`"):
        ti.check_available("cpu")


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_against_float64(backend, dtype):
    """triton, torch and reference on the same odd-shaped case, each judged against float64."""
    be = importlib.import_module(f"tritonprune.kernels.{ {'triton': 'triton_impl', 'torch': 'torch_impl'}.get(backend, backend)}")
    m, bufs = _build(_select_groupnorm, dtype)
    sums = be.channel_sq_sums(bufs)
    _check_sums(sums, bufs, f"{backend} sums")
    coef = be.group_norm_coef(bufs, sums, 1e-2, 4.0)
    _check_gamma(coef, bufs, sums, 1e-2, 4.0, f"{backend} gamma")
    scale = torch.linspace(0.5, 1.5, bufs.n_slots, device=DEVICE)
    want = _oracle_update(bufs, coef, False, "grad", scale)
    be.add_scaled_(bufs, coef, slot_scale=scale)
    _check_update(_targets(bufs, "grad"), want, f"{backend} add_scaled_", per_slot=backend != "triton")


# ------------------------------------------------------------------------- zoo models, stage by stage

# Every zoo model runs GroupNorm in float32 on the triton and torch backends, each stage judged against
# float64; a few with distinct coupling rules run every regularizer and bfloat16 (the interpreter is slow).
FAST_ZOO = ("resnext", "mlp", "depthwise_multiplier", "conv_transpose_1d_3d")
_GROUPS: dict[str, list] = {}


def _zoo_bufs(name, regularizer, dtype):
    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    if name not in _GROUPS:
        _GROUPS[name] = find_groups(model, inputs)
    model = copy.deepcopy(model).to(device=DEVICE, dtype=dtype)
    for p in model.parameters():
        p.data.normal_()  # not the init: BatchNorm weights of 1 would make every group flat
        p.grad = torch.randn_like(p)
    return GroupBuffers.build(model, _GROUPS[name], regularizer.select)


def _zoo_cases():
    out = []
    for n in sorted(ZOO):
        out.append(pytest.param(n, "group_norm", torch.float32, id=f"{n}-gn-fp32"))
        if n in FAST_ZOO:
            out += [pytest.param(n, r, d, id=f"{n}-{r}-{str(d)[6:]}") for r, d in
                    (("group_norm", torch.bfloat16), ("group_lasso", torch.float32), ("bn_scale", torch.bfloat16))]
    return out


@pytest.mark.parametrize("name,reg,dtype", _zoo_cases())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zoo_stages_against_float64(name, reg, dtype, backend):
    be = ti if backend == "triton" else importlib.import_module("tritonprune.kernels.torch_impl")
    r = {"group_norm": GroupNorm(reg=1e-2), "group_lasso": GroupLasso(reg=1e-2), "bn_scale": BNScale(reg=1e-2)}[reg]
    bufs = _zoo_bufs(name, r, dtype)
    if bufs.n_slots == 0:
        pytest.skip(f"{name} has no slot for {reg}")
    if reg == "bn_scale":
        want = _oracle_update(bufs, 1e-2, True, "grad", None)
        be.add_sign_(bufs, 1e-2)
    else:
        sums = be.channel_sq_sums(bufs).clone()
        _check_sums(sums, bufs, f"{name} sums")
        if reg == "group_norm":
            coef = be.group_norm_coef(bufs, sums, 1e-2, 4.0)
            _check_gamma(coef, bufs, sums, 1e-2, 4.0, f"{name} gamma")
        else:
            coef = be.group_lasso_coef(bufs, sums, 1e-2)
        want = _oracle_update(bufs, coef, False, "grad", None)
        be.add_scaled_(bufs, coef)
    assert want, f"{name}: {reg} updates nothing"
    _check_update(_targets(bufs, "grad"), want, f"{name} {reg}", per_slot=backend != "triton")


def test_optimizer_runs_the_triton_backend():
    """The wrapper drives the Triton kernels end to end (coupled and decoupled) like the torch backend."""
    torch.manual_seed(0)
    model, inputs = ZOO["resnext"]()
    groups = find_groups(model, inputs)
    results = {}
    for backend in ("torch", "triton"):
        for r in (GroupNorm(reg=1e-2), GroupNorm(reg=1e-2, decoupled=True)):
            mdl = copy.deepcopy(model).to(DEVICE)
            for p in mdl.parameters():
                p.grad = torch.ones_like(p)
            opt = optim.RegularizedOptimizer(torch.optim.SGD(mdl.parameters(), lr=0.1), mdl, regularizer=r,
                                             groups=groups, backend=backend)
            opt.step() if r.decoupled else opt.regularize()
            results[backend, r.decoupled] = {n: (p.detach() if r.decoupled else p.grad).clone()
                                             for n, p in mdl.named_parameters()}
    for decoupled in (False, True):
        for n, t in results["torch", decoupled].items():
            torch.testing.assert_close(results["triton", decoupled][n], t, rtol=1e-5, atol=1e-7)


def test_get_backend_dispatch(monkeypatch):
    from tritonprune.kernels import get_backend

    assert get_backend("auto", "cpu").__name__.endswith("torch_impl")
    if torch.cuda.is_available():
        assert get_backend("auto", "cuda") is ti
    if INTERPRETING:
        assert get_backend("triton", "cpu") is ti
    monkeypatch.setattr(ti, "_interpreting", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='torch'"):
        get_backend("triton", "cpu")
