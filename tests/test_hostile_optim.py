"""Issue 21 (optimizer semantics, state across pruning): maximize, decoupled steps refused before the inner
step, the sign-flipping shrink, stale or foreign optimizer state, Adafactor's factored state, and a
tampered regularizer entry. Every refused call is checked to have modified nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tritonprune as tpr
from tritonprune.regularizing.optimizer import STATE_KEY, RegularizedOptimizer


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def make():
    torch.manual_seed(0)
    return MLP()


def backward(model, i=0):
    g = torch.Generator().manual_seed(10 + i)
    x, y = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    F.cross_entropy(model(x), y).backward()


def wrap(model, inner=None, reg=0.05, **kw):
    inner = inner or torch.optim.SGD(model.parameters(), lr=0.1)
    return RegularizedOptimizer(inner, model, (X,), regularizer=tpr.GroupNorm(reg=reg, **kw))


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def assert_unchanged(model, opt, snap):
    ws, gs, sd = snap
    for p, w, g in zip(model.parameters(), ws, gs):
        assert torch.equal(p.detach(), w)
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(now["state"][i][k], v) if torch.is_tensor(v) else now["state"][i][k] == v


# ------------------------------------------------------------------------------------------ maximize


@pytest.mark.parametrize("inner", [lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True),
                                   lambda ps: torch.optim.Adam(ps, lr=0.1, maximize=True)], ids=["sgd", "adam"])
def test_maximize_is_refused_in_coupled_mode(inner):
    m = make()
    with pytest.raises(ValueError, match="maximize=True.*decoupled=True"):
        wrap(m, inner(m.parameters()))


def test_maximize_set_after_construction_is_refused_before_any_change():
    m = make()
    opt = wrap(m)
    backward(m)
    opt.param_groups[0]["maximize"] = True
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match="maximize=True"):
        opt.step()
    assert_unchanged(m, opt, snap)


def test_maximize_with_decoupled_still_shrinks_the_weights():
    """Decoupled, the shrink does not go through the inner step's direction: the term still shrinks."""
    m = make()
    opt = wrap(m, torch.optim.SGD(m.parameters(), lr=0.1, maximize=True), reg=0.5, decoupled=True)
    norm0 = m.fc1.weight.detach().norm()
    for _ in range(5):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)  # no loss: only the regularization moves the weights
        opt.step()
    assert m.fc1.weight.detach().norm() < norm0


# ------------------------------------------------------------------------------------------ decoupled


def test_decoupled_inf_weight_is_refused_before_the_inner_step():
    m = make()
    opt = wrap(m, torch.optim.Adam(m.parameters(), lr=1e-2), decoupled=True)
    backward(m)
    opt.step()
    backward(m, 1)
    with torch.no_grad():
        m.fc1.weight[0, 0] = float("inf")
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match="fc1.weight holds inf/NaN.*nothing was modified"):
        opt.step()
    assert_unchanged(m, opt, snap)


@pytest.mark.parametrize("lr", [100.0, float("nan"), float("inf")])
def test_decoupled_huge_or_bad_lr_is_refused_before_the_inner_step(lr):
    m = make()
    opt = wrap(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), decoupled=True)
    backward(m)
    opt.step()
    backward(m, 1)
    opt.param_groups[0]["lr"] = lr
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"lr \(100\) \* reg \(0.05\) \* gamma \(up to 2\*\*alpha = 16\)|finite lr"):
        opt.step()
    assert_unchanged(m, opt, snap)


def test_decoupled_shrink_that_would_flip_signs_is_refused_naming_the_three_factors():
    m = make()
    opt = wrap(m, torch.optim.SGD(m.parameters(), lr=1.0), reg=0.1, decoupled=True)  # 1 * 0.1 * 16 = 1.6
    backward(m)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"lr \(1\) \* reg \(0.1\) \* gamma \(up to 2\*\*alpha = 16\) = 1.6 > 1"):
        opt.step()
    assert_unchanged(m, opt, snap)
    opt.param_groups[0]["lr"] = 0.5  # 0.8: allowed, and no weight grows
    before = [p.detach().abs().max() for p in m.parameters()]
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(p.detach().abs().max() <= b for p, b in zip(m.parameters(), before))


# ------------------------------------------------------------------------------------------ state


def _pruned_with(inner_cls, **kw):
    m = make()
    opt = wrap(m, inner_cls(m.parameters(), **kw))
    for i in range(2):
        opt.zero_grad()
        backward(m, i)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    tpr.prune(m, (X,), ratio=0.5, optimizer=opt)
    return m, opt, saved


def test_state_saved_before_pruning_is_refused_at_load_naming_the_parameter():
    m, opt, saved = _pruned_with(torch.optim.SGD, lr=0.1, momentum=0.9)
    backward(m)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"momentum_buffer.*fc1.weight.*before pruning"):
        opt.load_state_dict(saved)
    assert_unchanged(m, opt, snap)
    opt.step()  # still usable


def test_adafactor_factored_state_is_sliced_with_the_parameter():
    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch without Adafactor")
    m, opt, _ = _pruned_with(torch.optim.Adafactor, lr=1e-2)
    for p in m.parameters():
        st = opt.state[p]
        if p.dim() >= 2:
            assert st["row_var"].shape[:-1] == p.shape[:-1] and st["col_var"].shape[-1] == p.shape[-1]
    opt.zero_grad()
    backward(m)
    opt.step()  # used to crash inside torch on the old shapes
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_state_that_cannot_be_placed_is_refused_before_pruning_anything():
    m = make()
    opt = wrap(m)
    backward(m)
    opt.step()
    opt.state[m.fc1.weight]["odd"] = torch.ones(3, 5)  # follows no dim of fc1.weight (16, 8)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=r"fc1.weight: the optimizer's state 'odd' has shape \(3, 5\)"):
        tpr.prune(m, (X,), ratio=0.5, optimizer=opt)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert opt.param_groups[0]["params"][0] is m.fc1.weight


@pytest.mark.parametrize("bad", [
    lambda n: torch.full((n,), -1e30), lambda n: torch.full((n,), float("nan")), lambda n: torch.ones(n + 1),
    lambda n: torch.ones(n, dtype=torch.int64), lambda n: "nope"], ids=["negative", "nan", "shape", "int", "str"])
def test_tampered_cached_coefficients_are_refused_at_load(bad):
    m = make()
    opt = RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, (X,),
                               regularizer=tpr.GroupNorm(reg=0.05, refresh_every=3))
    backward(m)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    n = sd[STATE_KEY]["coef"].numel()
    sd[STATE_KEY]["coef"] = bad(n)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match="cached coefficients"):
        opt.load_state_dict(sd)
    assert_unchanged(m, opt, snap)
    sd[STATE_KEY] = {**opt.state_dict()[STATE_KEY], "calls": -3}
    with pytest.raises(ValueError, match="calls=-3"):
        opt.load_state_dict(sd)
    assert_unchanged(m, opt, snap)
