"""Model-code integer attributes after slicing (module_attrs) and tracing both modes (graph/modes).

Tiny hand-written models reproduce the patterns of torchvision's ViT (`self.hidden_dim` in a
reshape), timm's attention (`self.attn_dim`, equal to the residual width, so ambiguous), MetaFormer's
layer scale (`self.shape = (dim, 1, 1)`) and GoogLeNet's auxiliary classifier (runs in training only).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import tritonprune as tpr
from tritonprune.graph.trace import TraceError


class PatchEmbed(nn.Module):
    """Reshapes with a stored width, as torchvision's VisionTransformer._process_input does."""

    def __init__(self, dim=12):
        super().__init__()
        self.hidden_dim = dim
        self.image_size = 8  # stored, read, and not a channel count: must stay
        self.seed = dim  # equal to a pruned width but never read by the forward: must stay
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        assert x.shape[-1] == self.image_size
        n = x.shape[0]
        x = torch.relu(self.proj(x)).reshape(n, self.hidden_dim, -1).mean(-1)
        return self.fc(x)


class Attention(nn.Module):
    """timm-style: width `attn_dim` equal to the residual width `dim`, both prunable."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


class Scale(nn.Module):
    """MetaFormer's layer scale: views its weight with a stored shape tuple."""

    def __init__(self, dim):
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.scale.view(self.shape)


class TinyViT(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim + 3), nn.GELU(), nn.Linear(2 * dim + 3, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class MetaBlock(nn.Module):
    def __init__(self, c=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.scale = Scale(c)
        self.conv2 = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.conv2(self.scale(torch.relu(self.conv1(x))))


def _prune_runs(model, x, **kw):
    pruned = copy.deepcopy(model)
    plan = tpr.prune(pruned, x, ratio=0.5, **kw)
    assert plan.num_removed > 0
    with torch.no_grad():
        out = pruned(x)
    return plan, pruned, out


def test_stored_width_read_by_forward_follows_the_cut():
    torch.manual_seed(0)
    model, x = PatchEmbed().eval(), torch.randn(2, 3, 8, 8)
    plan, pruned, out = _prune_runs(model, x)
    assert pruned.hidden_dim == pruned.proj.out_channels == 6
    assert pruned.image_size == 8 and pruned.seed == 12  # not channel counts / never read
    zero = plan.zero_(copy.deepcopy(model))
    torch.testing.assert_close(out, zero(x), rtol=1e-5, atol=1e-6)


def test_ambiguous_attention_width_is_verified_by_a_fake_forward():
    # attn_dim == residual width == 16: the residual goes to 8, the attention width (heads) to 8 too
    # only by coincidence of ratio, so prune heads and the residual by different amounts
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 5, 6)
    groups = tpr.find_groups(model, x)
    layer = {g.origin: g for g in groups}
    assert any(g.unit == 4 for g in groups), groups  # whole heads of 4 dims
    ratios = {"attn.qkv": 0.5, "embed": 0.25}
    pruned = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved, so no warning
        plan = tpr.prune(pruned, x, ratio=0.5, groups=groups, layer_ratios=ratios)
    assert pruned.attn.num_heads == 2 and pruned.attn.attn_dim == 8, layer
    assert pruned.embed.out_features == 12
    zero = plan.zero_(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zero(x), rtol=1e-5, atol=1e-6)


def test_ambiguous_without_inputs_warns_and_leaves_the_attribute(monkeypatch):
    from tritonprune.graph import remembered

    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 5, 6)
    plan = tpr.prune(copy.deepcopy(model), x, ratio=0.5, layer_ratios={"attn.qkv": 0.5, "embed": 0.25}, dry_run=True)
    monkeypatch.setattr(remembered, "_INPUTS", {})
    fresh = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"no example inputs.*attn\.attn_dim=16 "):
        plan.apply(fresh, check_run=False)  # the run check would refuse this plan (next test)
    assert fresh.attn.attn_dim == 16


def test_unresolved_attribute_makes_apply_refuse_with_nothing_changed(monkeypatch):
    from tritonprune.graph import remembered

    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 5, 6)
    plan = tpr.prune(copy.deepcopy(model), x, ratio=0.5, layer_ratios={"attn.qkv": 0.5, "embed": 0.25}, dry_run=True)
    monkeypatch.setattr(remembered, "_INPUTS", {})
    fresh = copy.deepcopy(model)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)does not run its example inputs.*attn"):
        plan.apply(fresh)
    assert fresh.attn.attn_dim == 16
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_shape_tuple_of_a_layer_scale_follows_the_cut():
    torch.manual_seed(0)
    model, x = MetaBlock().eval(), torch.randn(2, 3, 6, 6)
    plan, pruned, out = _prune_runs(model, x)
    assert pruned.scale.shape == (5, 1, 1)
    torch.testing.assert_close(out, plan.zero_(copy.deepcopy(model))(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ train-mode branches


class WithAux(nn.Module):
    """An auxiliary classifier on trunk channels, run only in training (GoogLeNet, Inception-v3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 12, 3)
        self.fc = nn.Linear(12, 4)
        self.aux_conv = nn.Conv2d(10, 6, 1)
        self.aux_bn = nn.BatchNorm1d(6)
        self.aux_fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.fc(torch.relu(self.conv2(x)).mean((2, 3)))
        if self.training:
            return y, self.aux_fc(self.aux_bn(torch.relu(self.aux_conv(x)).mean((2, 3))))
        return y


def test_groups_traced_in_eval_cover_the_training_only_layers():
    torch.manual_seed(0)
    model, x = WithAux().eval(), torch.randn(3, 3, 8, 8)
    groups = tpr.find_groups(model, x)
    assert model.training is False  # the mode is restored
    trunk = next(g for g in groups if any(s.module == "conv1" for s in g.slots))
    assert any(s.module == "aux_conv" for s in trunk.slots)
    pruned = copy.deepcopy(model)
    tpr.prune(pruned, x, ratio=0.5, groups=groups)
    assert pruned.aux_conv.in_channels == pruned.conv1.out_channels == 5
    pruned.train()
    y, aux = pruned(x)
    (y.sum() + aux.sum()).backward()  # the training step that used to fail
    assert pruned.aux_conv.weight.grad is not None


def test_other_mode_traces_with_a_batch_of_one():
    # the train-mode forward only looks for branches: BatchNorm layers stay in eval mode there
    model = WithAux().eval()
    stats = model.aux_bn.running_mean.clone(), model.aux_bn.num_batches_tracked.clone()
    groups = tpr.find_groups(model, torch.randn(1, 3, 8, 8))
    assert any(s.module == "aux_conv" for g in groups for s in g.slots)
    assert not model.training and not model.aux_bn.training
    assert torch.equal(model.aux_bn.running_mean, stats[0]) and torch.equal(model.aux_bn.num_batches_tracked, stats[1])


class BrokenAux(WithAux):
    def forward(self, x):
        if self.training:
            x = x.view(-1, 7)  # fails: the train-only branch cannot run on these inputs
        return super().forward(x)


def test_other_mode_trace_failure_is_a_clear_refusal():
    model = BrokenAux().eval()
    with pytest.raises(TraceError, match=r"(?s)aux_conv.*not used in eval mode.*also run in train mode"):
        tpr.find_groups(model, torch.randn(2, 3, 8, 8))
