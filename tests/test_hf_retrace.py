"""Tracing a pruned model again finds the groups the plan says it has: `find_groups(pruned)` equals
`plan.remap(groups)`, channel for channel, so training after a re-trace regularizes the same channels.

Layers left with one key/value head are the exception: their query heads become units of their own
(the key/value head stays), so their attention groups differ from the remapped whole-KV-group ones.
The classes at risk are layers that pruning leaves with one key/value head (GQA 4/2 -> 2/1, MQA) or with
as many query heads as key/value heads: a per-dim table read by every head (rotary cos/sin) is then no
longer broadcast over heads, and used to be coupled to that layer's head dims, merging the attention
groups of all layers or dropping them. Tiny configs from tests/hf_zoo.py, no downloads.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
import hf_zoo  # noqa: E402

import tritonprune as tpr  # noqa: E402

T = hf_zoo.T
FAMILIES = {
    "llama_gqa": lambda: hf_zoo.build("llama"),  # 4 heads / 2 KV heads -> 2 / 1 -> 1 / 1
    "llama_mha": lambda: hf_zoo._causal(T.LlamaForCausalLM, T.LlamaConfig(**hf_zoo.DEC, num_key_value_heads=4)),
    "llama_mqa": lambda: hf_zoo._causal(T.LlamaForCausalLM, T.LlamaConfig(**hf_zoo.DEC, num_key_value_heads=1)),
    "qwen2": lambda: hf_zoo.build("qwen2"),
    "gpt2": lambda: hf_zoo.build("gpt2"),
}


def footprint(group: tpr.Group) -> tuple:
    """What a group is, whatever its slots' pieces: per channel, in order, the tensor indices it owns."""
    owned: list[list[tuple]] = [[] for _ in range(group.size)]
    for s in group.slots:
        if s.blocks == 1:
            for i, idx in enumerate(s.indices()):
                owned[s.offset + i].extend((s.name, s.dim, k) for k in idx)
        else:
            per = s.length // s.blocks
            for j in range(s.blocks):
                for p in range(per):
                    owned[s.offset + j * per + p].append((s.name, s.dim, j, s.start + p))
    return group.size, group.unit, group.blocks, tuple(tuple(sorted(c)) for c in owned)


def same_groups(a: list[tpr.Group], b: list[tpr.Group]) -> bool:
    return sorted(map(footprint, a)) == sorted(map(footprint, b))


def attention_groups(groups: list[tpr.Group]) -> list[tpr.Group]:
    return [g for g in groups if any("q_proj" in s.name or "c_attn" in s.name for s in g.slots) and g.unit > 1]


def query_rows(group: tpr.Group) -> bool:
    return any("q_proj" in s.name and s.role == "out" for s in group.slots)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_retrace_after_prune_equals_remap(name):
    torch.manual_seed(0)
    model, x, _ = FAMILIES[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = tpr.find_groups(model, x)
        layers = len(attention_groups(groups))
        assert layers == 2  # one whole-head group per layer, never merged
        for _ in range(2):  # prune, then prune the pruned model again
            plan = tpr.prune(model, x, ratio=0.5, groups=groups)
            remapped = plan.remap(groups)
            groups = tpr.find_groups(model, x)
            # a layer left with one key/value head is traced anew with its query heads as the units (they
            # can go on their own now); every other group is the remapped one
            one_kv = any(m.k_proj.out_features == m.head_dim for m in model.modules() if hasattr(m, "k_proj"))
            keep = (lambda gs: [g for g in gs if not query_rows(g)]) if one_kv else (lambda gs: gs)
            assert same_groups(keep(groups), keep(remapped)), name
            assert len(attention_groups(groups)) == layers
            assert not any("rotary" in s.name for g in groups for s in g.slots)
            with torch.no_grad():
                logits = model(**x).logits
            assert logits.shape[:2] == x["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.xfail(strict=True, reason="known gap: a QK-norm weight on a layer left with one KV head is "
                   "coupled to that head (nothing broadcasts over heads); one whole unit, so never pruned")
def test_qk_norm_with_one_kv_head_stays_out_of_the_group():
    torch.manual_seed(0)
    model, x, _ = hf_zoo.build("qwen3")  # 4 / 2 heads -> 2 / 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = tpr.find_groups(model, x)
        plan = tpr.prune(model, x, ratio=0.5, groups=groups)
        fresh = tpr.find_groups(model, x)
    assert not any("k_norm" in s.name for g in fresh for s in g.slots)
    assert same_groups(fresh, plan.remap(groups))
