"""Attention layouts of issue 22's Hugging Face part, on small torch-only stand-ins:

- an `nn.MultiheadAttention` whose query is a learned probe (SigLIP's pooling head): torch splits the
  packed `in_proj_weight` into q rows and k/v rows, each used by a Linear; the heads go whole, and the
  head-averaged weights it also returns (dropped by the caller) leave the group exact;
- values written in place into slices of a fresh tensor (DeepSeek's `k[..., :d].copy_(k_nope)`): the
  tensor written holds the values' channels; positions written are fixed, so those channels stay, warned
  with the op and module, and the pruned model still runs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import tritonprune as tpr


class _ProbePool(nn.Module):
    def __init__(self, C=32, H=4):
        super().__init__()
        self.inp = nn.Linear(8, C)
        self.probe = nn.Parameter(torch.randn(1, 1, C))
        self.attention = nn.MultiheadAttention(C, H, batch_first=True)
        self.out = nn.Linear(C, 3)

    def forward(self, x):
        h = self.inp(x)
        y = self.attention(self.probe.repeat(x.shape[0], 1, 1), h, h)[0]
        return self.out(y[:, 0])


def test_multihead_attention_with_a_probe_query_loses_whole_heads():
    torch.manual_seed(0)
    m, x = _ProbePool().eval(), torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no op left without a rule
        gs = tpr.find_groups(m, x)
    (heads,) = [g for g in gs if g.origin == "attention"]
    assert heads.size == 4 and heads.exact  # one channel per head; the averaged weights mix nothing used
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.5, groups=[heads], dry_run=True)
    a, z = copy.deepcopy(m), copy.deepcopy(m)
    plan.apply(a)
    plan.zero_(z)
    assert a.attention.num_heads == 2 and a.attention.in_proj_weight.shape == (48, 32)
    assert (a(x) - z(x)).abs().max() < 1e-6 and (a(x) - m(x)).abs().max() > 1e-4


class _FreshWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 2), nn.Linear(8, 3)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        k = y.new_empty(*y.shape[:-1], 8)
        k[..., :6].copy_(y)
        k[..., 6:].copy_(z)
        return self.head(torch.relu(k))


def test_values_written_into_slices_of_a_fresh_tensor_keep_their_positions():
    torch.manual_seed(0)
    m, x = _FreshWrite().eval(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"writing into a slice along a channel dim.*slice_scatter"):
        gs = tpr.find_groups(m, x)
    assert not any(s.name.startswith(("a.", "b.")) for g in gs for s in g.slots)  # written at fixed positions
    y = m(x)
    tpr.prune(m, x, ratio=0.5)
    assert torch.equal(m(x), y)  # nothing it could not prune was touched
