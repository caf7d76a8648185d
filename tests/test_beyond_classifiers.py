"""Structures of detectors, diffusion UNets, SAM and CLIP (issue 22, "beyond classifiers").

Stand-ins, a few lines of the real thing each:

- GroupNorm over a `cat` whose parts do not line up with the norm's groups (a UNet's skip connection
  next to the upsampled map): the two groups merge, cut into segments, each pruned evenly, so every
  norm group keeps the same count;
- attention with heads in the batch dim and a relative-position table shared by all heads (SAM's
  `einsum("bhwc,hkc->bhwk", q, Rh)`): whole heads go, the table keeps its width;
- attention pooling by `F.multi_head_attention_forward` with separate q/k/v weights and a bias the
  forward concatenates (CLIP RN50): the query width and q_proj's rows go together, in whole heads.

Then the real models (tests/beyond_zoo.py) where their packages are installed: pruned at ratio 0.3 with
no group left out by the run check, the pruned model runs and trains.
"""

from __future__ import annotations

import copy
import warnings

import beyond_zoo as zoo
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonprune as tpr


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of `before` survive in `after` (rows of a sliced weight, in order)."""
    flat_b, flat_a = before.flatten(1), after.flatten(1)
    return [int((flat_b - r).abs().sum(1).argmin()) for r in flat_a]


class SkipCat(nn.Module):
    """A skip (20 channels) next to an upsampled map (12), normalized together in 4 groups of 8: the
    boundary at 20 falls inside the third norm group."""

    def __init__(self):
        super().__init__()
        self.skip, self.up = nn.Conv2d(3, 20, 3, padding=1), nn.Conv2d(3, 12, 3, padding=1)
        self.norm = nn.GroupNorm(4, 32)
        self.out = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.out(F.silu(self.norm(torch.cat([self.skip(x), self.up(x)], 1))))


def test_groupnorm_over_a_cat_not_aligned_to_its_groups():
    torch.manual_seed(0)
    m, x = SkipCat().eval(), torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "4 equal parts of a chunk do not each form a group"
        gs = tpr.find_groups(m, x)
    (g,) = gs
    assert {s.module for s in g.slots if s.role == "out"} == {"skip", "up"}
    assert g.size == 32 and g.blocks == 8  # segments of gcd(8, 20, 12) = 4 channels
    before = copy.deepcopy(m)
    tpr.prune(m, x, ratio=0.5, groups=gs)
    assert m.skip.out_channels == 10 and m.up.out_channels == 6 and m.norm.num_channels == 16
    kept = _kept_rows(before.skip.weight, m.skip.weight) + [20 + i for i in _kept_rows(before.up.weight, m.up.weight)]
    per_norm_group = torch.bincount(torch.tensor(kept) // 8, minlength=4)
    assert per_norm_group.tolist() == [4, 4, 4, 4]  # each norm group keeps its channels together
    # the pruned norm is the original norm over the kept channels
    with torch.no_grad():
        h = torch.cat([before.skip(x), before.up(x)], 1)
        ref = before.out.weight[:, kept].flatten(1) @ F.silu(F.group_norm(
            h[:, kept], 4, before.norm.weight[kept], before.norm.bias[kept])).flatten(2) + before.out.bias[:, None]
        assert torch.allclose(m(x).flatten(2), ref, atol=1e-5)


class SkipTwice(nn.Module):
    """One skip (12 channels) normalized next to two different maps (an up block's two resnets)."""

    def __init__(self):
        super().__init__()
        self.skip, self.u1, self.u2 = nn.Conv2d(3, 12, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 20, 1)
        self.n1, self.n2 = nn.GroupNorm(2, 16), nn.GroupNorm(4, 32)
        self.o1, self.o2 = nn.Conv2d(16, 3, 1), nn.Conv2d(32, 3, 1)

    def forward(self, x):
        s = self.skip(x)
        return self.o1(self.n1(torch.cat([s, self.u1(x)], 1))) + self.o2(self.n2(torch.cat([self.u2(x), s], 1)))


def test_a_group_in_two_unaligned_cats_merges_with_both_partners():
    torch.manual_seed(0)
    m, x = SkipTwice().eval(), torch.randn(2, 3, 4, 4)
    (g,) = tpr.find_groups(m, x)
    assert g.size == 36 and g.blocks == 9  # segments of gcd(8, 12, 4, 20) = 4
    tpr.prune(m, x, ratio=0.5, groups=[g])
    assert (m.skip.out_channels, m.u1.out_channels, m.u2.out_channels) == (6, 2, 10)
    assert m(x).shape == (2, 3, 4, 4)


def test_parts_that_meet_at_single_channels_are_left_out_with_a_warning():
    class Odd(nn.Module):  # 7 + 9 channels in 4 norm groups of 4: only 1-channel segments stay equal
        def __init__(self):
            super().__init__()
            self.a, self.b, self.n, self.o = nn.Conv2d(3, 7, 1), nn.Conv2d(3, 9, 1), nn.GroupNorm(4, 16), nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.o(self.n(torch.cat([self.a(x), self.b(x)], 1)))

    with pytest.warns(UserWarning, match="channels of a are not pruned: equal parts .* at single channels"):
        assert tpr.find_groups(Odd(), torch.randn(1, 3, 4, 4)) == []


class RelPosAttention(nn.Module):
    """SAM's attention: heads folded into the batch, a relative-position table shared by the heads."""

    def __init__(self, dim=32, num_heads=4, n=6):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos = nn.Parameter(torch.randn(n, n, dim // num_heads) * 0.1)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).reshape(
            3, B * self.num_heads, N, -1).unbind(0)
        attn = (q @ k.transpose(-2, -1)) + torch.einsum("bnc,nkc->bnk", q, self.rel_pos)
        o = (attn.softmax(-1) @ v).view(B, self.num_heads, N, -1).permute(0, 2, 1, 3).reshape(B, N, -1)
        return self.proj(o)


class RelPosBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Linear(8, 32), RelPosAttention(), nn.Linear(32, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(h + self.attn(h))


def test_attention_with_a_shared_relative_position_table_loses_whole_heads():
    torch.manual_seed(0)
    m, x = RelPosBlock().eval(), torch.randn(2, 6, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gs = tpr.find_groups(m, x)
    (heads,) = [g for g in gs if any(s.module == "attn.qkv" and s.role == "out" for s in g.slots)]
    assert heads.size == 4  # one channel per head (before: "no channels along" the table, nothing pruned)
    assert any("attn" in str(w.message) and "table" in str(w.message) for w in caught)  # rel_pos keeps its width
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.5, groups=[heads], dry_run=True)
    pruned, zeroed = copy.deepcopy(m), copy.deepcopy(m)
    plan.apply(pruned)
    plan.zero_(zeroed)
    assert pruned.attn.num_heads == 2 and pruned.attn.qkv.out_features == 48 and pruned.attn.rel_pos.shape[-1] == 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-6)


class AttnPool(nn.Module):
    """CLIP RN50's attention pooling: F.multi_head_attention_forward with separate q/k/v weights."""

    def __init__(self, c=32, heads=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(17, c) * 0.1)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.c_proj = nn.Linear(c, 6)
        self.num_heads = heads

    def forward(self, x):
        x = self.stem(x).flatten(2).permute(2, 0, 1)  # (HW)NC
        x = torch.cat([x.mean(0, keepdim=True), x]) + self.pos[:, None]
        x, _ = F.multi_head_attention_forward(
            x, x, x, x.shape[-1], self.num_heads, q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]), bias_k=None, bias_v=None,
            add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        return x[0]


def test_functional_attention_pooling_prunes_query_width_with_heads():
    torch.manual_seed(0)
    m, x = AttnPool().eval(), torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "no coupling rule" for linear with the cat'ed bias
        gs = tpr.find_groups(m, x)
    (g,) = [g for g in gs if any(s.module == "stem" for s in g.slots)]
    assert {"q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "pos"} <= {s.name for s in g.slots}
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.5, groups=gs, dry_run=True)
    assert not plan.info.get("dropped")
    pruned, zeroed = copy.deepcopy(m), copy.deepcopy(m)
    plan.apply(pruned)
    plan.zero_(zeroed)
    assert pruned.stem.out_channels == pruned.q_proj.out_features == 16 and pruned.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-6)


