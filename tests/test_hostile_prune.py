"""Issue 21 (plans, prune, errors, CLI): tampered plan metadata, zero_ validating as apply does, foreign
optimizers, a model changed behind the optimizer's groups, bounded steps, typed flags and seeds, groups
that are not Groups, importance callables returning junk, and the CLI's early checks. Every refused call
is checked to have modified nothing."""

from __future__ import annotations

import copy
import math
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_slicing import make_net, net_groups  # noqa: I001

import tritonprune as tpr
from tritonprune.app import cli
from tritonprune.pruning.plan import PrunePlan
from tritonprune.pruning.pruner import prune


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model), [id(p) for p in model.parameters()]


def same(model, snap):
    sd, text, ids = snap
    now = model.state_dict()
    return (now.keys() == sd.keys() and all(now[k].shape == v.shape and torch.equal(now[k], v) for k, v in sd.items())
            and repr(model) == text and [id(p) for p in model.parameters()] == ids)


def plan_dict():
    model, x = make_net()
    return prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True).to_dict()


def _slot(d, gi, name):
    return next(s for s in d["groups"][gi]["slots"] if s["name"] == name)


# ------------------------------------------------------------------------------------ tampered plans


@pytest.mark.parametrize("edit, match", [
    (lambda d: _slot(d, 0, "bn1.running_mean").update(is_buffer=False), "is_buffer=False.*a buffer"),
    (lambda d: _slot(d, 0, "conv1.weight").update(is_buffer=True), "is_buffer=True.*a parameter"),
    (lambda d: _slot(d, 0, "conv1.bias").update(is_bias=False), "is_bias=False"),
    (lambda d: _slot(d, 0, "bn1.weight").update(is_bias=True), "is_bias=True"),
    (lambda d: _slot(d, 0, "bn1.weight").update(role="stat"), "role 'stat'"),
    (lambda d: _slot(d, 0, "bn1.weight").update(kind="layernorm"), "kind 'layernorm'"),
    (lambda d: _slot(d, 0, "conv1.weight").update(kind="param"), "kind 'param'"),
    (lambda d: _slot(d, 5, "fc.weight").update(role="affine"), "role 'affine'"),
], ids=["stat_as_param", "param_as_buffer", "bias_flag_off", "bias_flag_on", "bn_role", "bn_kind", "conv_kind",
        "linear_role"])
def test_edited_slot_metadata_is_checked_against_the_model(edit, match, tmp_path):
    d = plan_dict()
    edit(d)
    (tmp_path / "p.json").write_text(__import__("json").dumps(d))
    plan = PrunePlan.load(tmp_path / "p.json")  # the schema alone cannot tell
    model, _ = make_net()
    snap = snapshot(model)
    for call in (lambda: plan.apply(model, check_run=False), lambda: plan.zero_(model)):
        with pytest.raises(ValueError, match=match):
            call()
        assert same(model, snap)


def test_zero_refuses_what_apply_refuses():
    d = plan_dict()
    _slot(d, 3, "dw.weight")["repeat"] = 1  # covers half of the depthwise conv's rows
    plan = PrunePlan.from_dict(d)
    model, _ = make_net()
    snap = snapshot(model)
    for call in (lambda: plan.apply(model, check_run=False), lambda: plan.zero_(model)):
        with pytest.raises(ValueError, match="rows removed per conv group differ"):
            call()
        assert same(model, snap)


# ------------------------------------------------------------------------------------ optimizers


def test_an_optimizer_over_another_model_is_refused():
    model, x = make_net()
    other, _ = make_net()
    foreign = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="none of the optimizer's parameters belongs to this model"):
        prune(model, x, ratio=0.5, groups=net_groups(), optimizer=foreign)
    plan = prune(copy.deepcopy(model), x, ratio=0.5, groups=net_groups(), dry_run=True)
    with pytest.raises(ValueError, match="none of the optimizer's parameters belongs to this model"):
        plan.apply(model, optimizer=foreign)
    assert same(model, snap)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if hasattr(self, "scale"):
            h = h * self.scale  # a buffer added after the groups were found: it follows fc1's channels
        return self.fc2(h)


