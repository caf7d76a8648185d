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



class HeadsAttention(nn.Module):
    """Ultralytics' Attention in small: qkv viewed per head by `self.num_heads` (its conv one level
    further down), q/k/v split by `key_dim`/`head_dim`, heads in the batch dim, and the values viewed
    to the width of the input (C from `x.shape`), so their width is tied to the residual's by count. The
    depthwise `pe` on the values is what gives the head group its values' width (rows per head) for the
    run check's tie; without such a layer the tie is not found and both groups are left out, named."""

    def __init__(self, dim: int = 16, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.key_dim = self.head_dim // 2
        self.scale = self.key_dim**-0.5
        self.qkv = nn.Sequential(nn.Conv2d(dim, dim + 2 * self.key_dim * num_heads, 1))
        self.proj = nn.Conv2d(dim, dim, 1)
        self.pe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # a layer producing the values' width

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, 2 * self.key_dim + self.head_dim, H * W).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        return self.proj((v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W)))


class SplitAttentionBlock(nn.Module):
    """C2PSA in small: an equal split by `self.c`, attention on one part with a residual."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.c = c
        self.cv1 = nn.Sequential(nn.Conv2d(4, 2 * c, 1))
        self.attn = HeadsAttention(c)
        self.cv2 = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat((a, b + self.attn(b)), 1))


def test_residual_half_and_attention_heads_are_tied_by_count():
    """The residual half alone breaks the values' view, and so do the heads alone: the run check ties the
    two (one block of the split group has the values' width), rounded to a whole head, and warns that
    the tie removes more than the selection asked."""
    torch.manual_seed(0)
    m, x = SplitAttentionBlock().eval(), torch.randn(2, 4, 3, 3)
    groups = tpr.find_groups(m, x)
    (split,) = [g for g in groups if g.readers == ("",)]
    (heads,) = [g for g in groups if g.readers == ("attn",)]  # qkv viewed by attn.num_heads
    assert split.blocks == 2 and heads.size == 2  # heads go whole (the scores per head)
    with pytest.warns(UserWarning, match=rf"only run with another's count(.|\n)*group {split.index} "):
        plan = tpr.prune(copy.deepcopy(m), x, ratio=0.3, groups=[split, heads], dry_run=True)
    assert not plan.info.get("dropped")
    zeroed, pruned = copy.deepcopy(m), copy.deepcopy(m)
    plan.zero_(zeroed)
    plan.apply(pruned)
    assert (pruned.c, pruned.attn.num_heads, pruned.attn.head_dim) == (8, 1, 8)
    assert pruned.attn.scale == m.attn.scale  # the scores' scale is the soft-pruned model's
    with torch.no_grad():
        assert torch.allclose(pruned(x), zeroed(x), atol=1e-5)


def test_yolo11n_prunes_c2psa_and_stays_below_half():
    """YOLO11n's C2PSA: the split is a blocked group read by 'model.10', tied by the run check to the
    attention's heads (whose count 'model.10.m.0.attn' reads); nothing is left out, the pruned model runs
    and trains with Ultralytics' loss, and apply equals zero_ (issue 22: 0.511 before, target <= 0.50)."""
    import beyond_zoo as zoo

    if not zoo.available("yolo11n"):
        pytest.skip("ultralytics is not installed")
    case = zoo.build("yolo11n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = tpr.find_groups(case.model, case.inputs, free_outputs=case.free_outputs)
    assert not [w for w in caught if "model.10" in str(w.message)]  # before: the split was left out, warned
    assert {g.readers for g in groups if g.readers} == {("model.10",), ("model.10.m.0.attn",)}
    before = sum(p.numel() for p in case.model.parameters())
    base = copy.deepcopy(case.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpr.prune(case.model, case.inputs, ratio=0.3, groups=groups, free_outputs=case.free_outputs)
    assert not plan.info.get("dropped")
    assert sum(p.numel() for p in case.model.parameters()) / before <= 0.50
    c2psa = case.model.model[10]
    assert c2psa.cv1.conv.out_channels == 2 * c2psa.c and c2psa.m[0].attn.num_heads == 1
    zeroed = copy.deepcopy(base)
    plan.zero_(zeroed)
    with torch.no_grad():
        assert torch.allclose(case.model(case.inputs)[0], zeroed(case.inputs)[0], atol=1e-4)
    case.model.train()
    case.loss(case.model, case.inputs).backward()
    case.model.eval()
