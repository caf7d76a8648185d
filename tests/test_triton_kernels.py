"""Triton backend against a float64 oracle written here and against the torch/reference backends.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before any kernel is
built); with CUDA the same cases run compiled (marker `cuda`). Sizes are tiny: the interpreter runs
every program of a grid in Python.
"""

from __future__ import annotations

import copy
import importlib
import math
import os

import pytest
import torch

# Triton fixes interpreted vs compiled mode when it is first imported: without CUDA, interpret
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn
from zoo import ZOO

import tritonprune.optim as optim
from tritonprune.geometry import slot_view
from tritonprune.graph import find_groups
from tritonprune.graph.group import AFFINE, BATCHNORM, CONV, IN, LAYERNORM, LINEAR, OUT, Group, Slot
from tritonprune.layout import FLAG_IMPORTANCE, FLAG_UPDATE, GroupBuffers
from tritonprune.regularizers import BNScale, GroupLasso, GroupNorm

ti = pytest.importorskip("tritonprune.kernels.triton_impl")
if not ti.HAS_TRITON:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

pytestmark = pytest.mark.triton

INTERPRETING = ti._interpreting()
DEVICES = (["cpu"] if INTERPRETING else []) + (["cuda"] if torch.cuda.is_available() else [])
DEVICE = "cpu" if INTERPRETING else "cuda"  # for the tests that run on one device only
if not DEVICES:  # pragma: no cover
    pytest.skip("no CUDA and triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}  # ~1 ulp of the dtype


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


def _oracle_sums(bufs) -> torch.Tensor:
    out = torch.zeros(bufs.n_channels, dtype=torch.float64)
    for (_, _, p), geo, flags, chan in zip(bufs.entries, bufs.geometries, bufs.flags, bufs.chans):
        if flags & FLAG_IMPORTANCE:
            v = slot_view(p.detach(), geo).double().cpu()
            out[chan : chan + geo.G * geo.C] += (v * v).sum(dim=(1, 3)).reshape(-1)
    return out


def _oracle_gamma(bufs, sums, reg, alpha) -> torch.Tensor:
    out = torch.empty(bufs.n_channels, dtype=torch.float64)
    offs = bufs.group_offsets.tolist()
    for lo, hi in zip(offs[:-1], offs[1:]):
        n = sums[lo:hi].double().sqrt()
        spread = n.max() - n.min()
        if hi - lo == 1 or not math.isfinite(spread) or spread == 0:
            out[lo:hi] = reg
        else:
            out[lo:hi] = reg * 2 ** (alpha * (n.max() - n) / spread)
    return out


def _oracle_update(bufs, coef_or_reg, sign, target, slot_scale) -> dict[str, torch.Tensor]:
    """The new target of every parameter, from w as it was before (float64)."""
    new = {}
    w0 = {id(p): p.detach().double().cpu() for _, _, p in bufs.entries}
    for s, ((_, slot, p), geo, flags, chan) in enumerate(zip(bufs.entries, bufs.geometries, bufs.flags, bufs.chans)):
        if not flags & FLAG_UPDATE or p.grad is None:
            continue
        key = slot.name
        if key not in new:
            t = p.detach() if target == "param" else p.grad
            new[key] = t.double().cpu().clone()
        w = slot_view(w0[id(p)], geo)
        scale = 1.0 if slot_scale is None else float(slot_scale[s])
        if sign:
            term = scale * coef_or_reg * torch.sign(w)
        else:
            c = coef_or_reg.double().cpu()[chan : chan + geo.G * geo.C].reshape(geo.G, 1, geo.C, 1)
            term = scale * c * w
        slot_view(new[key], geo).add_(term)
    return new


def _targets(bufs, target) -> dict[str, torch.Tensor]:
    return {slot.name: (p.detach() if target == "param" else p.grad) for _, slot, p in bufs.entries
            if p.grad is not None}


def _close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, what
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{what}: max err {(got - want).abs().max():.3g}"


# ------------------------------------------------------------------------------------------- tests


def test_geometry_of_case_covers_the_edge_cases():
    _, bufs = _build(_select_groupnorm)
    geos = {slot.name + ":" + slot.role: geo for (_, slot, _), geo in zip(bufs.entries, bufs.geometries)}
    assert geos["c5:in"].G == 2 and geos["c5:in"].C == 3  # blocked
    assert geos["c2:in"].B == 1  # channels_last in-columns: channels contiguous
    assert geos["fc2:in"].B == 4  # repeat
    assert geos["bn1w:affine"].A * geos["bn1w:affine"].B == 1
    assert bufs.group_sizes == [7, 16, 6, 4, 1, 3]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sums_and_group_norm_coef(device, dtype):
    _, bufs = _build(_select_groupnorm, dtype, device)
    sums = ti.channel_sq_sums(bufs).clone()
    want = _oracle_sums(bufs)
    _close(sums, want, torch.float32, "channel_sq_sums")  # accumulated in fp32 whatever the dtype
    bufs.acc.fill_(float("nan"))  # the result lands in bufs.acc, every channel written
    assert torch.equal(sums, ti.channel_sq_sums(bufs)), "sums differ between two runs"
    coef = ti.group_norm_coef(bufs, sums, 1e-3, 4.0)
    _close(coef, _oracle_gamma(bufs, sums.cpu(), 1e-3, 4.0), torch.float32, "group_norm_coef")
    assert coef.cpu()[bufs.group_offsets[4].item()] == pytest.approx(1e-3)  # 1-channel group: gamma 1


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf in the interpreter's numpy
def test_gamma_flat_and_nonfinite_groups_are_one():
    _, bufs = _build(_select_groupnorm)
    sums = torch.ones(bufs.n_channels, device=DEVICE)
    sums[:7] = torch.tensor([4.0, float("inf"), 1, 1, 1, 1, 1])  # non-finite spread
    sums[23:29] = torch.tensor([0.0, 1, 4, 9, 16, 25])  # a normal group: gamma from 16 down to 1
    coef = ti.group_norm_coef(bufs, sums, 0.5, 4.0)
    assert torch.all(coef[:7] == 0.5) and torch.all(coef[7:23] == 0.5)
    assert coef[23].item() == pytest.approx(8.0) and coef[28].item() == pytest.approx(0.5)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target", ["grad", "param"])
def test_add_scaled(device, dtype, target):
    _, bufs = _build(_select_groupnorm, dtype, device)
    coef = torch.rand(bufs.n_channels, device=device)
    scale = torch.linspace(-1, 2, bufs.n_slots, device=device) if target == "param" else None
    want = _oracle_update(bufs, coef, False, target, scale)
    untouched = {k: v.clone() for k, v in _targets(bufs, target).items()}
    ti.add_scaled_(bufs, coef, target=target, slot_scale=scale)
    got = _targets(bufs, target)
    for name, t in want.items():
        _close(got[name], t, dtype, f"add_scaled_ {name}")
    assert set(want) < set(got)  # the bn1b-style update-only slot is in, parameters outside stay as they were
    for name in set(got) - set(want):
        assert torch.equal(got[name], untouched[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_sign_and_group_lasso(dtype):
    _, bufs = _build(_select_bn, dtype)
    want = _oracle_update(bufs, 1e-2, True, "grad", None)
    ti.add_sign_(bufs, 1e-2)
    got = _targets(bufs, "grad")
    for name, t in want.items():
        _close(got[name], t, dtype, f"add_sign_ {name}")
    assert "bn6w" not in want  # no .grad: skipped

    sums = ti.channel_sq_sums(bufs)
    coef = ti.group_lasso_coef(bufs, sums, 1e-3)
    cnt = bufs.n_importance_slots_bn.double()
    want_coef = torch.where(cnt > 0, 1e-3 / torch.sqrt(sums.double() / cnt.clamp(min=1) + 1e-9), 0.0)
    _close(coef, want_coef, torch.float32, "group_lasso_coef")
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
    assert len({code for code, *_ in ti._plan(bufs).mat_update}) == 4
    sums = ti.channel_sq_sums(bufs)
    _close(sums, _oracle_sums(bufs), torch.float32, "mixed sums")
    coef = ti.group_norm_coef(bufs, sums, 1e-2, 4.0)
    want = _oracle_update(bufs, coef, False, "grad", None)
    ti.add_scaled_(bufs, coef)
    got = _targets(bufs, "grad")
    for name, t in want.items():
        _close(got[name], t, torch.bfloat16 if got[name].dtype == torch.bfloat16 else torch.float16
               if got[name].dtype == torch.float16 else torch.float32, f"mixed add_scaled_ {name}")
        assert got[name].dtype == getattr(m, name).dtype


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


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(ti, "_interpreting", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ti.check_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set, but after triton was imported compiled
    with pytest.raises(ValueError, match="before the first `import triton`"):
        ti.check_available("cpu")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_other_backends(backend, dtype):
    try:
        other = importlib.import_module(f"tritonprune.kernels.{'torch_impl' if backend == 'torch' else backend}")
    except ImportError:
        pytest.skip(f"backend {backend} not in the tree yet")
    m, bufs = _build(_select_groupnorm, dtype)
    sums = ti.channel_sq_sums(bufs)
    _close(sums, other.channel_sq_sums(bufs), torch.float32, f"sums vs {backend}")
    coef = ti.group_norm_coef(bufs, sums, 1e-2, 4.0)
    _close(coef, other.group_norm_coef(bufs, sums, 1e-2, 4.0), torch.float32, f"coef vs {backend}")
    saved = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    scale = torch.linspace(0.5, 1.5, bufs.n_slots, device=DEVICE)
    other.add_scaled_(bufs, coef, slot_scale=scale)
    theirs = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if n in saved:
            p.grad.copy_(saved[n])
    ti.add_scaled_(bufs, coef, slot_scale=scale)
    for n, p in m.named_parameters():
        if n in saved:
            _close(p.grad, theirs[n], dtype, f"add_scaled_ vs {backend}: {n}")


# ------------------------------------------------------------------------- zoo models, end to end

# Every zoo model runs GroupNorm; a few with distinct coupling rules run every regularizer (the
# interpreter is slow). The others are marked `slow`.
FAST_ZOO = ("resnext", "mlp", "depthwise_multiplier", "conv_transpose_1d_3d")
_GROUPS: dict[str, list] = {}


def _zoo_params():
    return [n if n in FAST_ZOO else pytest.param(n, marks=pytest.mark.slow) for n in sorted(ZOO)]


def _regularized_grads(name, regularizer, backend):
    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    if name not in _GROUPS:
        _GROUPS[name] = find_groups(model, inputs)
    model = copy.deepcopy(model).to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = optim.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                     regularizer=regularizer, groups=_GROUPS[name], backend=backend)
    def state():
        return {n: (p.detach() if regularizer.decoupled else p.grad).clone() for n, p in model.named_parameters()}

    before = state()
    opt.step() if regularizer.decoupled else opt.regularize()
    return before, state()


@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_triton_matches_torch(name):
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ZOO[name]()[0].modules())
    regs = [GroupNorm(reg=1e-2, alpha=4)]
    if name in FAST_ZOO:  # all regularizers and the decoupled path on a few models, GroupNorm on the rest
        regs.append(GroupNorm(reg=1e-2, decoupled=True))
        if has_bn:
            regs += [BNScale(reg=1e-2), GroupLasso(reg=1e-2)]
    for r in regs:
        before, want = _regularized_grads(name, r, "torch")
        _, got = _regularized_grads(name, r, "triton")
        for n in want:
            _close(got[n], want[n], torch.float32, f"{name} {type(r).__name__} {n}")
        if not r.decoupled:
            assert any(not torch.equal(got[n], before[n]) for n in want), f"{name}: {r!r} changed nothing"


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
