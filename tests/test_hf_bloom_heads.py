"""Heads whose per-head bias is computed outside the attention module (Bloom's ALiBi; a torch stand-in).

Bloom builds one ALiBi tensor of `(batch * heads, 1, keys)` for the model's head count and passes it to
every attention layer. Pruning keeps the model computing it for the original count and narrows it to the
kept heads' rows at the entry of each pruned attention (a KeptHeads forward pre-hook), so every kept head
keeps its own slope: apply equals zero_ (float64), through forward, generation with the KV cache, a
second prune (composed index maps), save_pretrained / from_pretrained, deepcopy and torch.save.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import tritonprune as tpr
from tritonprune.pruning.kept_heads import KeptHeads, hooks_of
from tritonprune.pruning.plan import PrunePlan

pytest.importorskip("transformers")
import hf_zoo  # noqa: E402

from tritonprune.integrations.hf_checkpoint import plain_load_problem  # noqa: E402


def _bloom():
    m, x, _ = hf_zoo.build("bloom")
    m = m.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = [g for g in tpr.find_groups(m, x) if g.inputs]
    return m, x, heads


def _plan(m, x, heads, removed) -> PrunePlan:
    base = tpr.prune(copy.deepcopy(m), x, ratio=0.3, groups=heads, dry_run=True)
    return PrunePlan(base.model_class, list(heads), removed, base.shapes)


def _greedy(m, x):
    inp = {k: v[:1] for k, v in x.items()}
    return m.generate(**inp, max_new_tokens=4, do_sample=False, use_cache=True)


def test_bloom_heads_uneven_per_layer_apply_equals_zero_and_generate():
    m, x, heads = _bloom()
    assert len(heads) == 2 and all(h.inputs[0].arg == "alibi" and h.inputs[0].dim == 0 for h in heads)
    plan = _plan(m, x, heads, [[1], [0, 2, 3]])  # layer 0 keeps 3 heads, layer 1 keeps 1
    a, z = copy.deepcopy(m), copy.deepcopy(m)
    plan.apply(a)
    plan.zero_(z)
    assert [b.self_attention.num_heads for b in a.transformer.h] == [3, 1]
    assert a.transformer.num_heads == 4 and a.config.n_head == 4  # the model still builds ALiBi for 4 heads
    assert [h.kept for h in hooks_of(a)["transformer.h.0.self_attention"]] == [(0, 2, 3)]
    assert (hf_zoo.output(a, x) - hf_zoo.output(z, x)).abs().max() < 1e-12
    assert (hf_zoo.output(a, x) - hf_zoo.output(m, x)).abs().max() > 1e-6  # the heads did matter
    assert torch.equal(_greedy(a, x), _greedy(z, x))  # the cache path builds ALiBi its own way


def test_bloom_prune_twice_train_round_trip_copy_and_pickle(tmp_path):
    m, x, heads = _bloom()
    ref = copy.deepcopy(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = tpr.prune(m, x, ratio=0.25, groups=heads)  # 3 heads per layer
        assert [b.self_attention.num_heads for b in m.transformer.h] == [3, 3]
        again = [g for g in tpr.find_groups(m, x) if g.inputs]
        assert [g.inputs[0].heads for g in again] == [3, 3]
        assert [g.inputs for g in again] == [g.inputs for g in first.remap(heads)]  # traced anew == remapped
        _plan(m, x, again, [[0], [2]]).apply(m)  # one more per layer: the index maps compose
    assert [b.self_attention.num_heads for b in m.transformer.h] == [2, 2]
    kept = [hooks_of(m)[f"transformer.h.{i}.self_attention"][0].kept for i in range(2)]
    gone = [[h for h in range(4) if h not in k] for k in kept]
    _plan(ref, x, heads, gone).zero_(ref)
    y = hf_zoo.output(m, x)
    assert (y - hf_zoo.output(ref, x)).abs().max() < 1e-12

    problem = plain_load_problem(m)
    assert problem is not None and "alibi" in problem and "pre-hook" in problem
    tpr.save_pretrained(m, tmp_path)
    back = tpr.from_pretrained(type(m), tmp_path)
    assert torch.equal(hf_zoo.output(back, x), y)
    assert [h.kept for h in hooks_of(back)["transformer.h.0.self_attention"]] == [kept[0]]

    twin = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert torch.equal(hf_zoo.output(other, x), y)

    m.train()
    out = m(**x, labels=x["input_ids"])
    out.loss.backward()
    torch.optim.SGD(m.parameters(), lr=1e-2).step()
    assert torch.isfinite(hf_zoo.output(m.eval(), x)).all()


def test_old_plan_files_and_a_narrowed_argument_of_the_wrong_size():
    m, x, heads = _bloom()
    plan = _plan(m, x, heads, [[1], [2]])
    d = plan.to_dict()
    assert d["groups"][0]["inputs"][0]["arg"] == "alibi"
    assert PrunePlan.from_dict(d).groups[0].inputs == heads[0].inputs
    for g in d["groups"]:
        g.pop("inputs")
    assert not any(g.inputs for g in PrunePlan.from_dict(d).groups)  # plans written before: no key
    hook = KeptHeads("alibi", 0, 4, [0, 2])
    with pytest.raises(RuntimeError, match="not a multiple of the 4 heads"):
        hook.narrow(torch.zeros(6, 1, 3), m.transformer.h[0].self_attention)


# ---------------------------------------------------------------- a torch stand-in (not Bloom-specific)


class Attention(nn.Module):
    def __init__(self, dim: int = 16, num_heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias).softmax(-1)
        return x + self.proj((att @ v).transpose(1, 2).reshape(B, T, -1))


class Net(nn.Module):
    """Computes a per-head bias from its own head count (no parameter) and hands it to every block."""

    def __init__(self, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList([Attention(num_heads=heads) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        slopes = 2.0 ** -torch.arange(1, self.heads + 1, dtype=x.dtype)
        bias = slopes[:, None, None] * (torch.arange(T, dtype=x.dtype)[None, :] - torch.arange(T, dtype=x.dtype)[:, None])
        for b in self.blocks:
            x = b(x, bias)  # (heads, T, T): broadcast over the batch
        return x


def test_stand_in_module_receiving_a_per_head_bias_from_its_parent():
    torch.manual_seed(0)
    m = Net().double()
    x = torch.randn(2, 5, 16, dtype=torch.double)
    gs = [g for g in tpr.find_groups(m, x) if g.inputs]
    assert [(g.inputs[0].module, g.inputs[0].arg, g.inputs[0].dim, g.inputs[0].heads) for g in gs] == \
        [(f"blocks.{i}", "bias", 0, 4) for i in range(2)]
    z = copy.deepcopy(m)
    plan = tpr.prune(m, x, ratio=0.5, groups=gs)
    plan.zero_(z)
    assert [b.num_heads for b in m.blocks] == [2, 2] and m.heads == 4
    assert (m(x) - z(x)).abs().max() < 1e-12
