"""Issue 13/14 (pruning half): prune, apply and zero_ are all or nothing; corrupt plans are refused with
the model unchanged; a plan that would break the model is caught on fake tensors (prune drops the
groups responsible, apply refuses naming the module); dry runs touch nothing; bad arguments are refused."""

from __future__ import annotations

import copy
import json
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_slicing import make_net, net_groups, run  # noqa: I001

import tritonprune as tpr
from tritonprune.pruning.counting import count_macs
from tritonprune.pruning.plan import PrunePlan
from tritonprune.pruning.plan_schema import PlanError
from tritonprune.pruning.pruner import prune
from tritonprune.pruning.runcheck import input_spec, inputs_from_spec, run_check
from tritonprune.pruning.transaction import Transaction


def snapshot(model):
    """Everything a half-done prune could leave behind: tensors (values and shapes), attributes, classes."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        repr(model),
        [type(m) for m in model.modules()],
        [id(p) for p in model.parameters()],
    )


def same(model, snap):
    sd, text, classes, ids = snap
    now = model.state_dict()
    return (
        now.keys() == sd.keys()
        and all(now[k].shape == sd[k].shape and torch.equal(now[k], sd[k]) for k in sd)
        and repr(model) == text
        and [type(m) for m in model.modules()] == classes
        and [id(p) for p in model.parameters()] == ids
    )


def trained_adam(model, x):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        run_train(model, x).square().mean().backward()
        opt.step()
    return opt


def run_train(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


def opt_snapshot(opt):
    return (
        [[id(p) for p in g["params"]] for g in opt.param_groups],
        {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()},
    )


def opt_same(opt, snap):
    ids, state = snap
    if [[id(p) for p in g["params"]] for g in opt.param_groups] != ids:
        return False
    now = {id(p): s for p, s in opt.state.items()}
    return now.keys() == state.keys() and all(
        all(torch.equal(now[i][k], v) if torch.is_tensor(v) else now[i][k] == v for k, v in state[i].items())
        for i in state
    )


# ------------------------------------------------------------------------------- transactions


def failing_in_round(n, bad):
    """An importance that is fine for the first n-1 rounds' calls of group 0, then returns `bad(group)`."""
    calls = {"round": 0}

    def importance(group):
        if group.index == 0:
            calls["round"] += 1
        if calls["round"] >= n:
            return bad(group)
        return torch.arange(group.size, dtype=torch.float32)

    return importance


@pytest.mark.parametrize(
    "bad",
    [lambda g: torch.full((g.size,), float("nan")), lambda g: torch.ones(g.size + 1)],
    ids=["nan", "wrong_shape"],
)
def test_failing_later_round_restores_model_and_optimizer(bad):
    model, x = make_net()
    opt = trained_adam(model, x)
    snap, osnap = snapshot(model), opt_snapshot(opt)
    with pytest.raises(ValueError, match="importance"):
        prune(model, x, ratio=0.6, steps=3, groups=net_groups(), optimizer=opt, importance=failing_in_round(2, bad))
    assert same(model, snap) and opt_same(opt, osnap)
    prune(model, x, ratio=0.5, groups=net_groups(), optimizer=opt)  # and it still prunes and trains after
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_unreachable_target_is_refused_before_round_one_or_rolled_back():
    model, x = make_net()
    opt = trained_adam(model, x)
    snap, osnap = snapshot(model), opt_snapshot(opt)
    with pytest.raises(ValueError, match="out of reach"):
        prune(model, x, target_params=10, steps=3, groups=net_groups(), optimizer=opt)
    assert same(model, snap) and opt_same(opt, osnap)
    # with max_ratio < 1 reachability is known only in the last round: that round fails, all is undone
    with pytest.raises(ValueError, match="out of reach"):
        prune(model, x, target_params=10, steps=2, max_ratio=0.5, groups=net_groups(), optimizer=opt)
    assert same(model, snap) and opt_same(opt, osnap)


