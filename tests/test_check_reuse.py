"""What prune's run check learns on its copy is reused by the real slicing only where it is proven the same.

The run check slices a copy and runs it; the sure attribute updates are verified by that forward
(sliced again with the full verification if it fails), the real `apply` takes the attribute values the
check settled on when the tensors, cuts, candidates and inputs are identical, and the MACs of the check's
forward are the pruned model's `macs_after`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import tritonprune as tpr
from tritonprune.pruning import module_attrs
from tritonprune.pruning.counting import count_macs
from tritonprune.pruning.module_attrs import Choices, Settled
from tritonprune.pruning.slicing import apply_cuts, build_cuts, model_tensors


class Coincidence(nn.Module):
    """`tokens` equals fc's width by chance: slicing is sure it follows the cut, only a forward shows not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.tokens = 8

    def forward(self, x):
        x = x.reshape(x.shape[0], self.tokens, 4)
        return self.head(torch.relu(self.fc(x)).mean(1))


class Stored(nn.Module):
    """`width` really is fc's width (a reshape with it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.width = 8

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return self.head(y.reshape(x.shape[0], -1, self.width).mean(1))


def _runs_on(monkeypatch) -> list[int]:
    """ids of the models module_attrs verifies attributes on."""
    seen: list[int] = []
    real = module_attrs.runs

    def runs(model, specs):
        seen.append(id(model))
        return real(model, specs)

    monkeypatch.setattr(module_attrs, "runs", runs)
    return seen


def test_a_wrong_sure_update_is_caught_and_the_model_itself_is_not_verified_again(monkeypatch):
    torch.manual_seed(0)
    model, x = Coincidence().eval(), torch.randn(2, 32)
    pruned = copy.deepcopy(model)
    seen = _runs_on(monkeypatch)
    plan = tpr.prune(pruned, x, ratio=0.5)
    assert pruned.fc.out_features == 4 and pruned.tokens == 8  # the check's forward refused tokens=4
    assert seen and id(pruned) not in seen  # verified on copies; the real apply reused their answer
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), plan.zero_(copy.deepcopy(model))(x), rtol=1e-5, atol=1e-6)
    assert plan.info["macs_after"] == count_macs(pruned, x).total


def test_a_right_sure_update_is_kept_without_a_verification_forward(monkeypatch):
    torch.manual_seed(0)
    model, x = Stored().eval(), torch.randn(2, 5, 4)
    pruned = copy.deepcopy(model)
    seen = _runs_on(monkeypatch)
    plan = tpr.prune(pruned, x, ratio=0.5)
    assert pruned.fc.out_features == pruned.width == 4
    assert seen == []  # the run check's own forward verified it; apply reused it
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), plan.zero_(copy.deepcopy(model))(x), rtol=1e-5, atol=1e-6)
    # plan.apply on its own (no run check before it) verifies by itself and gets the same
    fresh = copy.deepcopy(model)
    plan.apply(fresh, check_run=False)
    assert fresh.width == 4 and len(seen) == 1


def test_settled_values_of_another_slicing_are_not_reused():
    torch.manual_seed(0)
    model, x = Coincidence().eval(), torch.randn(2, 32)
    groups = tpr.find_groups(model, x)  # remembers the input shapes the verification runs
    g = next(g for g in groups if g.origin == "fc")
    cuts = build_cuts([(g, [0, 1, 2, 3])], model_tensors(model))
    choices = Choices(reuse=Settled("another slicing", [("", "tokens", 999)], []))
    apply_cuts(model, cuts, choices=choices)
    assert model.tokens == 8 and choices.settled is not choices.reuse  # verified here instead


def test_macs_after_is_the_count_of_the_pruned_model_with_attention():
    from test_module_attrs import TinyViT

    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 5, 6)
    plan = tpr.prune(model, x, ratio=0.5, layer_ratios={"attn.qkv": 0.5, "embed": 0.25})
    assert plan.num_removed and "macs_after_is_estimate" not in plan.info
    assert plan.info["macs_after"] == count_macs(model, x).total < plan.info["macs_before"]
    plan3 = tpr.prune(TinyViT().eval(), x, ratio=0.5, steps=3)
    assert plan3.info["macs_after"] < plan3.info["macs_before"]


def test_the_reference_clone_serves_one_check_of_the_unchanged_model_only(monkeypatch):
    from tritonprune.pruning import fake_run, runcheck

    torch.manual_seed(0)
    model, x = Stored().eval(), torch.randn(2, 5, 4)
    groups = tpr.find_groups(model, x)
    removals = [(g, [0, 1]) for g in groups if g.origin == "fc"]
    made = []
    real = fake_run.prepared_copy
    monkeypatch.setattr(runcheck, "prepared_copy", lambda m: made.append(m) or real(m))
    ref = runcheck.reference_output(model, x)
    assert len(made) == 1 and ref.spare is not None
    assert runcheck.run_check(model, x, removals, reference=ref) is None
    assert len(made) == 1 and ref.spare is None  # the check sliced the reference's clone
    assert runcheck.run_check(model, x, removals, reference=ref) is None
    assert len(made) == 2  # a fresh clone: the spare is handed out once
    ref = runcheck.reference_output(model, x)
    tpr.prune(model, x, ratio=0.5)  # the model changes shape: the clone no longer stands for it
    made.clear()
    assert runcheck.run_check(model, x, reference=ref) is None
    assert made == [model] and ref.spare is None  # the check ran on a clone of the pruned model
    train = Stored().train()
    assert runcheck.reference_output(train, x).spare is None  # its train pass moved the clone's statistics


def test_rounds_check_the_previous_rounds_clone_and_prune_as_zero_does(monkeypatch):
    from tritonprune.pruning import fake_run, runcheck

    made = []
    real = fake_run.prepared_copy
    monkeypatch.setattr(runcheck, "prepared_copy", lambda m: made.append(m) or real(m))
    torch.manual_seed(0)
    model, x = Stored().eval(), torch.randn(2, 5, 4)
    pruned = copy.deepcopy(model)
    plan = tpr.prune(pruned, x, ratio=0.75, steps=3)
    assert pruned.fc.out_features == pruned.width == 2
    assert len(made) == 1  # the reference's clone, sliced round after round
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), plan.zero_(copy.deepcopy(model))(x), rtol=1e-5, atol=1e-6)
    made.clear()
    tpr.prune(copy.deepcopy(model).train(), x, ratio=0.75, steps=3)
    assert len(made) == 4  # training mode: every check on a fresh clone (train passes move statistics)
