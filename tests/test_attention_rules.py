"""Stand-ins for the structures of issue 22, each a few lines of the real thing (no downloads):

- free outputs: a detector returning its neck's feature maps next to its prediction (Ultralytics YOLO's
  `feats`): kept by default, pruned when named in `free_outputs`;
- manual attention (q @ k^T per head, then @ v, as torch.matmul / einsum / bmm): whole heads go;
- multi-query attention: query heads go, the one key/value head stays;
- GroupNorm written as a reshape into (G, C/G): channels go evenly per group;
- index pooling `x[arange, ids.argmax(-1)]` (CLIP's text pooling): the width stays prunable.

Each checks that the pruned model computes what the soft-pruned (zeroed) one does, where that is exact.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonprune as tpr


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.neck = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        f = F.relu(self.neck(F.relu(self.stem(x))))
        return self.head(f), {"feats": [f]}


def test_free_outputs_let_returned_features_shrink():
    torch.manual_seed(0)
    m, x = Detector().eval(), torch.randn(2, 3, 8, 8)
    kept = tpr.find_groups(m, x)
    assert not any(s.module == "neck" and s.role == "out" for g in kept for s in g.slots)  # reaches the feats
    freed = tpr.find_groups(m, x, free_outputs=["feats"])
    assert any(s.module == "neck" and s.role == "out" for g in freed for s in g.slots)
    assert tpr.find_groups(m, x, free_outputs=[(1, "feats")]) == freed  # by path
    with pytest.raises(ValueError, match="names no output"):
        tpr.find_groups(m, x, free_outputs=["nope"])
    plan = tpr.prune(m, x, ratio=0.5, free_outputs=["feats"])
    assert m.neck.out_channels == 8 and not plan.info.get("dropped")
    y, extra = m(x)
    assert y.shape == (2, 5, 8, 8) and extra["feats"][0].shape == (2, 8, 8, 8)


class ManualAttention(nn.Module):
    """Heads reshaped into a batch dim; scores by matmul, einsum or bmm."""

    def __init__(self, how: str, dim: int = 32, heads: int = 4):
        super().__init__()
        self.how, self.heads, self.head_dim = how, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.how == "matmul":
            a = (q @ k.transpose(-2, -1)).softmax(-1)
            o = a @ v
        elif self.how == "einsum":
            a = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
            o = torch.einsum("bhij,bhjd->bhid", a, v)
        else:
            qb, kb, vb = (t.reshape(B * self.heads, N, -1) for t in (q, k, v))
            a = torch.bmm(qb, kb.transpose(1, 2)).softmax(-1)
            o = torch.bmm(a, vb).reshape(B, self.heads, N, -1)
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.attn = ManualAttention(how)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.attn(x) + x).mean(1)


def _zeroed(m, x, plan):
    z = copy.deepcopy(m)
    plan.zero_(z)
    return z


@pytest.mark.parametrize("how", ["matmul", "einsum", "bmm"])
def test_manual_attention_loses_whole_heads(how):
    torch.manual_seed(0)
    m, x = Block(how).eval(), torch.randn(2, 5, 32)
    gs = tpr.find_groups(m, x)
    (g,) = [g for g in gs if any(s.module == "attn.qkv" for s in g.slots)]
    assert g.size == 4 and {s.repeat for s in g.slots if s.module == "attn.qkv"} == {8}  # 4 heads of 8 rows
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.5, groups=gs, dry_run=True)
    z = _zeroed(m, x, plan)
    plan.apply(m)
    m.attn.heads = 2  # the stand-in's own head count (the real layers' attributes follow by themselves)
    assert m.attn.qkv.out_features == 48
    assert torch.allclose(m(x), z(x), atol=1e-5)


class MultiQuery(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, self.head_dim)
        self.v_proj, self.o_proj = nn.Linear(dim, self.head_dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, 1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, 1, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q))
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1)).sum(-1)


def test_multi_query_prunes_query_heads_and_keeps_the_kv_head():
    torch.manual_seed(0)
    m, x = MultiQuery().eval(), torch.randn(2, 5, 32)
    gs = tpr.find_groups(m, x)
    (g,) = [g for g in gs if any(s.module == "q_proj" and s.role == "out" for s in g.slots)]
    assert g.unit == 8 and g.size == 32 and not any(s.module in ("k_proj", "v_proj") and s.role == "out" for s in g.slots)
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.5, groups=[g], dry_run=True)
    z = _zeroed(m, x, plan)
    plan.apply(m)
    assert m.q_proj.out_features == 16 and m.k_proj.out_features == 8
    assert torch.allclose(m(x), z(x), atol=1e-5)


class ReshapeGroupNorm(nn.Module):
    """GroupNorm as model code writes it by hand: view C channels as (G, C/G), normalize each group."""

    def __init__(self, c=16, groups=4):
        super().__init__()
        self.groups = groups
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.weight = nn.Parameter(torch.ones(c))
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        g = y.view(B, self.groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, keepdim=True) + 1e-5).sqrt()
        return self.out(g.view(B, C, H, W) * self.weight.view(1, -1, 1, 1))


def test_groupnorm_by_reshape_prunes_evenly_per_group():
    torch.manual_seed(0)
    m, x = ReshapeGroupNorm().eval(), torch.randn(2, 3, 6, 6)
    (g,) = [g for g in tpr.find_groups(m, x) if any(s.module == "conv" for s in g.slots)]
    assert g.size == 16 and g.blocks == 4 and not g.exact
    tpr.prune(m, x, ratio=0.5, groups=[g])
    assert m.conv.out_channels == 8 and torch.isfinite(m(x)).all()


class IndexPool(nn.Module):
    """CLIP's text pooling: the features at each sequence's highest token id."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.proj = nn.Linear(32, 8, bias=False)

    def forward(self, ids):
        x = F.gelu(self.fc(self.emb(ids)))
        return self.proj(x[torch.arange(x.shape[0]), ids.argmax(-1)])