def test_regularized_optimizer_groups_are_restored():
    model, x = make_net()
    model.train()
    opt = tpr.RegularizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, groups=net_groups(),
        regularizer=tpr.GroupNorm(reg=1e-3), backend="torch",
    )
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    groups_before = list(opt.groups)
    snap, osnap = snapshot(model), opt_snapshot(opt)
    with pytest.raises(ValueError):
        prune(model, x, ratio=0.5, steps=2, optimizer=opt, importance=failing_in_round(2, lambda g: torch.ones(1)))
    assert same(model, snap) and opt_same(opt, osnap)
    assert opt.groups == groups_before
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()  # the restored groups still fit the model


def test_attention_class_and_head_counts_are_restored():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = tpr.find_groups(model, x)
    attn = model[0].layers[0].self_attn
    heads, cls = attn.num_heads, type(attn)
    snap = snapshot(model)
    with pytest.raises(ValueError):
        prune(model, x, ratio=0.5, steps=2, groups=groups, importance=failing_in_round(2, lambda g: torch.ones(1)))
    assert same(model, snap) and type(attn) is cls and attn.num_heads == heads
    torch.testing.assert_close(run(model, x), run(copy.deepcopy(model), x))


class Config:
    """Stands for a Hugging Face config: slicing writes head counts and sizes into it."""

    def __init__(self):
        self.num_attention_heads, self.text_config = 4, None

    def to_dict(self):
        return dict(vars(self))


def test_transaction_restores_values_references_and_configs():
    model, x = make_net()
    model.config = Config()
    model.config.text_config = Config()
    model.fc.config = model.config
    snap = snapshot(model)
    with pytest.raises(RuntimeError), Transaction(model, values=["conv1.weight"]):
        with torch.no_grad():
            model.conv1.weight.zero_()
        model.conv1.weight = nn.Parameter(torch.ones(1))
        model.fc.out_features = 99
        model.config.num_attention_heads = 2
        model.config.text_config.num_attention_heads = 1
        model.head.__class__ = nn.Identity
        raise RuntimeError("boom")
    assert same(model, snap) and model.fc.out_features == 7
    assert model.config.num_attention_heads == 4 and model.config.text_config.num_attention_heads == 4


def test_zero_validates_every_slot_before_zeroing_any():
    model, x = make_net()
    plan = prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True)
    from dataclasses import replace

    last = plan.groups[-1]
    bad = replace(last.slots[-1], start=5)  # head.weight has 7 columns: 5 + 7 > 7
    plan.groups[-1] = replace(last, slots=last.slots[:-1] + (bad,))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"plan group 5 \('fc'\), slot 2 \(head.weight\): covers indices 5..11"):
        plan.zero_(model)
    assert same(model, snap)


# ----------------------------------------------------------------------------- plan validation


def valid_plan():
    model, x = make_net()
    return prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True).to_dict()


INT_SLOT_KEYS = ("dim", "offset", "length", "start", "repeat")


