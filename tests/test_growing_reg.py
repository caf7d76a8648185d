"""GrowingReg (targeted, growing regularization), isomorphic allocation, head rounding, counted MACs."""

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # Triton fixes interpreted mode at its first import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
from torch import nn

import tritonprune as tpr
from tritonprune.graph.allocation import kind_label
from tritonprune.pruning.counting import count_macs
from tritonprune.regularizing.engine import Regularization
from tritonprune.regularizing.targeted import chosen_mask


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Attn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.n_heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, self.n_heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))


class TinyGPT(nn.Module):
    def __init__(self, d=16, heads=4, layers=2, vocab=11):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.attn = nn.ModuleList(Attn(d, heads) for _ in range(layers))
        self.fc1 = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
        self.fc2 = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx)
        for ln1, ln2, a, f1, f2 in zip(self.ln1, self.ln2, self.attn, self.fc1, self.fc2):
            x = x + a(ln1(x))
            x = x + f2(F.gelu(f1(ln2(x))))
        return self.head(x)


def _backends():
    out = ["reference", "torch"]
    try:
        import tritonprune.kernels.triton_impl as ti

        if ti.HAS_TRITON and (ti._interpreting() or torch.cuda.is_available()):
            out.append("triton")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("backend", _backends())
def test_targeted_coefficients_hit_only_the_chosen_channels(backend):
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 6)
    with torch.no_grad():
        m.fc1.weight[[1, 4, 6, 7]] *= 0.01  # the 4 weakest of fc1's 8 channels
    groups = tpr.find_groups(m, (x,))
    reg = tpr.GrowingReg(ratio=0.5, delta=0.25, interval=1, decoupled=False)
    eng = Regularization(m, groups, reg, backend=backend)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    eng.apply_to_grads()
    g1 = next(i for i, g in enumerate(groups) if g.origin == "fc1")
    chosen = [i for i in range(8) if float(eng._coef[int(eng.buffers.group_offsets[g1]) + i]) > 0]
    assert chosen == [1, 4, 6, 7]
    for i in range(8):  # fc1's rows only carry group g1 (its inputs are the model's)
        want = 0.25 * m.fc1.weight[i] if i in chosen else torch.zeros(6)
        torch.testing.assert_close(m.fc1.weight.grad[i], want)
    # fc2 is in-columns of fc1's group and out-rows of its own: t += (c_row + c_col) * w, 0 on kept x kept
    g2 = next(i for i, g in enumerate(groups) if g.origin == "fc2")
    c1 = eng._coef[int(eng.buffers.group_offsets[g1]):][:8].cpu()
    c2 = eng._coef[int(eng.buffers.group_offsets[g2]):][:6].cpu()
    assert int((c2 > 0).sum()) == 3
    torch.testing.assert_close(m.fc2.weight.grad, (c2[:, None] + c1[None, :]) * m.fc2.weight.detach())
    assert m.fc1.bias.grad.abs().sum() == 0  # bias=False: biases never shrink


def test_growth_schedule_and_reselection():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 6)
    groups = tpr.find_groups(m, (x,))
    reg = tpr.GrowingReg(ratio=0.5, delta=0.1, interval=2, reg_max=0.25, decoupled=False)
    eng = Regularization(m, groups, reg, backend="torch")
    seen = []
    for _ in range(7):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        eng.apply_to_grads()
        seen.append(round(float(eng._coef.max()), 6))
    assert seen == [0.1, 0.1, 0.2, 0.2, 0.25, 0.25, 0.25]  # +delta every interval, capped at reg_max
    # make the chosen channels strong and the others weak: the next interval re-chooses, and the newly
    # chosen ones start again from delta
    sums = torch.zeros(eng.buffers.n_channels)
    old = eng._coef.cpu() > 0
    sums[~old] = 1e-6
    sums[old] = 1.0
    mask = chosen_mask(reg, groups, eng.buffers.group_offsets.tolist(), sums, eng._shapes)
    assert not (mask & old).any()


def test_growing_reg_validation():
    with pytest.raises(ValueError, match="0.5"):
        tpr.GrowingReg(reg_max=0.9)
    with pytest.raises(ValueError, match="isomorphic"):
        tpr.GrowingReg(kind_ratios={"mlp": 0.5})
    with pytest.raises(ValueError, match="not one of"):
        tpr.GrowingReg(allocation="isomorphic", kind_ratios={"attention": 0.5})