def test_index_pooling_keeps_channels_prunable():
    torch.manual_seed(0)
    m, ids = IndexPool().eval(), torch.randint(0, 50, (2, 7))
    gs = tpr.find_groups(m, ids)
    assert any(s.module == "fc" and s.role == "out" for g in gs for s in g.slots)
    plan = tpr.prune(copy.deepcopy(m), ids, ratio=0.5, groups=gs, dry_run=True)
    z = _zeroed(m, ids, plan)
    plan.apply(m)
    assert m.fc.out_features == 16 and torch.allclose(m(ids), z(ids), atol=1e-5)


class SharedBetweenBlocks(nn.Module):
    """One module held by two parents (timm CoaT's shared conv position encoding)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        cpe = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.a, self.b = nn.Sequential(cpe, nn.ReLU()), nn.Sequential(cpe, nn.ReLU())
        self.fc = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        y = self.b(self.a(y) + y)
        return self.head(F.relu(self.fc(y))).mean((2, 3))


def test_module_shared_between_parents_runs_the_check():
    m = SharedBetweenBlocks().eval()
    tpr.prune(m, torch.randn(1, 3, 8, 8), ratio=0.5)  # used to fail inside the run check's fake copy
    assert m.fc.out_channels == 8 and m(torch.randn(1, 3, 8, 8)).shape == (1, 2)


class NamedHeads(nn.Module):
    """Attention keeping its head count as `heads` (no known head-count or head-dim attribute)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))


class NamedHeadsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.out = nn.Linear(8, 32), NamedHeads(), nn.Linear(32, 5)

    def forward(self, x):
        h = self.emb(x)
        return self.out(h + self.attn(h))


