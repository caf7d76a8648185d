"""tpr.prune and PrunePlan: importance, selection modes, targets, save/load, refusal of bad plans,
optimizer state across pruning, MAC counting, and the model zoo with find_groups."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_slicing import group, in_slot, make_extras, make_net, net_groups, out_slots, run  # noqa: I001

from tritonprune.graph.group import LINEAR
from tritonprune.pruning.counting import count_macs, count_params
from tritonprune.pruning.importance import compute_importance
from tritonprune.pruning.plan import PrunePlan
from tritonprune.pruning.pruner import prune
from tritonprune.pruning.selection import iterative_ratios, select

try:
    import torch_pruning as tp
except ImportError:  # the oracle is a dev dependency
    tp = None


def soft_vs_hard(plan, make=make_net):
    model, x = make()
    soft, hard = copy.deepcopy(model), copy.deepcopy(model)
    plan.zero_(soft)
    plan.apply(hard)
    return model, soft, hard, x


def kept(plan):
    return {g.origin: g.size - len(r) for g, r in zip(plan.groups, plan.removed)}


# ----------------------------------------------------------------------------------- importance


@pytest.mark.skipif(tp is None, reason="torch-pruning not installed")
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("normalizer", ["mean", "max", None])
def test_magnitude_matches_torch_pruning(p, normalizer):
    model, x = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    scorer = tp.importance.GroupMagnitudeImportance(p=p, normalizer=normalizer)
    groups = {g.origin: g for g in net_groups()}
    # conv3 -> bn -> flatten -> Linear (repeat 16), a cat part, a Linear group; TP fails on the others
    for mod, n in (("conv3", 5), ("a", 4), ("b", 6), ("fc", 7)):
        fn = tp.prune_linear_out_channels if mod == "fc" else tp.prune_conv_out_channels
        ref = scorer(dg.get_pruning_group(getattr(model, mod), fn, idxs=list(range(n))))
        mine = compute_importance(model, [groups[mod]], f"l{p}", normalizer=normalizer)[0]
        torch.testing.assert_close(mine, ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(tp is None, reason="torch-pruning not installed")
def test_taylor_and_bn_scale_match_torch_pruning():
    model, x = make_net()
    model(x).square().sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    fc = dg.get_pruning_group(model.fc, tp.prune_linear_out_channels, idxs=list(range(7)))
    ref = tp.importance.GroupTaylorImportance()(fc)
    g_fc = next(g for g in net_groups() if g.origin == "fc")
    torch.testing.assert_close(
        compute_importance(model, [g_fc], "taylor")[0], ref.float(), rtol=1e-5, atol=1e-6
    )
    c3 = dg.get_pruning_group(model.conv3, tp.prune_conv_out_channels, idxs=list(range(5)))
    ref = tp.importance.BNScaleImportance()(c3)
    g3 = next(g for g in net_groups() if g.origin == "conv3")
    torch.testing.assert_close(
        compute_importance(model, [g3], "bn_scale")[0], ref.float(), rtol=1e-5, atol=1e-6
    )


def test_importance_kinds_and_errors():
    model, x = make_net()
    gs = net_groups()
    with pytest.raises(ValueError, match="backward"):
        compute_importance(model, gs, "taylor")
    assert compute_importance(model, [gs[5]], "bn_scale") == [None]  # fc group has no BatchNorm
    r1 = compute_importance(model, gs, "random", generator=torch.Generator().manual_seed(1))
    r2 = compute_importance(model, gs, "random", generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    custom = compute_importance(model, gs, lambda g: torch.arange(g.size, dtype=torch.float32))
    assert torch.equal(custom[0], torch.arange(8.0))
    with pytest.raises(ValueError, match="shape"):
        compute_importance(model, gs, lambda g: torch.ones(3))
    with pytest.raises(ValueError, match="not one of"):
        compute_importance(model, gs, "l3")
    imp = compute_importance(model, gs, "l2", normalizer="max")
    assert all(float(i.max()) == pytest.approx(1.0) for i in imp)


def test_custom_importance_decides_the_removed_channels():
    model, x = make_net()
    plan = prune(
        model,
        x,
        ratio=0.5,
        groups=net_groups(),
        importance=lambda g: -torch.arange(g.size, dtype=torch.float32),
        dry_run=True,
    )
    fc = plan.removed[[g.origin for g in plan.groups].index("fc")]
    assert fc == [3, 4, 5, 6]  # highest index = lowest score goes first; floor(7 * 0.5) = 3 kept
    conv1 = plan.removed[0]  # blocked: 2 per block, 1 removed from each, the later one
    assert conv1 == [1, 3, 5, 7]


# ------------------------------------------------------------------------------------- selection

MODES = {
    "local_l2": dict(ratio=0.5),
    "local_l1_none": dict(ratio=0.4, importance="l1", normalizer=None),
    "global": dict(ratio=0.5, global_pruning=True),
    "global_max_ratio": dict(ratio=0.6, global_pruning=True, max_ratio=0.7),
    "layer_ratios": dict(ratio=0.2, layer_ratios={"fc": 0.7, "conv3": 0.0}),
    "round_to": dict(ratio=0.3, round_to=4),
    "bn_scale": dict(ratio=0.5, importance="bn_scale"),
    "random": dict(ratio=0.5, importance="random", seed=3),
    "steps": dict(ratio=0.6, steps=3),
    "target_params": dict(target_params=1500),
    "target_macs": dict(target_macs=60_000, global_pruning=True),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_apply_equals_zero_for_every_selection_mode(mode):
    model, x = make_net()
    plan = prune(model, x, groups=net_groups(), dry_run=True, **MODES[mode])
    assert plan.num_removed > 0
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), make_net()[0].state_dict().values())
    )
    _, soft, hard, x = soft_vs_hard(plan)
    torch.testing.assert_close(run(hard, x), run(soft, x), atol=1e-5, rtol=1e-4)
    assert count_params(hard) < count_params(model)
    assert count_params(hard) == plan.info["params_after"]


def test_taylor_mode_apply_equals_zero():
    model, x = make_net()
    model(x).square().sum().backward()
    plan = prune(model, x, ratio=0.5, groups=net_groups(), importance="taylor", dry_run=True)
    _, soft, hard, x = soft_vs_hard(plan)
    torch.testing.assert_close(run(hard, x), run(soft, x), atol=1e-5, rtol=1e-4)


def test_local_ratio_counts_and_blocks():
    model, x = make_net()
    plan = prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True)
    k = kept(plan)
    # floor(C * 0.5) kept per block: conv1 2/block x4, conv2 3/block x4 -> 1 per block
    assert k == {"conv1": 4, "a": 2, "b": 3, "conv2": 4, "conv3": 2, "fc": 3}
    conv2 = plan.removed[3]
    assert [sum(1 for c in conv2 if c // 3 == j) for j in range(4)] == [2, 2, 2, 2]


def test_at_least_one_channel_per_block_is_kept():
    model, x = make_net()
    plan = prune(model, x, ratio=0.99, groups=net_groups(), dry_run=True)
    assert kept(plan) == {"conv1": 4, "a": 1, "b": 1, "conv2": 4, "conv3": 1, "fc": 1}


def test_round_to_keeps_multiples():
    model, x = make_net()
    plan = prune(model, x, ratio=0.3, groups=net_groups(), round_to=4, dry_run=True)
    for g, r in zip(plan.groups, plan.removed):
        k = g.size - len(r)
        assert k % 4 == 0 or not r, (g.origin, k)
    assert kept(plan)["conv2"] == 8 and kept(plan)["fc"] == 4 and kept(plan)["b"] == 4
    plan3 = prune(model, x, ratio=0.9, groups=net_groups(), round_to=3, dry_run=True)
    for g, r in zip(plan3.groups, plan3.removed):
        assert (g.size - len(r)) % 3 == 0 or not r
        assert g.size - len(r) >= 1


def test_global_pruning_ranks_across_groups_and_max_ratio_caps():
    model, x = make_net()
    with torch.no_grad():  # make the fc group far weaker than the others
        model.fc.weight.mul_(1e-3)
    gs = net_groups()
    total = sum(g.size for g in gs)
    plan = prune(model, x, ratio=0.3, groups=gs, global_pruning=True, dry_run=True)
    assert plan.num_removed >= round(0.3 * total) - 4  # blocks remove 4 channels at a time
    local = prune(model, x, ratio=0.3, groups=gs, dry_run=True)
    assert kept(plan) != kept(local)
    capped = prune(model, x, ratio=0.5, groups=gs, global_pruning=True, max_ratio=0.4, dry_run=True)
    for g, r in zip(capped.groups, capped.removed):
        assert len(r) <= int(g.size * 0.4) + 0, (g.origin, len(r))


def test_layer_ratios_pick_the_producer_and_validate():
    model, x = make_net()
    plan = prune(
        model, x, ratio=0.0, layer_ratios={"fc": 0.5, "conv1": 0.5}, groups=net_groups(), dry_run=True
    )
    assert kept(plan) == {"conv1": 4, "a": 4, "b": 6, "conv2": 12, "conv3": 5, "fc": 3}
    with pytest.raises(ValueError, match="nope"):
        prune(model, x, layer_ratios={"nope": 0.5}, groups=net_groups(), dry_run=True)
    with pytest.raises(ValueError, match=r"layer_ratios\['fc'\]"):
        prune(model, x, layer_ratios={"fc": 1.0}, groups=net_groups(), dry_run=True)


def test_iterative_steps_reach_the_target_and_compose():
    assert iterative_ratios(0.5, 1) == [0.5]
    rs = iterative_ratios(0.6, 3)
    kept_frac = 1.0
    for r in rs:
        kept_frac *= 1 - r
    assert kept_frac == pytest.approx(0.4)
    model, x = make_net()
    fresh = copy.deepcopy(model)
    plan = prune(model, x, ratio=0.6, steps=3, groups=net_groups())  # applied to `model`, 3 rounds
    one_shot = prune(fresh, x, ratio=0.6, groups=net_groups(), dry_run=True)
    assert sum(kept(plan).values()) == pytest.approx(sum(kept(one_shot).values()), abs=4)
    plan.apply(fresh)  # the composed plan on the original model gives the same model
    torch.testing.assert_close(run(fresh, x), run(model, x))


def test_target_params_is_met_and_minimal():
    model, x = make_net()
    p0 = count_params(model)
    for target in (int(p0 * 0.6), int(p0 * 0.3)):
        plan = prune(copy.deepcopy(model), x, groups=net_groups(), target_params=target, dry_run=True)
        hard = copy.deepcopy(model)
        plan.apply(hard)
        assert count_params(hard) <= target
        assert count_params(hard) > target * 0.6  # not pruned far past the target
    with pytest.raises(ValueError, match="out of reach"):
        prune(model, x, groups=net_groups(), target_params=10, dry_run=True)
    with pytest.raises(ValueError, match="not both"):
        prune(model, x, ratio=0.3, groups=net_groups(), target_params=1000, dry_run=True)


def test_targets_as_fractions():
    # a newcomer's "half": 0.5 is a fraction of the model's size, the same plan as the count it stands for
    model, x = make_net()
    p0, m0 = count_params(model), count_macs(model, x).total
    half = prune(copy.deepcopy(model), x, groups=net_groups(), target_params=0.5, dry_run=True)
    assert half.removed == prune(copy.deepcopy(model), x, groups=net_groups(), target_params=p0 // 2,
                                 dry_run=True).removed
    hard = copy.deepcopy(model)
    half.apply(hard)
    assert p0 * 0.3 < count_params(hard) <= p0 * 0.5
    plan = prune(copy.deepcopy(model), x, groups=net_groups(), target_macs=0.4, dry_run=True)
    assert plan.info["macs_after"] <= 0.4 * m0 and plan.removed
    assert prune(copy.deepcopy(model), x, groups=net_groups(), target_params=float(p0 // 2),
                 dry_run=True).removed == half.removed  # an integral float (2e6) is a count


def test_target_macs_is_met():
    model, x = make_net()
    m0 = count_macs(model, x).total
    plan = prune(model, x, groups=net_groups(), target_macs=m0 // 2, dry_run=True)
    hard = copy.deepcopy(model)
    plan.apply(hard)
    assert count_macs(hard, x).total <= m0 // 2
    assert plan.info["macs_after"] == count_macs(hard, x).total  # conv/linear only: the estimate is exact


def test_ignored_layers():
    model, x = make_net()
    plan = prune(model, x, ratio=0.5, groups=net_groups(), ignored_layers=[model.conv3, "fc"], dry_run=True)
    k = kept(plan)
    assert "conv3" not in k and "fc" not in k and k["conv1"] == 4  # their groups are left out
    # an ignored consumer still loses input channels (its role in that group is IN)
    plan = prune(model, x, ratio=0.5, groups=net_groups(), ignored_layers=["head"], dry_run=True)
    assert kept(plan)["fc"] == 3


def test_bad_arguments():
    model, x = make_net()
    for r in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            prune(model, x, ratio=r, groups=net_groups())
    with pytest.raises(ValueError, match="ghost"):
        prune(model, x, ratio=0.3, groups=net_groups(), ignored_layers=["ghost"])
    with pytest.raises(ValueError):
        prune(model, x, ratio=0.3, groups=net_groups(), ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError):
        prune("model", x, ratio=0.3, groups=net_groups())
    with pytest.raises(ValueError, match="importance"):
        prune(model, x, ratio=0.3, groups=net_groups(), importance="l7")
    with pytest.raises(ValueError, match="round_to"):
        prune(model, x, ratio=0.3, groups=net_groups(), round_to=0)
    with pytest.raises(ValueError, match="steps"):
        prune(model, x, ratio=0.3, groups=net_groups(), steps=0)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), make_net()[0].state_dict().values())
    )


def test_units_are_removed_whole_and_survive_save_load_and_remap(tmp_path):
    from dataclasses import replace

    from tritonprune.pruning.slicing import build_cuts, model_tensors, remap_groups

    model, x = make_net()
    gs = net_groups()
    gs[4] = replace(gs[4], size=5, unit=1)  # conv3 group unchanged
    g_fc = replace(gs[5], unit=1)
    heads = group(12, out_slots("conv2", 12, bias=False))  # 4 "heads" of 3 channels
    heads = replace(heads, unit=3, exact=False)
    imp = torch.tensor([1.0, 1, 1, 9, 9, 9, 0.5, 0.5, 20, 8, 8, 8])
    assert select([heads], [imp], 0.5) == [[0, 1, 2, 6, 7, 8]]  # unit scores 1, 9, 7, 8
    assert select([heads], [imp], 0.5, global_pruning=True) == [[0, 1, 2, 6, 7, 8]]
    assert select([heads], [imp], 0.3, round_to=6) == [[0, 1, 2, 6, 7, 8]]  # 9 kept -> 6
    with pytest.raises(ValueError, match="whole runs of 3"):
        build_cuts([(heads, [0, 1])], model_tensors(model))
    new = remap_groups([heads, g_fc], build_cuts([(heads, [0, 1, 2]), (g_fc, [0])], model_tensors(model)))
    assert new[0].unit == 3 and not new[0].exact and new[0].size == 9
    plan = PrunePlan("x", [heads], [[0, 1, 2]], {"conv2.weight": [12, 2, 3, 3]})
    plan.save(tmp_path / "p.json")
    back = PrunePlan.load(tmp_path / "p.json").groups[0]
    assert back.unit == 3 and back.exact is False


def test_select_direct():
    g = group(6, out_slots("fc", 6, kind=LINEAR), in_slot("head", 6, kind=LINEAR))
    imp = torch.tensor([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])
    assert select([g], [imp], 0.5) == [[1, 3, 5]]
    assert select([g], [None], 0.5) == [[]]
    assert select([g], [imp], 0.5, max_ratio=0.34) == [[1, 3]]


# ------------------------------------------------------------------------------ plans as files


def test_save_load_round_trip_onto_a_fresh_model(tmp_path):
    model, x = make_net(seed=0)
    plan = prune(model, x, ratio=0.5, groups=net_groups())  # prunes `model`
    path = tmp_path / "plan.json"
    plan.save(path)
    json.loads(path.read_text())  # plain JSON
    loaded = PrunePlan.load(path)
    assert loaded.removed == plan.removed and loaded.shapes == plan.shapes
    fresh, _ = make_net(seed=0)  # same weights: identical outputs after the loaded plan
    loaded.apply(fresh)
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=0, rtol=0)
    other, _ = make_net(seed=5)  # other weights: the pruned state_dict loads into the re-pruned model
    PrunePlan.load(path).apply(other)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(other, x), run(model, x), atol=0, rtol=0)
    assert "PrunePlan for" in loaded.summary() and "params:" in loaded.summary()


def _untouched(model, ref_sd, ref_repr):
    sd = model.state_dict()
    return (
        repr(model) == ref_repr
        and sd.keys() == ref_sd.keys()
        and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    )


def test_bad_plans_are_refused_before_anything_changes(tmp_path):
    model, x = make_net()
    plan = prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True)
    d = plan.to_dict()

    victim, _ = make_net()
    ref_sd, ref_repr = copy.deepcopy(victim.state_dict()), repr(victim)

    other_model, _ = make_extras()
    with pytest.raises(ValueError, match="made for"):
        plan.apply(other_model)

    missing = copy.deepcopy(d)
    missing["groups"][-1]["slots"][-1]["name"] = "head.weight_typo"
    missing["shapes"]["head.weight_typo"] = missing["shapes"].pop("head.weight")
    with pytest.raises(ValueError, match="head.weight_typo"):
        PrunePlan.from_dict(missing).apply(victim)
    assert _untouched(victim, ref_sd, ref_repr)

    mismatch = copy.deepcopy(d)
    mismatch["shapes"]["fc.weight"] = [7, 81]
    with pytest.raises(ValueError, match="fc.weight"):
        PrunePlan.from_dict(mismatch).apply(victim)
    assert _untouched(victim, ref_sd, ref_repr)

    uneven = copy.deepcopy(d)  # a grouped layer losing different counts per block (last group is fine)
    uneven["groups"][0]["removed"] = [0]
    with pytest.raises(ValueError, match="same count"):
        PrunePlan.from_dict(uneven).apply(victim)
    with pytest.raises(ValueError, match="same count"):
        PrunePlan.from_dict(uneven).zero_(victim)
    assert _untouched(victim, ref_sd, ref_repr)

    with pytest.raises(ValueError, match="format"):
        PrunePlan.from_dict({"format": "something else"})

    plan.apply(victim)
    with pytest.raises(ValueError, match="expects shape"):  # a plan cannot be applied twice
        plan.apply(victim)


# ---------------------------------------------------------------------------- optimizer state


def test_prune_mid_training_with_adam_then_continue():
    model, x = make_net()
    model.train()
    target = torch.randn(2, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    step_before = {k: v for k, v in opt.state[model.fc.weight].items() if k == "step"}
    prune(model, x, ratio=0.5, groups=net_groups(), optimizer=opt)
    assert opt.state[model.fc.weight]["step"] == step_before["step"]  # scalar state kept
    assert opt.state[model.fc.weight]["exp_avg"].shape == model.fc.weight.shape
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------- counting


def test_count_macs_conv_linear_and_attention():
    model, x = make_net()
    c = count_macs(model, x)
    expected = 2 * 64 * (8 * 27 + 4 * 3 + 6 * 3 + 8 * 10 + 12 * 2 * 9 + 24 * 1 * 9 + 5 * 24) + 2 * (
        7 * 80 + 3 * 7
    )
    assert c.total == expected
    assert c.by_weight["fc.weight"] == 2 * 7 * 80
    model.train()
    c2 = count_macs(model, x)
    assert model.training and c2.total == c.total  # training flag restored, stats untouched

    class Attn(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q) @ q.transpose(-1, -2)

    q = torch.randn(2, 3, 4, 5)
    assert count_macs(Attn(), q).total == 6 * 4 * 4 * 10 + 2 * 3 * 4 * 4 * 5
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    s = torch.randn(2, 5, 16)
    assert count_macs(mha, (s, s, s)).total == 2 * 15 * 256 + 2 * 5 * 256 + 2 * 2 * 25 * 16


# ------------------------------------------------------------------------- zoo with find_groups

MIXING_NORMS = {"groupnorm", "layernorm"}  # zeroing a channel changes the statistics of the others


def _zoo():
    try:
        from zoo import ZOO, randomize_bn_
    except ImportError:
        return {}, None
    return ZOO, randomize_bn_


ZOO, RANDOMIZE = _zoo()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_prune(name):
    """Issue 2: for ratios 0.3 and 0.7, apply equals zero_ in eval mode, params drop, training and a fresh export work."""
    model, inputs = ZOO[name]()
    RANDOMIZE(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tritonprune.graph import find_groups

        groups = find_groups(model, inputs)
    assert groups
    mixing = not all(g.exact for g in groups) or any(s.kind in MIXING_NORMS for g in groups for s in g.slots)
    for ratio in (0.3, 0.7):
        plan = prune(model, inputs, ratio=ratio, groups=groups, dry_run=True)
        soft, hard = copy.deepcopy(model), copy.deepcopy(model)
        plan.zero_(soft)
        plan.apply(hard)
        y_soft, y_hard = run(soft, inputs), run(hard, inputs)
        if mixing:
            assert y_hard.shape == y_soft.shape
        else:
            torch.testing.assert_close(y_hard, y_soft, atol=1e-4, rtol=1e-4)
        assert count_params(hard) < count_params(model)
        assert count_params(hard) == plan.info["params_after"]
        hard.train()
        opt = torch.optim.SGD(hard.parameters(), lr=0.01, momentum=0.9)
        out = hard(*inputs)
        out.float().square().mean().backward()
        opt.step()
        hard.eval()
        if ratio == 0.7:  # one fresh export per model keeps the suite fast
            ep = torch.export.export(hard, inputs)
            torch.testing.assert_close(ep.module()(*inputs), run(hard, inputs), atol=1e-5, rtol=1e-5)


def test_regularized_optimizer_keeps_training_after_pruning():
    import tritonprune as tpr

    model, x = make_net()
    model.train()
    opt = tpr.RegularizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        groups=net_groups(),
        regularizer=tpr.GroupNorm(reg=1e-3),
        backend="torch",
    )
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    plan = prune(model, x, ratio=0.5, optimizer=opt)  # the optimizer's groups, no trace
    assert [g.size for g in opt.groups] == [g.size - len(r) for g, r in zip(plan.groups, plan.removed)]
    assert all(p in opt.state for p in model.parameters())
    before = model.conv1.weight.detach().clone()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert model.conv1.weight.shape == before.shape and not torch.equal(model.conv1.weight, before)
    assert opt.state[model.conv1.weight]["momentum_buffer"].shape == before.shape


def test_iterative_target_dry_run_leaves_the_model_alone():
    model, x = make_net()
    ref = copy.deepcopy(model.state_dict())
    target = int(count_params(model) * 0.5)
    plan = prune(model, x, groups=net_groups(), target_params=target, steps=2, dry_run=True)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    plan.apply(model)
    assert count_params(model) <= target


def test_norm_group_rounding_is_warned():
    """GroupNorm blocks keep equal counts: 4 channels per block at ratio 0.3 cannot keep 2.8, so the
    group removes more than asked; prune says so (it said nothing before)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"8 channels, 2 blocks kept equal\): asked 0.3, removes 0.5"):
        plan = prune(m, (x,), ratio=0.3, dry_run=True)
    assert plan.num_removed == 4