def corrupt(d, rng):
    """One corruption that makes the plan wrong (schema, consistency or fit), chosen at random."""
    d = copy.deepcopy(d)
    gi = rng.randrange(len(d["groups"]))
    g = d["groups"][gi]
    si = rng.randrange(len(g["slots"]))
    s = g["slots"][si]
    kind = rng.choice(
        ["del_slot_key", "del_group_key", "slot_type", "group_type", "negative", "length", "repeat", "rename",
         "rename_module_too", "dup", "out_of_range", "all", "size", "shape", "drop_shape", "removed_type", "unknown"]
    )
    if kind == "del_slot_key":
        del s[rng.choice(["name", "module", "kind", "role", "dim", "offset", "length"])]
    elif kind == "del_group_key":
        del g[rng.choice(["size", "removed", "slots"])]
    elif kind == "slot_type":
        k = rng.choice(INT_SLOT_KEYS)
        s[k] = rng.choice([s[k] + 0.5, str(s[k]), None, [s[k]], float(s[k]), bool(s[k] % 2)])
        if isinstance(s[k], bool) and k in ("repeat", "length") and s[k]:
            s[k] = False  # True == 1 would be a valid value for these if bools were accepted
        if type(s[k]) is float and s[k].is_integer():
            pass  # 3.0 where an int belongs is refused too
    elif kind == "group_type":
        k = rng.choice(["size", "blocks", "unit"])
        g[k] = rng.choice([float(g.get(k, 1)) + 0.5, str(g.get(k, 1)), None, float(g.get(k, 1))])
    elif kind == "negative":
        s[rng.choice(["offset", "start", "dim"])] = -rng.randrange(1, 5)
    elif kind == "length":
        s["length"] += rng.choice([1, 2, g["size"]])
    elif kind == "repeat":
        s["repeat"] += rng.choice([1, 3])
        if s["blocks"] > 1:
            s["repeat"] = 2
    elif kind in ("rename", "rename_module_too"):
        others = [n for n in d["shapes"] if n != s["name"]]
        s["name"] = rng.choice(others)
        if kind == "rename_module_too":
            s["module"] = s["name"].rpartition(".")[0]
            # renamed onto a tensor of another shape class: must not fit where it is
            if d["shapes"][s["name"]] == d["shapes"].get(g["slots"][si - 1]["name"] if si else "", None):
                s["start"] = 10_000
    elif kind == "dup":
        g["removed"] = g["removed"] + g["removed"][:1] if g["removed"] else [0, 0]
    elif kind == "out_of_range":
        g["removed"] = g["removed"] + [rng.choice([g["size"], g["size"] + 7, -1])]
    elif kind == "all":
        g["removed"] = list(range(g["size"]))
    elif kind == "size":
        g["size"] = rng.choice([g["size"] + 1, g["size"] - 1, 0, -g["size"]])
    elif kind == "shape":
        n = rng.choice(sorted(d["shapes"]))
        d["shapes"][n] = [x + 1 for x in d["shapes"][n]]
    elif kind == "drop_shape":
        del d["shapes"][s["name"]]
    elif kind == "removed_type":
        g["removed"] = (g["removed"] or [0])[:-1] + [rng.choice([0.0, "1", True, None])]
    elif kind == "unknown":
        (s if rng.random() < 0.5 else g)["lenght"] = 3
    return kind, d


def test_random_corrupt_plans_are_all_refused_with_the_model_unchanged(tmp_path):
    rng = random.Random(1234)
    d = valid_plan()
    victim, x = make_net()
    snap = snapshot(victim)
    PrunePlan.from_dict(copy.deepcopy(d))  # the uncorrupted plan is valid
    kinds = set()
    for i in range(300):
        kind, bad = corrupt(d, rng)
        kinds.add(kind)
        with pytest.raises(ValueError) as err:
            plan = PrunePlan.from_dict(bad)
            (plan.zero_ if i % 2 else plan.apply)(victim)
        assert not isinstance(err.value, KeyError), (kind, err.value)
        assert same(victim, snap), (kind, bad)
    assert len(kinds) == 17


def test_plan_errors_name_group_and_slot(tmp_path):
    d = valid_plan()
    bad = copy.deepcopy(d)
    bad["groups"][3]["slots"][2]["start"] = -1
    with pytest.raises(PlanError, match=r"plan group 3 \('conv2'\), slot 2 \(bn2.bias\): start must be an int >= 0"):
        PrunePlan.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["groups"][4]["slots"][0]["length"] = 5.0
    with pytest.raises(PlanError, match=r"slot 0 \(conv3.weight\): length must be int"):
        PrunePlan.from_dict(bad)
    bad = copy.deepcopy(d)
    del bad["groups"][1]["slots"][0]["role"]
    with pytest.raises(PlanError, match=r"plan group 1 \('a'\), slot 0 \(a.weight\): missing key"):
        PrunePlan.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["groups"][5]["removed"] = [1, 1]
    with pytest.raises(PlanError, match=r"plan group 5 \('fc'\): removed channel\(s\) \[1\] listed twice"):
        PrunePlan.from_dict(bad)
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not a JSON plan"):
        PrunePlan.load(path)


# -------------------------------------------------------------------------- the pruned model runs