def test_head_count_under_an_unknown_name_follows_the_cut():
    # before: the module kept heads=4 and split its 16 rows into 4 heads of 4 dims, silently
    torch.manual_seed(0)
    model, x = NamedHeadsNet().eval(), torch.randn(2, 6, 8)
    heads = [g for g in tpr.find_groups(model, x) if g.unit > 1]
    plan = tpr.prune(copy.deepcopy(model), x, groups=heads, ratio=0.5, dry_run=True)
    pruned, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    plan.apply(pruned)
    plan.zero_(zeroed)
    assert pruned.attn.heads == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-6)


def test_head_count_that_several_attributes_could_hold_is_refused():
    from tritonprune.pruning import attention_attrs as aa
    from tritonprune.pruning.slicing import Cut

    class TwoCandidates(NamedHeads):
        def __init__(self):
            super().__init__()
            self.nh, self.blocks_out = self.heads, 4  # blocks_out: also read, also equal to the head count
            del self.heads  # `heads` is a known head-count name now (diffusers); `nh` is not

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, self.nh, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
            o = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
            return o.repeat(1, 1, self.blocks_out // 4)

    m = TwoCandidates()
    p = aa.projections("attn", m)
    removed = torch.zeros(1, 96, dtype=torch.bool)
    removed[0, 16:32] = True  # query heads 2 and 3 of 4 (head dim 8)
    cut = Cut("attn.qkv.weight", 0, removed, {8})
    with pytest.raises(ValueError, match=r"'attn'.*several attributes could be it \(nh, blocks_out\)"):
        aa._unnamed_head_count("attn", m, p, {("attn.qkv.weight", 0): cut})


class CosineAttention(nn.Module):
    """Swin v2's attention in a few lines: q and k normalized per head, a learned scale and a position
    bias per head, and the key third of the packed qkv bias zeroed on a copy at `numel() // 3`."""

    def __init__(self, dim: int = 24, num_heads: int = 4, tokens: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.rand(num_heads, 1, 1))
        self.pos = nn.Linear(2, num_heads)  # Swin v2's cpb_mlp: one bias row per head
        self.register_buffer("coords", torch.randn(tokens, tokens, 2))

    def forward(self, x):
        B, N, C = x.shape
        bias = self.qkv.bias.clone()
        length = bias.numel() // 3
        bias[length:2 * length].zero_()
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * self.logit_scale.exp() + self.pos(self.coords).permute(2, 0, 1)
        o = attn.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class CosineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.out = nn.Linear(6, 24), CosineAttention(), nn.Linear(24, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.out(h + self.attn(h))


def test_cosine_attention_loses_whole_heads_exactly():
    torch.manual_seed(0)
    model, x = CosineNet().double().eval(), torch.randn(2, 5, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no op left without a rule, no channel left out
        groups = tpr.find_groups(model, x)
    (heads,) = [g for g in groups if any(s.module == "attn.pos" and s.role == "out" for s in g.slots)]
    assert heads.unit == 1 and heads.size == 4  # a head is one channel: its q, k, v rows, scale and bias row
    plan = tpr.prune(copy.deepcopy(model), x, groups=[heads], ratio=0.5, dry_run=True)
    pruned, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    plan.apply(pruned)
    plan.zero_(zeroed)
    assert pruned.attn.num_heads == 2 and pruned.attn.qkv.out_features == 36 and pruned.attn.pos.out_features == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-10, atol=1e-12)


class LiteralBiasSlice(CosineAttention):
    """The same zeroing written with literal positions (not a third of the size): they would not move."""

    def forward(self, x):
        bias = self.qkv.bias.clone()
        bias[0:5].zero_()
        return self.proj(F.linear(x, self.qkv.weight, bias)[..., :24])


def test_constant_write_at_literal_positions_keeps_the_channels():
    model, x = LiteralBiasSlice().eval(), torch.randn(2, 5, 24)
    with pytest.warns(UserWarning, match="hard-codes channel positions"):
        groups = tpr.find_groups(model, x)
    assert not any(s.module == "qkv" and s.role == "out" for g in groups for s in g.slots)
