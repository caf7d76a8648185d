"""Numerical guarantees of the regularizer: flat groups give gamma 1 on every backend, hyperparameters
that overflow float32 are refused at construction, and a term that the gradient or weight cannot hold
(fp16 above 65504, sums of squares that overflow, inf/NaN weights) is refused before anything is written."""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import torch.nn as nn

# the Triton kernels run in the interpreter without CUDA (fixed when triton is first imported)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tritonprune.graph.group import AFFINE, BATCHNORM, CONV, IN, LINEAR, OUT, Group, Slot
from tritonprune.kernels import FLAT_SPREAD_RTOL, get_backend, torch_impl
from tritonprune.kernels.layout import GroupBuffers
from tritonprune.regularizing.engine import Regularization
from tritonprune.regularizing.regularizers import BNScale, GroupLasso, GroupNorm


def _triton_follows_the_rule() -> bool:
    try:
        from tritonprune.kernels import triton_impl as ti
    except ImportError:
        return False
    return ti.HAS_TRITON and ti._interpreting() and "FLAT_SPREAD_RTOL" in inspect.getsource(ti)


BACKENDS = ["reference", "torch", "torch-slots",
            pytest.param("triton", marks=pytest.mark.skipif(
                not _triton_follows_the_rule(), reason="triton interpreter unavailable, or its gamma kernel "
                "does not implement FLAT_SPREAD_RTOL yet (the triton engineer's change)"))]