def test_model_changed_since_the_optimizers_groups_is_refused():
    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(4, 8)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, x,
                                   regularizer=tpr.GroupNorm(1e-3))
    model.register_buffer("scale", torch.rand(16) + 0.5)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="changed .* since the optimizer's groups were found"):
        prune(model, None, ratio=0.5, optimizer=opt)
    assert same(model, snap)
    opt.reset_groups(tpr.find_groups(model, x))  # the way out the message names
    prune(model, None, ratio=0.5, optimizer=opt)
    assert model.scale.shape == (8,) and model(x).shape == (4, 3)


def test_reset_groups_and_groups_argument_refuse_non_groups():
    model, x = make_net()
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, groups=net_groups(),
                                   regularizer=tpr.GroupNorm(1e-3))
    before = list(opt.groups)
    with pytest.raises(TypeError, match=r"reset_groups: groups\[0\] is a int"):
        opt.reset_groups([1, 2])
    assert opt.groups == before
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"groups\[0\] is a int"):
        prune(model, x, groups=[1, 2])
    assert same(model, snap)


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dry_run="no"), TypeError, "dry_run must be True or False"),
    (dict(global_pruning=1), TypeError, "global_pruning must be True or False"),
    (dict(bias="yes"), TypeError, "bias must be True or False"),
    (dict(importance="random", seed=2**70), ValueError, "seed must be an int"),
    (dict(importance="random", seed=1.5), ValueError, "seed must be an int"),
    (dict(steps=10**6), ValueError, "steps=1000000"),
    (dict(steps=40), ValueError, "more rounds than the .* channels"),
])
def test_bad_arguments_are_refused_before_anything(kwargs, exc, match):
    model, x = make_net()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        prune(model, x, groups=net_groups(), **kwargs)
    assert same(model, snap)


@pytest.mark.parametrize("returns, match", [
    (lambda g: None, "returned None"),
    (lambda g: "high", "returned 'high'"),
    (lambda g: torch.ones(g.size, device="meta"), "meta tensor"),
    (lambda g: [object()] * g.size, "not a vector of numbers"),
], ids=["none", "str", "meta", "objects"])
def test_importance_callables_returning_junk_are_named(returns, match):
    model, x = make_net()

    def my_scores(group):
        return returns(group)

    snap = snapshot(model)
    with pytest.raises(ValueError, match=f"importance callable .*my_scores {match}|my_scores.*{match}"):
        prune(model, x, groups=net_groups(), importance=my_scores)
    assert same(model, snap)


# ------------------------------------------------------------------------------------ the CLI


def test_bench_checks_device_json_and_min_time_first(tmp_path, monkeypatch, capsys):
    from tritonprune.app import benchmark

    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("the benchmark ran before the checks"))
    with pytest.raises(SystemExit, match="--device 'tpu'"):
        cli.main(["bench", "--device", "tpu", "--quiet"])
    with pytest.raises(SystemExit, match="--device 'nonsense!'"):
        cli.main(["bench", "--device", "nonsense!", "--quiet"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["bench", "--json", str(tmp_path / "missing" / "out.json"), "--quiet"])
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "--min-time", bad])
        assert e.value.code == 2
        assert "finite number of seconds" in capsys.readouterr().err


def test_inspect_shows_the_clear_message_without_torch_internals(tmp_path, capsys):
    (tmp_path / "mismatched.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class Mismatched(nn.Module):  # its forward fails on the given inputs (4 channels expected, 3 given)
            def __init__(self):
                super().__init__()
                self.c = nn.Conv2d(4, 8, 3)

            def forward(self, x):
                return self.c(x)

        def make():
            return Mismatched()
    """))
    with pytest.raises(SystemExit, match="tritonprune inspect: could not trace Mismatched"):
        cli.main(["inspect", f"{tmp_path / 'mismatched.py'}:make", "--input-shape", "1,3,8,8"])
    out = capsys.readouterr()
    assert "def forward" not in out.out + out.err and len((out.out + out.err).splitlines()) < 5


def test_min_time_zero_is_still_accepted():
    assert cli._seconds("0") == 0 and math.isclose(cli._seconds("0.25"), 0.25)