class ToQKV(nn.Module):
    """diffusers' Attention: to_q/to_k/to_v/to_out, the count in `heads` (and `sliceable_head_dim`, the same
    number), heads split by `view(batch, -1, heads, head_dim)` with head_dim read from the rows."""

    def __init__(self, dim=32, heads=8):
        super().__init__()
        self.heads, self.sliceable_head_dim = heads, heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x):
        B = x.shape[0]
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        d = k.shape[-1] // self.heads
        q, k, v = (t.view(B, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, self.heads * d)
        return self.to_out[0](o)


def test_diffusers_style_attention_updates_its_head_count():
    # before: the rows went, `heads` stayed 8, and the forward split 24 rows into 8 heads of 3 (silently)
    torch.manual_seed(0)
    m, x = nn.Sequential(ToQKV(), nn.Linear(32, 4)).eval(), torch.randn(2, 5, 32)
    heads = [g for g in tpr.find_groups(m, x) if g.unit > 1]
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.3, groups=heads, dry_run=True)
    pruned, zeroed = copy.deepcopy(m), copy.deepcopy(m)
    plan.apply(pruned)
    plan.zero_(zeroed)
    assert pruned[0].heads == 6 and pruned[0].to_q.out_features == 24
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-6)


# ---- the real models ------------------------------------------------------------------------------


