"""A split sized by an attribute of the module running it (Ultralytics C2PSA: `self.cv1(x).split((self.c,
self.c), 1)`, `self.c` two levels above the conv that makes the channels).

The two parts feed different layers, so they are different channel groups; both sizes are one attribute,
so they must lose the same count. find_groups keeps them equal as the blocks of one group (as for a
chunk) and names the running module in `Group.readers`; slicing looks for the attribute there, so
`self.c` follows the cut. With sizes that are not attributes of the running module the split is left
out, with the warning naming op and module.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tritonprune as tpr


class SplitBlock(nn.Module):
    def __init__(self, c: int = 8, by_attribute: bool = True):
        super().__init__()
        assert by_attribute or c == 8
        self.c = c if by_attribute else None  # no integer attribute equal to the sizes otherwise
        self.cv1 = nn.Sequential(nn.Conv2d(4, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.SiLU())
        self.m = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * c, c, 1))
        self.cv2 = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x):
        sizes = (self.c, self.c) if self.c is not None else (8, 8)
        a, b = self.cv1(x).split(sizes, 1)
        return self.cv2(torch.cat((a, b + self.m(b)), 1))


class Net(nn.Module):
    def __init__(self, by_attribute: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = SplitBlock(by_attribute=by_attribute)

    def forward(self, x):
        return self.block(self.stem(x))


def _model(by_attribute: bool = True) -> Net:
    torch.manual_seed(0)
    m = Net(by_attribute)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


X = torch.randn(2, 3, 6, 6)


def _split_group(groups):
    (g,) = [g for g in groups if any(s.name == "block.cv1.0.weight" and s.role == "out" for s in g.slots)]
    return g


def test_parts_sized_by_the_running_modules_attribute_are_one_blocked_group():
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "split along a channel dim into parts that pruning would make unequal"
        groups = tpr.find_groups(m, X)
    g = _split_group(groups)
    assert g.size == 16 and g.blocks == 2
    assert g.readers == ("block",)  # the module running the split, above cv1.0 and its parent cv1
    assert {"block.m.0", "block.m.2", "block.cv2"} <= set(g.modules)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_the_attribute_follows_and_apply_equals_zero(ratio):
    m = _model()
    groups = tpr.find_groups(m, X)
    g = _split_group(groups)
    plan = tpr.prune(copy.deepcopy(m), X, ratio=ratio, groups=[g], dry_run=True)
    (removed,) = [r for gg, r in zip(plan.groups, plan.removed) if gg.origin == g.origin]
    first = sum(1 for i in removed if i < 8)
    assert first == len(removed) - first > 0  # both parts lose the same count
    zeroed, pruned = copy.deepcopy(m), copy.deepcopy(m)
    plan.zero_(zeroed)
    plan.apply(pruned)
    assert pruned.block.c == 8 - first  # the split's attribute, on the module running it
    assert pruned.block.cv1[0].out_channels == 2 * pruned.block.c
    with torch.no_grad():
        assert torch.allclose(pruned(X), zeroed(X), atol=1e-5)
    # a plan saved and loaded keeps the readers: a fresh copy gets the attribute too
    again = tpr.PrunePlan.from_dict(plan.to_dict())
    assert [gg.readers for gg in again.groups] == [gg.readers for gg in plan.groups]
    fresh = copy.deepcopy(m)
    again.apply(fresh)
    assert fresh.block.c == pruned.block.c
    with torch.no_grad():
        assert torch.allclose(fresh(X), pruned(X))


def test_whole_prune_keeps_the_model_running():
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = tpr.prune(m, X, ratio=0.5)
    assert not plan.info.get("dropped")
    assert m.block.c == 4
    with torch.no_grad():
        assert m(X).shape == (2, 4, 6, 6)


def test_fixed_sizes_are_left_out_with_a_warning():
    m = _model(by_attribute=False)  # split((8, 8)): literals, not an attribute of the running module
    with pytest.warns(UserWarning, match=r"split along a channel dim into parts that pruning would make unequal.*'block'"):
        groups = tpr.find_groups(m, X)
    assert not [g for g in groups if any(s.name == "block.cv1.0.weight" and s.role == "out" for s in g.slots)]


class PartToOutput(SplitBlock):
    """The first part is also a model output: it keeps its width, so the other part must keep its too."""

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat((a, b + self.m(b)), 1)), a


def test_a_part_that_must_stay_whole_keeps_the_other_whole():
    torch.manual_seed(0)
    m = PartToOutput().eval()
    with pytest.warns(UserWarning, match=r"split along a channel dim into parts that pruning would make unequal"):
        groups = tpr.find_groups(m, torch.randn(2, 4, 6, 6))
    assert not [g for g in groups if any(s.name == "cv1.0.weight" and s.role == "out" for s in g.slots)]
    assert not [g for g in groups if any(s.name == "m.0.weight" and s.role == "in" for s in g.slots)]


def test_yolo11n_c2psa_split_is_one_group_and_what_stays_is_named():
    """YOLO11n's C2PSA: the split is a blocked group read by 'model.10'; its residual stream still meets the
    attention's value width (`view(B, C, H, W)` with C from the input), so the run check leaves it and the
    head group out, naming the attention module, and the pruned model runs and trains (issue 22: 0.511)."""
    import beyond_zoo as zoo

    if not zoo.available("yolo11n"):
        pytest.skip("ultralytics is not installed")
    case = zoo.build("yolo11n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = tpr.find_groups(case.model, case.inputs, free_outputs=case.free_outputs)
    assert not [w for w in caught if "model.10" in str(w.message)]  # before: the split was left out, warned
    (g,) = [g for g in groups if g.readers]
    assert g.readers == ("model.10",) and g.blocks == 2 and g.origin == "model.10.cv1.conv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = tpr.prune(case.model, case.inputs, ratio=0.3, groups=groups, free_outputs=case.free_outputs)
    dropped = plan.info.get("dropped") or []
    assert {d["module"] for d in dropped} == {"model.10.m.0.attn"}
    assert any("model.10.m.0.attn" in str(w.message) for w in caught)  # never silent
    case.model.train()
    case.loss(case.model, case.inputs).backward()
    case.model.eval()
    with torch.no_grad():
        case.model(case.inputs)