class StoredWidth(nn.Module):
    """forward reshapes with a width kept where no attribute rule looks (a dict), as some model code
    keeps its config: module_attrs cannot update it, so only the run check can keep the model running."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.sizes = {"width": 6}
        self.head = nn.Linear(6 * 4, 3)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.adaptive_avg_pool2d(h, 2)
        return self.head(h.reshape(h.shape[0], self.sizes["width"] * 4))


def test_prune_drops_the_groups_that_break_the_model_and_prunes_the_rest():
    torch.manual_seed(0)
    model, x = StoredWidth().eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"group 1 \('conv2'\) breaks the forward of StoredWidth"):
        plan = prune(model, x, ratio=0.5)
    assert plan.removed[1] == [] and len(plan.removed[0]) == 4
    assert plan.info["dropped"][0]["group"] == 1 and "invalid for input" in plan.info["dropped"][0]["error"]
    assert model.conv1.out_channels == 4 and model.conv2.out_channels == 6
    assert run(model, x).shape == (2, 3)


def test_prune_drops_a_group_whose_slots_miss_a_consumer():
    model, x = make_net()
    groups = net_groups()
    from dataclasses import replace

    groups[4] = replace(groups[4], slots=groups[4].slots[:-1])  # conv3's channels: fc's columns left out
    with pytest.warns(UserWarning, match=r"group 4 \('conv3'\) breaks module 'fc'"):
        plan = prune(model, x, ratio=0.5, groups=groups)
    assert plan.removed[4] == [] and all(plan.removed[i] for i in (0, 1, 2, 3, 5))
    assert run(model, x).shape == (2, 3)


def test_apply_of_a_loaded_plan_that_breaks_refuses_naming_the_module(tmp_path):
    model, x = make_net()
    d = prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True).to_dict()
    d["groups"][4]["slots"] = d["groups"][4]["slots"][:-1]  # schema-valid, but fc would not fit
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    plan = PrunePlan.load(path)
    fresh, _ = make_net()
    opt = trained_adam(fresh, x)
    snap, osnap = snapshot(fresh), opt_snapshot(opt)
    with pytest.raises(ValueError, match=r"(?s)group 4 \('conv3'\) breaks module 'fc'.*ignored_layers: \['conv3'\]"):
        plan.apply(fresh, optimizer=opt)  # example-input shapes recorded by prune
    assert same(fresh, snap) and opt_same(opt, osnap)
    plan.apply(fresh, check_run=False)  # the caller can opt out, and then gets what they asked for
    with pytest.raises(RuntimeError):
        run(fresh, x)


def test_run_check_names_the_module_and_leaves_the_model_alone():
    model, x = make_net()
    snap = snapshot(model)
    groups = net_groups()
    per = [g.size // g.blocks for g in groups]
    removals = [(g, [(j + 1) * n - 1 for j in range(g.blocks)]) for g, n in zip(groups, per)]  # last of each block
    assert run_check(model, x, removals) is None
    assert run_check(model, x, prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True)) is None
    from dataclasses import replace

    groups[5] = replace(groups[5], slots=groups[5].slots[:-1])
    failure = run_check(model, x, [(g, r) for g, (_, r) in zip(groups, removals)])
    assert failure.module == "head" and "RuntimeError" in failure.error
    assert same(model, snap)


def test_input_spec_round_trip():
    inputs = (torch.randn(2, 3), {"ids": torch.zeros(2, 4, dtype=torch.long), "flag": True}, [None, 3])
    spec = json.loads(json.dumps(input_spec(inputs)))
    back = inputs_from_spec(spec)
    assert back[0].shape == (2, 3) and back[1]["ids"].dtype == torch.long and back[1]["flag"] is True
    assert back[2] == [None, 3]
    assert input_spec(object()) is None


# ----------------------------------------------------------------------------- dry runs touch nothing


class Counting(nn.Module):
    """A forward that writes a buffer, and a user forward hook that counts calls."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1
        return self.conv2(F.relu(self.bn(self.conv1(x)))).mean((2, 3))