def _case(name: str) -> zoo.Case:
    if not zoo.available(name):
        pytest.skip(f"{zoo.PACKAGE[name]} is not installed")
    return zoo.build(name)


def _prune(case: zoo.Case, ratio: float = 0.3):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = tpr.prune(case.model, case.inputs, ratio=ratio, free_outputs=case.free_outputs)
    return plan, [str(w.message) for w in caught]


def _runs_and_trains(case: zoo.Case) -> None:
    m = case.model
    with torch.no_grad():
        out = zoo._call(m.eval(), case.inputs)
    assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
               and t.is_floating_point())
    m.train()
    case.loss(m, case.inputs).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_yolov8n_with_free_feats_prunes_below_half():
    case = _case("yolov8n")
    before = _params(case.model)
    plan, _ = _prune(case)
    assert not plan.info.get("dropped")
    assert _params(case.model) / before <= 0.50  # Torch-Pruning's YOLOv8 recipe: 0.485
    _runs_and_trains(case)


def test_unet_prunes_skip_channels_and_heads_with_nothing_dropped():
    case = _case("unet2d")
    exact = [g for g in tpr.find_groups(case.model, case.inputs) if g.exact]
    plan = tpr.prune(copy.deepcopy(case.model), case.inputs, ratio=0.3, groups=exact, dry_run=True)
    pruned, zeroed = copy.deepcopy(case.model), copy.deepcopy(case.model)
    plan.apply(pruned)
    plan.zero_(zeroed)
    with torch.no_grad():  # the heads groups: the head count follows (it used to stay, silently)
        torch.testing.assert_close(zoo._call(pruned, case.inputs)[0], zoo._call(zeroed, case.inputs)[0],
                                   rtol=1e-4, atol=1e-5)
    before = _params(case.model)
    ref = copy.deepcopy(case.model)
    plan, msgs = _prune(case)
    assert not plan.info.get("dropped") and not any("equal parts" in s for s in msgs)
    m = case.model
    assert m.conv_in.out_channels < ref.conv_in.out_channels  # the skip / residual channels
    attn = m.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads < ref.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads
    assert _params(m) / before < 0.45
    _runs_and_trains(case)


def test_sam_encoder_prunes_heads_with_nothing_dropped():
    case = _case("sam_vit")
    plan, _ = _prune(case)
    assert not plan.info.get("dropped")
    assert all(b.attn.num_heads < 4 for b in case.model.blocks)  # window and global blocks
    _runs_and_trains(case)


@pytest.mark.parametrize("name", ["clip_vit", "clip_rn"])
def test_clip_prunes_text_width_and_pooling_with_nothing_dropped(name):
    case = _case(name)
    ref = copy.deepcopy(case.model)
    plan, _ = _prune(case)
    assert not plan.info.get("dropped")
    m = case.model
    assert m.transformer.resblocks[0].attn.out_proj.out_features < ref.transformer.width  # text width (argmax pooling)
    if name == "clip_rn":
        assert m.visual.attnpool.q_proj.out_features < ref.visual.attnpool.q_proj.out_features
    _runs_and_trains(case)