class MLP(nn.Module):
    def __init__(self, k: int, c: int, m: int, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(k, c, bias=False).to(dtype)
        self.fc2 = nn.Linear(c, m, bias=False).to(dtype)


def mlp_groups(c: int) -> list[Group]:
    return [Group(c, (Slot("fc1.weight", "fc1", LINEAR, OUT, 0, 0, c), Slot("fc2.weight", "fc2", LINEAR, IN, 1, 0, c)))]


def backend_of(name: str, monkeypatch):
    if name == "torch-slots":
        monkeypatch.setattr(torch_impl, "MATRIX_PATH", False)
        name = "torch"
    return get_backend(name, "cpu")


def coefficients(model, groups, backend, reg=0.1, alpha=4.0):
    bufs = GroupBuffers.build(model, groups, GroupNorm().select)
    sums = backend.channel_sq_sums(bufs).clone()
    return sums, backend.group_norm_coef(bufs, sums, reg, alpha)


# ---------------------------------------------------------------------------------------- flat groups


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_equal_in_exact_arithmetic_give_gamma_one(backend, monkeypatch):
    """Every row of fc1 and every column of fc2 is a permutation of one vector: the channel norms are
    equal in exact arithmetic, and float32 sums in other orders differ by a rounding residue."""
    be = backend_of(backend, monkeypatch)
    g = torch.Generator().manual_seed(0)
    residue_seen = False
    for trial in range(12):
        k, c, m = (int(x) for x in torch.randint(3, 40, (3,), generator=g))
        c = c | 1  # odd channel counts
        row = torch.randn(k, generator=g) * 10.0 ** float(torch.randint(-3, 4, (1,), generator=g))
        col = torch.randn(m, generator=g)
        model = MLP(k, c, m)
        with torch.no_grad():
            model.fc1.weight.copy_(torch.stack([row[torch.randperm(k, generator=g)] for _ in range(c)]))
            model.fc2.weight.copy_(torch.stack([col[torch.randperm(m, generator=g)] for _ in range(c)], 1))
        sums, coef = coefficients(model, mlp_groups(c), be)
        residue_seen |= bool(sums.max() != sums.min())
        assert torch.equal(coef, torch.full((c,), 0.1, dtype=torch.float32)), (trial, sums)
    if backend != "reference":  # the reference sums in float64: its float32 sums are usually all equal
        assert residue_seen, "no trial had unequal float32 sums: the test would not catch the rule"


class ConvBN(nn.Module):
    def __init__(self, c: int, m: int):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, m, 1, bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_channels_equal_in_exact_arithmetic_give_gamma_one(backend, monkeypatch):
    """Conv out-rows (3x3 kernels), BatchNorm weights of equal magnitude and 1x1 in-columns, each channel a
    permutation of the same values (signs included), on odd channel counts."""
    be = backend_of(backend, monkeypatch)
    g = torch.Generator().manual_seed(1)
    for trial in range(8):
        c, m = 2 * int(torch.randint(1, 12, (1,), generator=g)) + 1, int(torch.randint(1, 9, (1,), generator=g))
        model = ConvBN(c, m)
        kernel = torch.randn(27, generator=g) * 3
        col = torch.randn(m, generator=g)
        with torch.no_grad():
            model.conv.weight.copy_(torch.stack([kernel[torch.randperm(27, generator=g)] for _ in range(c)]).view(c, 3, 3, 3))
            model.bn.weight.copy_(0.7 * torch.sign(torch.randn(c, generator=g)))
            model.conv2.weight.copy_(torch.stack([col[torch.randperm(m, generator=g)] for _ in range(c)], 1).view(m, c, 1, 1))
        groups = [Group(c, (Slot("conv.weight", "conv", CONV, OUT, 0, 0, c),
                            Slot("bn.weight", "bn", BATCHNORM, AFFINE, 0, 0, c),
                            Slot("conv2.weight", "conv2", CONV, IN, 1, 0, c)))]
        _, coef = coefficients(model, groups, be, reg=1e-3, alpha=4.0)
        assert torch.equal(coef, torch.full((c,), 1e-3, dtype=torch.float32)), trial


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_spread_above_the_rule_is_not_flat(backend, monkeypatch):
    be = backend_of(backend, monkeypatch)
    model = MLP(5, 7, 3)
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
        model.fc2.weight.zero_()
        model.fc1.weight[3] *= 1 + 64 * FLAT_SPREAD_RTOL  # spread ~64 x the threshold
    _, coef = coefficients(model, mlp_groups(7), be, alpha=4.0)
    torch.testing.assert_close(coef, torch.tensor([1.6] * 3 + [0.1] + [1.6] * 3), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ construction limits


@pytest.mark.parametrize("make, arg, exc", [
    (lambda: GroupNorm(alpha=128), "alpha", ValueError),
    (lambda: GroupNorm(alpha=65), "alpha", ValueError),
    (lambda: GroupNorm(reg=1e38, alpha=4), "reg", ValueError),
    (lambda: GroupNorm(reg=1e37, alpha=4), "reg \\* 2\\*\\*alpha", ValueError),
    (lambda: GroupNorm(reg=1e-4, alpha=float("inf")), "alpha", ValueError),
    (lambda: GroupNorm(reg=float("inf")), "reg", ValueError),
    (lambda: GroupNorm(reg=-1e-4), "reg", ValueError),
    (lambda: GroupNorm(reg="1e-4"), "reg", TypeError),
    (lambda: GroupNorm(reg=None), "reg", TypeError),
    (lambda: GroupNorm(reg=[1e-4]), "reg", TypeError),
    (lambda: GroupNorm(reg=torch.tensor(1e-4)), "reg.*item", TypeError),
    (lambda: GroupNorm(reg=True), "reg", TypeError),
    (lambda: GroupNorm(alpha="4"), "alpha", TypeError),
    (lambda: GroupNorm(alpha=None), "alpha", TypeError),
    (lambda: GroupNorm(decoupled="no"), "decoupled", TypeError),
    (lambda: GroupNorm(bias="False"), "bias", TypeError),
    (lambda: GroupNorm(bias=1), "bias", TypeError),
    (lambda: GroupNorm(refresh_every="2"), "refresh_every", TypeError),
    (lambda: GroupNorm(refresh_every=None), "refresh_every", TypeError),
    (lambda: GroupNorm(refresh_every=True), "refresh_every", TypeError),
    (lambda: GroupNorm(refresh_every=float("inf")), "refresh_every", ValueError),
    (lambda: GroupNorm(refresh_every=-3), "refresh_every", ValueError),
    (lambda: BNScale(reg=1e39), "reg", ValueError),
    (lambda: BNScale(reg=float("nan")), "reg", ValueError),
    (lambda: BNScale(decoupled=0), "decoupled", TypeError),
    (lambda: GroupLasso(reg=1e34), "reg / sqrt", ValueError),
    (lambda: GroupLasso(reg="x"), "reg", TypeError),
    (lambda: GroupLasso(refresh_every=[2]), "refresh_every", TypeError),
])
def test_bad_hyperparameters_are_refused_naming_the_argument(make, arg, exc):
    with pytest.raises(exc, match=arg):
        make()


def test_largest_allowed_hyperparameters_give_finite_coefficients():
    r = GroupNorm(reg=2.0**61, alpha=64)
    assert math.isfinite(float(torch.tensor(r.reg * 2.0**r.alpha, dtype=torch.float32)))
    assert GroupNorm(reg=1, alpha=2.5, refresh_every=3.0).refresh_every == 3  # integral floats are fine


# ------------------------------------------------------------------------------ overflow at a step


def fp16_model(scale: float):
    torch.manual_seed(0)
    model = MLP(6, 5, 4, dtype=torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
            p.grad = torch.randn_like(p) * 0.01
    return model


def snapshot(model):
    return [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in model.parameters()]


def assert_unchanged(model, snap):
    same = dict(rtol=0, atol=0, equal_nan=True)
    for p, (w, g) in zip(model.parameters(), snap):
        torch.testing.assert_close(p.detach(), w, **same)
        assert (p.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g, **same)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fp16_term_above_65504_is_refused_with_nothing_written(backend):
    model = fp16_model(scale=300.0)  # |w| ~ 100, n ~ 300: reg 20 * gamma 16 * 300 > 65504
    snap = snapshot(model)
    eng = Regularization(model, mlp_groups(5), GroupNorm(reg=20.0), backend=backend)
    with pytest.raises(ValueError, match=r"fc[12]\.weight.*float16.*nothing was modified"):
        eng.apply_to_grads()
    assert_unchanged(model, snap)
    assert eng.calls == 0
    Regularization(model, mlp_groups(5), GroupNorm(reg=1e-3), backend=backend).apply_to_grads()  # fine
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fp16_gradient_plus_term_that_rounds_to_inf_is_refused():
    """|term| >= 16 (half an fp16 ulp at 65504) can push a finite gradient to inf: then max|grad| is read."""
    model = fp16_model(scale=1.0)
    with torch.no_grad():
        model.fc1.weight.grad[0, 0] = 65504.0  # the largest float16
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"fc1\.weight\.grad \(max \|g\| = 65504\).*overflow float16"):
        Regularization(model, mlp_groups(5), GroupNorm(reg=2.0)).apply_to_grads()  # term up to ~ 2*16*2*n
    assert_unchanged(model, snap)
    Regularization(model, mlp_groups(5), GroupNorm(reg=1e-3)).apply_to_grads()  # |term| < 16: cannot round up
    assert torch.isfinite(model.fc1.weight.grad).all() and model.fc1.weight.grad[0, 0] == 65504.0


def test_fp16_decoupled_shrink_that_overflows_is_refused():
    model = fp16_model(scale=3000.0)
    snap = snapshot(model)
    eng = Regularization(model, mlp_groups(5), GroupNorm(reg=1.0, decoupled=True))
    lr = {id(p): 1e3 for p in model.parameters()}  # w * (1 - lr * coef) leaves fp16
    with pytest.raises(ValueError, match=r"weights.*float16|lr \* reg \* gamma"):
        eng.apply_decoupled(lr)
    assert_unchanged(model, snap)
    eng.apply_decoupled({id(p): 1e-2 for p in model.parameters()})
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cached_coefficients_reread_the_weights_where_the_term_can_grow():
    """refresh_every > 1: the bound of the last refresh is stale; with coefficients above 1 the weights
    are read again, and one that grew since is refused."""
    model = fp16_model(scale=1.0)
    eng = Regularization(model, mlp_groups(5), GroupNorm(reg=1.0, refresh_every=3))
    eng.apply_to_grads()  # refresh: small weights, fine
    with torch.no_grad():
        model.fc1.weight[0, 0] = 30000.0  # coef up to 16: term ~ 5e5
    snap = snapshot(model)
    with pytest.raises(ValueError, match="fc1.weight"):
        eng.apply_to_grads()
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", [1e20, float("inf"), float("nan")], ids=["overflow", "inf", "nan"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_sums_that_are_not_finite_are_refused_naming_the_group(bad, backend):
    model = MLP(6, 5, 4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        model.fc2.weight[1, 2] = bad  # float32 squares overflow above ~1.8e19
    snap = snapshot(model)
    groups = [Group(5, mlp_groups(5)[0].slots, origin="fc1")]
    with pytest.raises(ValueError, match=r"group #0 \(fc1\).*channel 2.*diverged"):
        Regularization(model, groups, GroupNorm(reg=1e-4), backend=backend).apply_to_grads()
    assert_unchanged(model, snap)


def test_group_lasso_and_bn_scale_are_guarded_too():
    bn = nn.Module()
    bn.bn = nn.BatchNorm1d(3).half()
    bn.bn.weight.grad = torch.zeros_like(bn.bn.weight)
    groups = [Group(3, (Slot("bn.weight", "bn", BATCHNORM, AFFINE, 0, 0, 3),))]
    with torch.no_grad():
        bn.bn.weight.fill_(1e-4)
    # GroupLasso: coef = 1e5 / sqrt(1e-8 + 1e-9) ~ 9.5e8, term = coef * 1e-4 ~ 9.5e4 > 65504
    with pytest.raises(ValueError, match="bn.weight"):
        Regularization(bn, groups, GroupLasso(reg=1e5)).apply_to_grads()
    with pytest.raises(ValueError, match="bn.weight"):
        Regularization(bn, groups, BNScale(reg=1e5)).apply_to_grads()  # reg * sign(w) > 65504
    assert torch.equal(bn.bn.weight.grad, torch.zeros_like(bn.bn.weight))
