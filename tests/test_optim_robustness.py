"""RegularizedOptimizer under hostile or changing conditions: arguments refused at construction, a model
changed behind its back, sparse gradients, transactional steps, frozen parameters, refresh_every resume,
and attributes of the inner optimizer."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tritonprune as tpr
from tritonprune.regularizing.bounds import TermBounds
from tritonprune.regularizing.optimizer import RegularizedOptimizer


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def batch(i):
    g = torch.Generator().manual_seed(10 + i)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def backward(model, i):
    x, y = batch(i)
    F.cross_entropy(model(x), y).backward()


def make(seed=0):
    torch.manual_seed(seed)
    return MLP()


GROUPS = None


def groups():
    global GROUPS
    if GROUPS is None:
        GROUPS = tpr.find_groups(make(), (X,))
    return GROUPS


def wrap(model, inner=None, **kw):
    inner = inner or torch.optim.SGD(model.parameters(), lr=0.1)
    return RegularizedOptimizer(inner, model, groups=groups(), regularizer=tpr.GroupNorm(reg=0.05, **kw))


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.optimizer.state_dict()))


def assert_unchanged(model, opt, snap):
    ws, gs, sd = snap
    for p, w, g in zip(model.parameters(), ws, gs):
        assert torch.equal(p.detach(), w)
        assert (p.grad is None and g is None) or torch.equal(p.grad.to_dense(), g.to_dense())
    assert repr(opt.optimizer.state_dict()) == repr(sd)


# ------------------------------------------------------------------------------------- construction


def test_groups_cover_the_mlp():
    assert [g.size for g in groups()] == [16, 12]


def test_unknown_backend_is_refused_at_construction():
    m = make()
    for bad in ("cuda", "Torch", None, 3):
        with pytest.raises(ValueError, match="backend"):
            RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, groups=groups(),
                                 regularizer="group_norm", backend=bad)


def test_meta_model_is_refused_by_us():
    with torch.device("meta"):
        m = MLP()
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, groups=groups(), regularizer="group_norm")


def test_no_groups_warns():
    m = make()
    with pytest.warns(UserWarning, match="no channel groups"):
        opt = RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, groups=[], regularizer="group_norm")
    backward(m, 0)
    opt.step()  # still a working optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(make())


# ----------------------------------------------------------------------------- model changed after wrap


@pytest.mark.parametrize("decoupled", [False, True])
def test_layer_replaced_by_a_wider_one_is_detected_before_anything_changes(decoupled):
    m = make()
    opt = wrap(m, decoupled=decoupled)
    backward(m, 0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    m.fc1 = nn.Linear(8, 20)  # was 16: the group would cover only 16 of its 20 rows
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"fc1\.weight now has shape \(20, 8\).*\(16, 8\).*[Rr]ebuild the optimizer"):
        opt.step()
    assert_unchanged(m, opt, snap)  # decoupled too: the inner step did not run


@pytest.mark.parametrize("decoupled", [False, True])
def test_sparse_gradient_is_a_clear_error_and_nothing_changes(decoupled):
    m = make()
    opt = wrap(m, inner=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), decoupled=decoupled)
    backward(m, 0)
    m.fc2.weight.grad = m.fc2.weight.grad.to_sparse()
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"fc2\.weight\.grad is a torch.sparse_coo tensor.*dense"):
        opt.step()
    assert_unchanged(m, opt, snap)


def test_coupled_step_whose_check_fails_leaves_grads_untouched(monkeypatch):
    m = make()
    opt = wrap(m, inner=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    backward(m, 0)
    opt.step()
    backward(m, 1)

    def refuse(self, *a, **k):
        raise ValueError("injected: term out of range")

    monkeypatch.setattr(TermBounds, "check_scaled", refuse)
    snap = snapshot(m, opt)
    calls = opt._engine.calls
    with pytest.raises(ValueError, match="injected"):
        opt.step()
    assert_unchanged(m, opt, snap)
    assert opt._engine.calls == calls


def test_decoupled_step_that_fails_validation_does_not_step(monkeypatch):
    m = make()
    opt = wrap(m, inner=torch.optim.Adam(m.parameters(), lr=1e-2), decoupled=True)
    backward(m, 0)
    opt.step()
    backward(m, 1)

    def broken(*a, **k):
        raise ValueError("injected: buffers cannot be built")

    monkeypatch.setattr(opt._engine, "prepare", broken)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match="injected"):
        opt.step()
    assert_unchanged(m, opt, snap)


# ----------------------------------------------------------------------------------------- frozen


@pytest.mark.parametrize("decoupled", [False, True])
def test_layer_frozen_mid_training_never_moves(decoupled):
    m = make()
    opt = wrap(m, decoupled=decoupled)  # plain SGD: a zero grad moves nothing by itself
    for i in range(40):
        if i == 10:
            m.fc2.requires_grad_(False)  # keeps its zero .grad under set_to_none=False
            frozen = [p.detach().clone() for p in m.fc2.parameters()]
        backward(m, i)
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert m.fc2.weight.grad is not None
    for p, w in zip(m.fc2.parameters(), frozen):
        assert torch.equal(p.detach(), w)
    # unfreezing takes effect at the next step
    m.fc2.requires_grad_(True)
    backward(m, 40)
    opt.step()
    assert not torch.equal(m.fc2.weight.detach(), frozen[0])


def test_frozen_layer_would_have_moved_without_the_check():
    """The test above can fail: the same zero .grad with requires_grad on gets the term."""
    m = make()
    opt = wrap(m)
    backward(m, 0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    before = m.fc2.weight.detach().clone()
    opt.step()  # zero gradients: only the term moves it
    assert not torch.equal(m.fc2.weight.detach(), before)


# ------------------------------------------------------------------------------- refresh_every resume


def train(model, opt, steps):
    for i in steps:
        opt.zero_grad()
        backward(model, i)
        opt.step()


@pytest.mark.parametrize("decoupled", [False, True])
def test_refresh_every_resume_is_bitwise(decoupled):
    n = 4
    full = make()
    opt_full = wrap(full, inner=torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9), refresh_every=n,
                    decoupled=decoupled)
    train(full, opt_full, range(7))

    first = make()
    opt_first = wrap(first, inner=torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9), refresh_every=n,
                     decoupled=decoupled)
    train(first, opt_first, range(2))  # stops between two refreshes
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["tritonprune"]["coef_age"] == 2

    def resumed(with_cache: bool):
        m = make(seed=1)
        m.load_state_dict(ckpt["model"])
        o = wrap(m, inner=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), refresh_every=n,
                 decoupled=decoupled)
        sd = copy.deepcopy(ckpt["opt"])
        if not with_cache:
            del sd["tritonprune"]
        o.load_state_dict(sd)
        train(m, o, range(2, 7))
        return m

    for p, q in zip(full.parameters(), resumed(True).parameters()):
        assert torch.equal(p, q)
    # and it could fail: without the cached coefficients the resumed run recomputes them early
    assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), resumed(False).parameters()))


def test_plain_optimizer_loads_the_wrappers_state_dict_and_mismatch_is_refused():
    m = make()
    opt = wrap(m, refresh_every=3)
    train(m, opt, range(2))
    sd = opt.state_dict()
    torch.optim.SGD(m.parameters(), lr=0.1).load_state_dict(copy.deepcopy(sd))  # extra key ignored
    other = wrap(make())  # refresh_every=1: no entry
    assert "tritonprune" not in other.state_dict()
    small = make()
    opt_small = RegularizedOptimizer(torch.optim.SGD(small.parameters(), lr=0.3), small,
                                     groups=groups()[:1], regularizer=tpr.GroupNorm(reg=0.05, refresh_every=3))
    before = repr(opt_small.optimizer.state_dict())
    with pytest.raises(ValueError, match="another model"):
        opt_small.load_state_dict(copy.deepcopy(sd))
    assert repr(opt_small.optimizer.state_dict()) == before  # refused before the inner optimizer loaded
    assert opt_small.param_groups[0]["lr"] == 0.3


def test_pickle_keeps_the_cached_coefficients():
    m = make()
    opt = wrap(m, refresh_every=5)
    train(m, opt, range(2))
    opt2 = pickle.loads(pickle.dumps(opt))
    train(m, opt, range(2, 4))
    train(opt2.model, opt2, range(2, 4))
    for p, q in zip(m.parameters(), opt2.model.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------- inner attributes


class ScheduleFreeLike(torch.optim.SGD):
    """Stands in for schedule-free optimizers: train()/eval() switch the weights they expose."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.train_mode = True

    def train(self):
        self.train_mode = True

    def eval(self):
        self.train_mode = False


def test_inner_methods_and_attributes_are_forwarded():
    m = make()
    opt = wrap(m, inner=ScheduleFreeLike(m.parameters(), lr=0.1))
    opt.eval()
    assert opt.train_mode is False and opt.optimizer.train_mode is False
    opt.train()
    assert opt.optimizer.train_mode is True
    with pytest.raises(AttributeError, match="nor has the wrapped ScheduleFreeLike"):
        opt.no_such_method()
    with pytest.raises(AttributeError):
        opt._private_of_inner  # noqa: B018 - private names are not forwarded
    assert isinstance(pickle.loads(pickle.dumps(opt)), RegularizedOptimizer)
