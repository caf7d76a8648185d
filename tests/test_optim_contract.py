"""Contract tests of RegularizedOptimizer: it behaves as the optimizer it wraps, plus the term.

Every expectation is computed by hand: a second copy of the model is trained by the plain inner
optimizer on gradients regularized with `reference_terms` (the GroupNorm formula of DESIGN.md written
out below, in float64), and the two copies are compared.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tritonprune as tpr
from tritonprune.graph.group import AFFINE, BATCHNORM, CONV, IN, LINEAR, OUT, STAT, Group, Slot
from tritonprune.regularizing.optimizer import RegularizedOptimizer
from tritonprune.regularizing.regularizers import GroupNorm

REG = 0.05  # large enough that the term visibly changes the trajectory of every optimizer
ALPHA = 4.0
TOL = dict(rtol=1e-5, atol=1e-6)

# ---------------------------------------------------------------------------------- tiny model


class Net(nn.Module):
    """conv-bn-relu-conv-pool-linear on 4x4 inputs."""

    def __init__(self):
        super().__init__()
        # no bias before the BatchNorm: its gradient would be rounding noise, which Adam turns into
        # full-size steps and the comparisons into coin flips
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def net_groups() -> list[Group]:
    g1 = Group(
        size=6,
        origin="conv1",
        index=0,
        slots=(
            Slot("conv1.weight", "conv1", CONV, OUT, 0, 0, 6),
            Slot("bn.weight", "bn", BATCHNORM, AFFINE, 0, 0, 6),
            Slot("bn.bias", "bn", BATCHNORM, AFFINE, 0, 0, 6, is_bias=True),
            Slot("bn.running_mean", "bn", BATCHNORM, STAT, 0, 0, 6, is_buffer=True),
            Slot("bn.running_var", "bn", BATCHNORM, STAT, 0, 0, 6, is_buffer=True),
            Slot("conv2.weight", "conv2", CONV, IN, 1, 0, 6),
        ),
    )
    g2 = Group(
        size=5,
        origin="conv2",
        index=1,
        slots=(
            Slot("conv2.weight", "conv2", CONV, OUT, 0, 0, 5),
            Slot("conv2.bias", "conv2", CONV, OUT, 0, 0, 5, is_bias=True),
            Slot("fc.weight", "fc", LINEAR, IN, 1, 0, 5),
        ),
    )
    return [g1, g2]


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)


def loss_of(model: nn.Module, i: int) -> torch.Tensor:
    x, y = batch(i)
    return F.cross_entropy(model(x), y)


# ------------------------------------------------------------- the GroupNorm formula, by hand


def _importance_slots(group: Group, bias: bool) -> list[Slot]:
    return [
        s
        for s in group.slots
        if not s.is_buffer
        and (bias or not s.is_bias)
        and ((s.kind in (CONV, LINEAR) and s.role in (OUT, IN)) or (s.kind == BATCHNORM and s.role == AFFINE))
    ]


def _channel_scale(t: torch.Tensor, slot: Slot, per_channel: torch.Tensor) -> torch.Tensor:
    """A tensor broadcastable to `t`: per_channel[offset + i] on the indices slot channel i owns."""
    along = torch.zeros(t.shape[slot.dim], dtype=per_channel.dtype)
    for i, idx in enumerate(slot.indices()):
        along[idx] = per_channel[slot.offset + i]
    shape = [1] * t.dim()
    shape[slot.dim] = -1
    return along.view(shape)


def _channel_sumsq(w: torch.Tensor, slot: Slot) -> torch.Tensor:
    """sum of w^2 over the elements each slot channel owns: shape [slot.length]."""
    per_index = (w * w).movedim(slot.dim, 0).reshape(w.shape[slot.dim], -1).sum(1)
    return per_index[torch.tensor(slot.indices())].sum(1)


def reference_gammas(params: dict[str, torch.Tensor], groups: list[Group], alpha: float, bias: bool = False):
    gammas = []
    for g in groups:
        sq = torch.zeros(g.size, dtype=torch.float64)
        for s in _importance_slots(g, bias):
            sq[s.offset : s.offset + s.length] += _channel_sumsq(params[s.name].detach().double(), s)
        n = sq.sqrt()
        span = n.max() - n.min()
        if g.size == 1 or not torch.isfinite(span) or span == 0:
            gammas.append(torch.ones(g.size, dtype=torch.float64))
        else:
            gammas.append(2.0 ** (alpha * (n.max() - n) / span))
    return gammas


def reference_terms(
    params: dict[str, torch.Tensor],
    groups: list[Group],
    reg: float,
    alpha: float,
    bias: bool = False,
    gammas=None,
) -> dict[str, torch.Tensor]:
    """name -> reg * gamma * w on every importance slot of every group, in float64."""
    if gammas is None:
        gammas = reference_gammas(params, groups, alpha, bias)
    terms: dict[str, torch.Tensor] = {}
    for g, gamma in zip(groups, gammas):
        for s in _importance_slots(g, bias):
            w = params[s.name].detach().double()
            t = reg * _channel_scale(w, s, gamma) * w
            terms[s.name] = terms.get(s.name, 0) + t
    return terms


# ---------------------------------------------------------------------------------- helpers


def wrap(inner, model, **reg_kwargs) -> RegularizedOptimizer:
    kw = dict(reg=REG, alpha=ALPHA)
    kw.update(reg_kwargs)
    return RegularizedOptimizer(inner, model, groups=net_groups(), regularizer=GroupNorm(**kw))


def add_reference_term(model: nn.Module, groups=None, reg=REG, gammas=None) -> None:
    params = dict(model.named_parameters())
    terms = reference_terms(params, groups or net_groups(), reg, ALPHA, gammas=gammas)
    with torch.no_grad():
        for name, t in terms.items():
            if params[name].grad is not None:
                params[name].grad += t.to(params[name].grad.dtype)


def assert_same_params(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **(tol or TOL), msg=lambda m, name=name: f"{name}: {m}")


def params_differ(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in zip(a.parameters(), b.parameters()))


class Spy:
    """Counts the engine calls of a RegularizedOptimizer (and records them in `log`)."""

    def __init__(self, opt: RegularizedOptimizer, log: list | None = None):
        self.log = log if log is not None else []
        eng = opt._engine
        for name in ("apply_to_grads", "apply_decoupled"):
            orig = getattr(eng, name)

            def spy(*a, _orig=orig, _name=name, **k):
                self.log.append(_name)
                return _orig(*a, **k)

            setattr(eng, name, spy)

    def count(self, name: str) -> int:
        return self.log.count(name)


# ---------------------------------------------------------------------------- optimizer matrix

OPTIMIZERS = {
    "sgd": lambda p, **k: torch.optim.SGD(p, lr=0.1, **k),
    "sgd_momentum": lambda p, **k: torch.optim.SGD(p, lr=0.1, momentum=0.9, **k),
    "sgd_nesterov": lambda p, **k: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, **k),
    "adam": lambda p, **k: torch.optim.Adam(p, lr=1e-2, **k),
    "adamw": lambda p, **k: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, **k),
    "rmsprop": lambda p, **k: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, **k),
    "adagrad": lambda p, **k: torch.optim.Adagrad(p, lr=0.1, **k),
}
VARIANTS = {"foreach": dict(foreach=True), "forloop": dict(foreach=False), "fused": dict(fused=True)}
NO_FUSED_ON_CPU = {"rmsprop"}  # torch 2.13: RMSprop has no fused implementation


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_match_hand_regularized_inner_step(name, variant):
    if variant == "fused" and name in NO_FUSED_ON_CPU:
        pytest.skip(f"{name} has no fused variant")
    make = lambda m: OPTIMIZERS[name](m.parameters(), **VARIANTS[variant])
    a = make_net()
    b, plain = copy.deepcopy(a), copy.deepcopy(a)
    opt, opt_b, opt_plain = wrap(make(a), a), make(b), make(plain)
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    for i in range(2):  # the second step reads the state the first one wrote
        for m, o in ((a, opt), (b, opt_b), (plain, opt_plain)):
            o.zero_grad()
            loss_of(m, i).backward()
        add_reference_term(b)
        opt.step()
        opt_b.step()
        opt_plain.step()
    assert_same_params(a, b)
    assert params_differ(a, plain), "the regularization had no effect"
    assert len(opt.state) == len(opt_b.state) > 0 or name == "sgd"


def test_regularize_adds_term_without_stepping():
    a = make_net()
    b = copy.deepcopy(a)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a)
    loss_of(a, 0).backward()
    loss_of(b, 0).backward()
    opt.regularize()
    add_reference_term(b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, name=name: f"{name}.grad: {m}")
        assert torch.equal(p, q)  # no step taken
    assert len(opt.state) == 0
    # the term did land on a regularized weight (bias untouched with bias=False)
    c = copy.deepcopy(b)
    c.zero_grad()
    loss_of(c, 0).backward()
    assert not torch.allclose(a.conv1.weight.grad, c.conv1.weight.grad)
    torch.testing.assert_close(a.conv2.bias.grad, c.conv2.bias.grad)


# ------------------------------------------------------------------------------ LR schedulers


def _lr_sequence(make_sched, wrapped: bool, steps: int = 5, metric=None):
    m = make_net()
    inner = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt = wrap(inner, m) if wrapped else inner
    sched = make_sched(opt)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (step order, overridden step) fails the test
        for i in range(steps):
            opt.zero_grad()
            loss_of(m, i).backward()
            opt.step()
            sched.step(metric) if metric is not None else sched.step()
            lrs.append(inner.param_groups[0]["lr"])
            assert opt.param_groups[0]["lr"] == lrs[-1]
    return lrs


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=6),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_act_through_wrapper(name):
    got = _lr_sequence(SCHEDULERS[name], wrapped=True)
    assert got == pytest.approx(_lr_sequence(SCHEDULERS[name], wrapped=False))
    assert len(set(got)) > 1, "the schedule never changed the lr"


def test_reduce_lr_on_plateau_acts_through_wrapper():
    make = lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0)
    got = _lr_sequence(make, wrapped=True, steps=3, metric=1.0)  # never improves: halves each time
    assert got == pytest.approx([0.1, 0.05, 0.025])


def test_lr_set_on_either_side_is_seen_by_both():
    m = make_net()
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    opt = wrap(inner, m)
    opt.param_groups[0]["lr"] = 0.3
    assert inner.param_groups[0]["lr"] == 0.3
    inner.param_groups[0]["lr"] = 0.7
    assert opt.param_groups[0]["lr"] == 0.7
    assert opt.defaults is inner.defaults


# ------------------------------------------------------------------------------- GradScaler


def test_grad_scaler_regularizes_unscaled_grads():
    a = make_net()
    b = copy.deepcopy(a)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(2):
        opt.zero_grad()
        scaler.scale(loss_of(a, i)).backward()
        scaler.step(opt)
        scaler.update()
        opt_b.zero_grad()
        loss_of(b, i).backward()
        add_reference_term(b)
        opt_b.step()
    assert scaler.get_scale() == 2.0**10  # no overflow: both steps were taken
    assert_same_params(a, b)


@pytest.mark.parametrize("decoupled", [False, True])
def test_grad_scaler_skipped_step_does_nothing(decoupled):
    a = make_net()
    before = copy.deepcopy(a)
    opt = wrap(torch.optim.Adam(a.parameters(), lr=1e-2, fused=True), a, decoupled=decoupled)
    spy = Spy(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(a, 0)).backward()
    a.fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert spy.log == []
    assert len(opt.state) == 0
    assert scaler.get_scale() == 2.0**9
    for p, q in zip(a.parameters(), before.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------- closure


def test_closure_runs_once_under_enable_grad_and_is_not_passed_on():
    a = make_net()
    b = copy.deepcopy(a)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a)
    inner_calls = []
    opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: inner_calls.append((args[1:], kwargs)))
    spy = Spy(opt)
    grad_enabled = []

    def closure():
        grad_enabled.append(torch.is_grad_enabled())
        assert spy.log == []  # the closure runs before the regularization
        opt.zero_grad()
        loss = loss_of(a, 0)
        loss.backward()
        return loss

    with torch.no_grad():
        ret = opt.step(closure)
    assert grad_enabled == [True]
    assert inner_calls == [((), {})]
    assert spy.count("apply_to_grads") == 1
    loss_b = loss_of(b, 0)
    loss_b.backward()
    assert ret.item() == pytest.approx(loss_b.item())
    add_reference_term(b)
    torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9).step()
    assert_same_params(a, b)


def test_gradient_accumulation_regularizes_once_per_step():
    a = make_net()
    b = copy.deepcopy(a)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a)
    spy = Spy(opt)
    for m in (a, b):
        loss_of(m, 0).backward()
        loss_of(m, 1).backward()
    opt.step()
    add_reference_term(b)  # one term on the accumulated gradient
    torch.optim.SGD(b.parameters(), lr=0.1).step()
    assert spy.count("apply_to_grads") == 1
    assert_same_params(a, b)


# -------------------------------------------------------------------- zero_grad, frozen params


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_is_forwarded(set_to_none):
    a = make_net()
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a)
    loss_of(a, 0).backward()
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    for p in a.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("decoupled", [False, True])
def test_params_without_grad_are_skipped_and_untouched(decoupled):
    a = make_net()
    a.bn.weight.requires_grad_(False)  # frozen, but still counted in the channel norms
    a.unused = nn.Linear(2, 2)  # in the optimizer, never in forward
    b = copy.deepcopy(a)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a, decoupled=decoupled)
    loss_of(a, 0).backward()
    loss_of(b, 0).backward()
    frozen, unused = a.bn.weight.clone(), a.unused.weight.clone()
    opt.step()
    assert a.bn.weight.grad is None and a.unused.weight.grad is None
    assert torch.equal(a.bn.weight, frozen) and torch.equal(a.unused.weight, unused)
    # the other regularized weights moved as the formula says (norms include the frozen bn.weight)
    if decoupled:
        torch.optim.SGD(b.parameters(), lr=0.1).step()
        terms = reference_terms(dict(b.named_parameters()), net_groups(), REG, ALPHA)
        with torch.no_grad():
            for name, p in b.named_parameters():
                if name in terms and p.grad is not None:
                    p -= 0.1 * terms[name].float()
    else:
        add_reference_term(b)
        torch.optim.SGD(b.parameters(), lr=0.1).step()
    assert_same_params(a, b)


# ---------------------------------------------------------------------------------- state_dict


def test_state_dict_round_trip_continues_identically():
    a = make_net()
    opt = wrap(torch.optim.Adam(a.parameters(), lr=1e-2), a)
    for i in range(2):
        opt.zero_grad()
        loss_of(a, i).backward()
        opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"] == opt.optimizer.state_dict()["param_groups"]
    assert len(sd["state"]) == len(list(a.parameters()))

    c = make_net(seed=1)
    c.load_state_dict(a.state_dict())
    opt_c = wrap(torch.optim.Adam(c.parameters(), lr=0.5), c)  # lr comes back from the checkpoint
    opt_c.load_state_dict(copy.deepcopy(sd))
    assert opt_c.param_groups is opt_c.optimizer.param_groups  # load_state_dict replaced the list
    assert opt_c.param_groups[0]["lr"] == 1e-2
    fresh = copy.deepcopy(c)
    opt_fresh = wrap(torch.optim.Adam(fresh.parameters(), lr=1e-2), fresh)  # same weights, no moments
    for i in range(2, 4):
        for m, o in ((a, opt), (c, opt_c), (fresh, opt_fresh)):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step()
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    assert params_differ(a, fresh), "the optimizer state made no difference"


def test_state_dict_hooks_on_wrapper_run():
    a = make_net()
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("sd_pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(("sd_post", "state" in sd)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load_pre", o is opt)))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", o is opt)))
    opt.load_state_dict(opt.state_dict())
    assert seen == [("sd_pre", True), ("sd_post", True), ("load_pre", True), ("load_post", True)]


# ------------------------------------------------------------------------- hooks, param groups


def test_step_hooks_on_wrapper_run_around_the_regularized_step():
    a = make_net()
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a)
    log: list = []
    Spy(opt, log)
    opt.optimizer.register_step_pre_hook(lambda o, args, kw: log.append("inner_step"))
    h_pre = opt.register_step_pre_hook(lambda o, args, kw: log.append(("pre", o is opt)))
    h_post = opt.register_step_post_hook(lambda o, args, kw: log.append(("post", o is opt)))
    loss_of(a, 0).backward()
    opt.step()
    assert log == [("pre", True), "apply_to_grads", "inner_step", ("post", True)]
    h_pre.remove()
    h_post.remove()
    log.clear()
    opt.step()
    assert log == ["apply_to_grads", "inner_step"]


def test_add_param_group_is_forwarded_and_stepped():
    a = make_net()
    b = copy.deepcopy(a)
    head = lambda m: list(m.fc.parameters())
    body = lambda m: [p for n, p in m.named_parameters() if not n.startswith("fc.")]
    opt = wrap(torch.optim.SGD(body(a), lr=0.1, momentum=0.9), a)
    opt.add_param_group({"params": head(a), "lr": 0.2})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups[1]["momentum"] == 0.9
    opt_b = torch.optim.SGD([{"params": body(b)}, {"params": head(b), "lr": 0.2}], lr=0.1, momentum=0.9)
    for i in range(2):
        for m, o in ((a, opt), (b, opt_b)):
            o.zero_grad()
            loss_of(m, i).backward()
        add_reference_term(b)
        opt.step()
        opt_b.step()
    assert_same_params(a, b)


# ----------------------------------------------------------------------------- pickle, repr


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_pickle_and_deepcopy_copy_model_and_state_together(how):
    a = make_net()
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # sets an unpicklable step wrapper on opt
    opt.register_step_pre_hook(lambda o, args, kw: None)  # lambdas are dropped, like torch does
    loss_of(a, 0).backward()
    opt.step()
    opt2 = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    b = opt2.model
    assert b is not a and isinstance(opt2, RegularizedOptimizer)
    params_b = set(map(id, b.parameters()))
    assert all(id(p) in params_b for g in opt2.param_groups for p in g["params"])
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert len(opt2.groups) == 2 and repr(opt2.regularizer) == repr(opt.regularizer)
    assert len(opt2._optimizer_step_pre_hooks) == 0
    for i in range(1, 3):
        for m, o in ((a, opt), (b, opt2)):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_repr_shows_inner_optimizer_and_regularizer():
    a = make_net()
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a)
    text = repr(opt)
    assert text.startswith("RegularizedOptimizer(")
    assert "SGD (" in text and "momentum: 0.9" in text
    assert repr(opt.regularizer) in text and "groups=2" in text


# ---------------------------------------------------------------------------- decoupled mode


def test_decoupled_mode_shrinks_after_the_step_with_each_groups_lr():
    a = make_net()
    b = copy.deepcopy(a)
    groups_of = lambda m: [
        {"params": [p for n, p in m.named_parameters() if n.startswith(("conv1", "bn"))], "lr": 0.2},
        {"params": [p for n, p in m.named_parameters() if not n.startswith(("conv1", "bn"))]},
    ]
    inner = torch.optim.Adam(groups_of(a), lr=1e-2)
    inner.param_groups[1]["lr"] = torch.tensor(0.05)  # tensor lr works too
    opt = wrap(inner, a, decoupled=True)
    opt_b = torch.optim.Adam(groups_of(b), lr=1e-2)
    opt_b.param_groups[1]["lr"] = torch.tensor(0.05)
    lr_of = {id(p): float(g["lr"]) for g in opt_b.param_groups for p in g["params"]}
    for i in range(2):
        for m, o in ((a, opt), (b, opt_b)):
            o.zero_grad()
            loss_of(m, i).backward()
        raw = {n: p.grad.clone() for n, p in a.named_parameters()}
        opt.step()
        for n, p in a.named_parameters():  # the inner step saw the raw gradients
            assert torch.equal(p.grad, raw[n])
        opt_b.step()
        terms = reference_terms(dict(b.named_parameters()), net_groups(), REG, ALPHA)  # on updated weights
        with torch.no_grad():
            for n, p in b.named_parameters():
                if n in terms:
                    p -= lr_of[id(p)] * terms[n].float()
    assert_same_params(a, b)


def test_refresh_every_keeps_gamma_for_n_steps():
    n = 3
    a = make_net()
    b = copy.deepcopy(a)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a, refresh_every=n)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    gammas = None
    for i in range(n + 2):
        for m, o in ((a, opt), (b, opt_b)):
            o.zero_grad()
            loss_of(m, i).backward()
        if i % n == 0:
            gammas = reference_gammas(dict(b.named_parameters()), net_groups(), ALPHA)
        add_reference_term(b, gammas=gammas)
        opt.step()
        opt_b.step()
    assert_same_params(a, b)
    # and it could fail: gamma recomputed every step gives another trajectory
    c = copy.deepcopy(make_net())
    opt_c = wrap(torch.optim.SGD(c.parameters(), lr=0.1), c)
    for i in range(n + 2):
        opt_c.zero_grad()
        loss_of(c, i).backward()
        opt_c.step()
    assert params_differ(a, c)


def test_reset_groups_regularizes_only_the_new_groups():
    a = make_net()
    b = copy.deepcopy(a)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1), a)
    only_first = net_groups()[:1]
    opt.reset_groups(only_first)
    assert opt.groups == only_first
    loss_of(a, 0).backward()
    loss_of(b, 0).backward()
    opt.step()
    add_reference_term(b, groups=only_first)
    torch.optim.SGD(b.parameters(), lr=0.1).step()
    assert_same_params(a, b)


# ------------------------------------------------------------------------------------ errors


def test_errors_say_what_to_do():
    m = make_net()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="example_inputs.*groups"):
        RegularizedOptimizer(sgd, m, regularizer=GroupNorm())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        RegularizedOptimizer(object(), m, groups=net_groups(), regularizer=GroupNorm())
    with pytest.raises(ValueError, match="same model"):
        RegularizedOptimizer(sgd, make_net(), groups=net_groups(), regularizer=GroupNorm())
    with pytest.raises(ValueError, match="ignored_layers"):
        RegularizedOptimizer(sgd, m, groups=net_groups(), ignored_layers=[m.fc], regularizer=GroupNorm())
    with pytest.raises(TypeError, match="LBFGS"):
        RegularizedOptimizer(
            torch.optim.LBFGS(m.parameters()), m, groups=net_groups(), regularizer=GroupNorm()
        )
    opt = RegularizedOptimizer(sgd, m, groups=net_groups(), regularizer=GroupNorm())
    with pytest.raises(TypeError, match="already regularized"):
        RegularizedOptimizer(opt, m, groups=net_groups(), regularizer=GroupNorm())


# ------------------------------------------------------------------- groups from find_groups


def test_groups_found_from_example_inputs_and_string_regularizer():
    m = make_net()
    x = (batch(0)[0],)
    opt = RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, x, regularizer="group_norm")
    assert opt.groups == net_groups()  # the hand-built groups are what find_groups sees
    assert isinstance(opt.regularizer, GroupNorm) and opt.regularizer.reg == 1e-4
    ignored = RegularizedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), m, x, regularizer="group_norm", ignored_layers=[m.conv2]
    )
    assert ignored.groups == tpr.find_groups(m, x, ignored_layers=[m.conv2])
    assert ignored.groups != opt.groups


@pytest.mark.parametrize("decoupled", [False, True])
def test_bn_scale_through_the_wrapper(decoupled):
    a = make_net()
    b = copy.deepcopy(a)
    reg, lr = 0.01, 0.1
    opt = RegularizedOptimizer(
        torch.optim.SGD(a.parameters(), lr=lr),
        a,
        groups=net_groups(),
        regularizer=tpr.BNScale(reg, decoupled),
    )
    loss_of(a, 0).backward()
    loss_of(b, 0).backward()
    opt.step()
    if not decoupled:
        b.bn.weight.grad += reg * b.bn.weight.detach().sign()
    torch.optim.SGD(b.parameters(), lr=lr).step()
    if decoupled:
        with torch.no_grad():
            b.bn.weight -= lr * reg * b.bn.weight.sign()
    assert_same_params(a, b)


def test_training_continues_through_the_wrapper_after_pruning():
    a = make_net()
    x = (batch(0)[0],)
    opt = wrap(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a)
    loss_of(a, 0).backward()
    opt.step()
    opt.zero_grad()
    tpr.prune(a, x, ratio=0.5, optimizer=opt)
    assert [g.size for g in opt.groups] == [3, 2]
    stepped = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in stepped] == [id(p) for p in a.parameters()]  # the sliced parameters
    b = copy.deepcopy(a)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # the sliced momentum, not shared
    loss_of(a, 1).backward()
    loss_of(b, 1).backward()
    add_reference_term(b, groups=opt.groups)
    opt.step()
    opt_b.step()
    assert_same_params(a, b)


def test_only_the_wrapped_optimizers_params_get_the_term():
    model = make_net()
    x = torch.randn(4, 3, 4, 4)
    model(x).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    # conv1 only: conv2 and bn belong to another optimizer (or are frozen by the user's choice)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD([model.conv1.weight], lr=0.0), model,
                                   groups=net_groups(), regularizer=tpr.GroupNorm(reg=0.1))
    opt.regularize()
    assert not torch.equal(model.conv1.weight.grad, before["conv1.weight"])
    for name in ("conv2.weight", "bn.weight", "fc.weight"):
        assert torch.equal(dict(model.named_parameters())[name].grad, before[name]), name
    opt.add_param_group({"params": [model.conv2.weight]})
    opt.regularize()
    assert not torch.equal(model.conv2.weight.grad, before["conv2.weight"])