def test_decoupled_shrink_is_lr_free_and_prune_cuts_the_targeted_channels():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(16, 6)
    reg = tpr.GrowingReg(ratio=0.5, delta=0.1, interval=1)
    opts = [tpr.RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=lr), m, (x,), regularizer=reg)
            for lr in (1e-6,)]
    opt = opts[0]
    for _ in range(60):  # lr 1e-6: the loss barely moves the weights, the shrink still acts in full
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    eng = opt._engine
    chosen = (eng._coef.cpu() > 0).nonzero().flatten().tolist()
    offs = eng.buffers.group_offsets.tolist()
    g1 = next(i for i, g in enumerate(eng.groups) if g.origin == "fc1")
    rows = [c - offs[g1] for c in chosen if offs[g1] <= c < offs[g1 + 1]]
    assert len(rows) == 4 and m.fc1.weight[rows].abs().max() < 1e-6
    before = m(x)
    plan = tpr.prune(m, (x,), ratio=0.5, optimizer=opt)
    assert plan.removed[g1] == rows
    torch.testing.assert_close(m(x), before, atol=1e-4, rtol=0)  # nearly lossless


def test_isomorphic_allocation_keeps_per_kind_ratios():
    torch.manual_seed(0)
    m, x = TinyGPT(), torch.randint(0, 11, (1, 8))
    groups = tpr.find_groups(m, (x,), ignored_layers=[m.head])
    labels = sorted({kind_label(g) for g in groups})
    assert labels == ["heads", "mlp", "residual"]
    plan = tpr.prune(m, (x,), ratio=0.5, groups=groups, allocation="isomorphic", dry_run=True,
                     kind_ratios={"residual": 0.0, "heads": 0.5, "mlp": 0.75})
    removed = {}
    for g, r in zip(plan.groups, plan.removed):
        k = kind_label(g)
        a, b = removed.get(k, (0, 0))
        removed[k] = (a + len(r), b + g.size)
    assert removed["residual"][0] == 0
    assert removed["heads"][0] == removed["heads"][1] // 2
    assert removed["mlp"][0] == removed["mlp"][1] * 3 // 4
    uni = tpr.prune(m, (x,), ratio=0.5, groups=groups, dry_run=True)
    assert sum(len(r) for g, r in zip(uni.groups, uni.removed) if kind_label(g) == "residual") == 8


def test_head_rounding_goes_to_the_nearest_count_and_warns():
    torch.manual_seed(0)
    m, x = TinyGPT(), torch.randint(0, 11, (1, 8))
    with pytest.warns(UserWarning, match="asked 0.3, removes 0.25"):
        plan = tpr.prune(m, (x,), ratio=0.3, ignored_layers=[m.head], dry_run=True)
    heads = [r for g, r in zip(plan.groups, plan.removed) if g.unit > 1]
    assert heads and all(len(r) == 4 for r in heads)  # 1 head of 4 channels out of 4 heads, not 2


def test_plan_macs_equal_the_count_of_the_pruned_model():
    torch.manual_seed(0)
    m, x = TinyGPT(), torch.randint(0, 11, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpr.prune(m, (x,), ratio=0.5, ignored_layers=[m.head])
    assert plan.info["macs_after"] == count_macs(m, (x,)).total
    assert plan.info["macs_after"] < plan.info["macs_before"]


def test_too_weak_a_penalty_warns_and_one_that_acts_does_not():
    m, x = MLP(), torch.randn(4, 6)
    adamw = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="too weak"):  # the old README recipe for AdamW: a no-op
        tpr.RegularizedOptimizer(adamw, m, (x,), regularizer=tpr.GroupNorm(reg=5e-4, decoupled=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tpr.RegularizedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3), m, (x,),
                                 regularizer=tpr.GroupNorm(reg=0.1, decoupled=True))
        tpr.RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, (x,),
                                 regularizer=tpr.GroupNorm(reg=5e-4))
        tpr.RegularizedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-5), m, (x,), regularizer=tpr.GrowingReg())


def test_a_target_reports_the_ratio_it_resolved_to():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 6)
    plan = tpr.prune(m, (x,), target_params=120, dry_run=True, ignored_layers=[m.fc3])
    r = plan.info["searched_ratio"]
    again = tpr.prune(m, (x,), ratio=r, dry_run=True, ignored_layers=[m.fc3])
    assert again.removed == plan.removed and plan.info["params_after"] <= 120