@pytest.mark.parametrize("steps", [1, 2])
def test_dry_run_runs_no_forward_and_no_hook(steps):
    torch.manual_seed(0)
    model, x = Counting().train(), torch.randn(2, 3, 8, 8)
    groups = tpr.find_groups(model, x)  # one real forward (and its hooks; buffers are restored)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    snap = snapshot(model)
    plan = prune(model, x, ratio=0.5, steps=steps, groups=groups, dry_run=True)
    assert plan.num_removed > 0 and plan.info["macs_before"] > plan.info["macs_after"] > 0
    assert same(model, snap) and calls == [] and model.training and model.bn.training
    count_macs(model, x)
    assert same(model, snap) and calls == []
    prune(model, x, ratio=0.5, groups=groups)  # a real prune runs no forward either
    assert calls == [] and float(model.seen) == 0


# --------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_params=float("nan")), "target_params must be finite"),
        (dict(target_params=float("inf")), "target_params must be finite"),
        (dict(target_params=True), "target_params must be a number"),
        (dict(target_params="1000"), "target_params must be a number"),
        (dict(target_params=-5), "target_params=-5: give a fraction"),
        (dict(target_params=0), "target_params=0: give a fraction"),
        (dict(target_params=1500.5), r"or a count, an integer >= 1"),
        (dict(target_macs=1.5), "target_macs=1.5: give a fraction"),
        (dict(target_macs=float("nan")), "target_macs must be finite"),
        (dict(target_macs=torch.tensor(5.0)), "target_macs must be a number"),
        (dict(ratio=float("inf")), "ratio"),
        (dict(ratio=True), "ratio"),
        (dict(ratio="0.5"), "ratio"),
        (dict(max_ratio=float("nan")), "max_ratio"),
        (dict(max_ratio=True), "max_ratio"),
        (dict(max_ratio=0), "max_ratio"),
        (dict(max_ratio=1.5), "max_ratio"),
        (dict(layer_ratios={"fc": float("nan")}), r"layer_ratios\['fc'\]"),
        (dict(layer_ratios={"head": 0.5}), "'head' produces no prunable channels"),
        (dict(layer_ratios={"bn1": 0.5}), "'bn1' produces no prunable channels"),
        (dict(layer_ratios={"ghost": 0.5}), "'ghost' is not a module"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(kwargs, match):
    model, x = make_net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prune(model, x, groups=net_groups(), **kwargs)
    assert same(model, snap)


def test_no_prunable_groups_warns_and_returns_a_no_op_plan():
    model, x = make_net()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="no prunable channel groups"):
        plan = prune(model, x, ratio=0.5, groups=[])
    assert plan.num_removed == 0 and same(model, snap)
    lin = nn.Linear(4, 2)  # every channel reaches the output
    with pytest.warns(UserWarning, match="no prunable channel groups"):
        assert prune(lin, torch.randn(3, 4), ratio=0.5).num_removed == 0


def test_torchvision_vit_prunes_into_a_model_that_runs():
    """Issue 14's largest class: forward reads a stored width (ViT's hidden_dim). Either a rule updates
    it, or the group is dropped with a warning; never a model that fails at forward."""
    import tv

    tv.torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = prune(model, x, ratio=0.5)
    dropped = plan.info.get("dropped", [])
    assert all(plan.removed[d["group"]] == [] for d in dropped)
    assert bool(dropped) == any("left these groups out" in str(w.message) for w in caught)
    assert plan.info["params_after"] < plan.info["params_before"]
    assert run(model, x).shape == (2, 5)


def test_meta_models_refuse_prune_but_take_a_saved_plan(tmp_path):
    model, x = make_net()
    plan = prune(copy.deepcopy(model), x, ratio=0.5, groups=net_groups(), dry_run=True)
    with torch.device("meta"):
        skeleton, _ = make_net()
    with pytest.raises(ValueError, match="meta device"):
        prune(skeleton, x, ratio=0.5, groups=net_groups())
    plan.save(tmp_path / "p.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked on fake CPU tensors, no "could not check" warning
        PrunePlan.load(tmp_path / "p.json").apply(skeleton)
    plan.apply(model)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert skeleton.fc.weight.device.type == "meta"


def test_model_that_fake_tensors_cannot_run_is_checked_by_a_real_forward_after_slicing(monkeypatch):
    from test_slicing import Net

    from tritonprune.pruning import fake_run

    monkeypatch.setattr(fake_run, "REAL_COPY_BYTES", 0)  # the fake-tensor check (large models), not a real copy

    class DataDependent(Net):
        def forward(self, x):
            if float(x.mean()) > 1e9:  # a data-dependent branch: fake tensors cannot decide it
                x = x * 2
            return super().forward(x)

    torch.manual_seed(0)
    model, x = DataDependent().eval(), torch.randn(2, 3, 8, 8)
    plan = prune(copy.deepcopy(model), x, ratio=0.5, groups=net_groups())  # runs: fine
    assert plan.num_removed > 0
    groups = net_groups()
    from dataclasses import replace

    groups[4] = replace(groups[4], slots=groups[4].slots[:-1])
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no longer runs its example inputs"):
        prune(model, x, ratio=0.5, groups=groups)
    assert same(model, snap)
    # a small CPU model is checked on a real copy, which runs the branch: the broken group is left out
    monkeypatch.setattr(fake_run, "REAL_COPY_BYTES", 2**30)
    with pytest.warns(UserWarning, match="left these groups out"):
        plan = prune(model, x, ratio=0.5, groups=groups)
    assert 4 in [d["group"] for d in plan.info["dropped"]]
    model(x)


class TrainOnlyBranch(nn.Module):
    """An auxiliary head that runs only in training (GoogLeNet, Inception-v3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        y = self.conv2(h).mean((2, 3))
        return (y, self.aux(h.mean((2, 3)))) if self.training else y


def test_a_model_in_training_mode_is_checked_in_training_mode_too():
    from test_slicing import group, in_slot, out_slots

    torch.manual_seed(0)
    model, x = TrainOnlyBranch().train(), torch.randn(2, 3, 8, 8)
    eval_only = [group(8, out_slots("conv1", 8), in_slot("conv2", 8))]  # misses aux's columns
    assert run_check(model.eval(), x, [(eval_only[0], [0, 1])]) is None  # eval mode alone cannot see it
    model.train()
    with pytest.warns(UserWarning, match=r"breaks module 'aux'.*\(in train mode\)"):
        plan = prune(model, x, ratio=0.5, groups=eval_only)
    assert plan.num_removed == 0 and model.training
    y, aux = model(x)
    (y.sum() + aux.sum()).backward()


class CachesInForward(nn.Module):
    """Caches a derived tensor in a dict attribute during eval forward (timm's LeViT attention biases)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.ones(4))
        self.cache = {}

    def forward(self, x):
        if not self.training:
            if "s" not in self.cache:
                self.cache["s"] = self.scale * 2
            s = self.cache["s"]
        else:
            s = self.scale * 2
        return (self.conv2(F.relu(self.conv1(x))) * s[:, None, None]).mean((2, 3))


def test_fake_forwards_never_write_into_the_real_model():
    torch.manual_seed(0)
    model, x = CachesInForward().eval(), torch.randn(2, 3, 6, 6)
    prune(model, x, ratio=0.5)
    # find_groups' one real forward cached a real tensor, as any forward would; the checks ran on copies
    assert list(model.cache) == ["s"] and type(model.cache["s"]) is torch.Tensor
    assert torch.equal(model.cache["s"], torch.full((4,), 2.0))
    out = model(x)
    assert type(out) is torch.Tensor and torch.isfinite(out).all()


def test_transaction_takes_back_a_forward_pre_hook_added_in_place():
    # slicing installs the kept-heads hook into the module's own hook dict (graph/entries, Bloom's ALiBi):
    # a failure after that must leave the module without it
    from tritonprune.pruning.kept_heads import KeptHeads
    from tritonprune.pruning.transaction import Transaction

    m = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="later step"):
        with Transaction(m):
            m.register_forward_pre_hook(KeptHeads("input", 0, 2, [1]), with_kwargs=True)
            raise RuntimeError("a later step fails")
    assert not m._forward_pre_hooks and not m._forward_pre_hooks_with_kwargs
