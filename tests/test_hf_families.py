"""Hugging Face families, one per class of rule, built from tiny configs (tests/hf_zoo.py, no downloads):

- qwen3: QK-norm (q_norm/k_norm of size head_dim, shared by every head): heads pruned, the norms untouched;
- gpt_bigcode: multi-query c_attn split by sizes from attributes: query heads go, the key/value head stays,
  the split sizes follow;
- phi, stablelm, gptj, gpt_neox, falcon, gemma (one KV head), gemma2, beit, mobilevit, deberta_v2, phi3,
  falcon_new: every attention module loses whole heads (partial rotary, q/k/v chunked per head, multi-query,
  manual q @ k^T, per-head bias, relative-position terms repeated per batch item and gathered by position,
  q | k | v sliced at positions from the config, q/k/v laid out per key/value group); siglip_vision's
  pooling head too (nn.MultiheadAttention with a learned probe as query); deepseek_v2/v3 (multi-head
  latent attention: heads carried through q_b_proj / kv_b_proj, the shared rotary key stays); bloom (its
  ALiBi bias, computed by the model for all heads, narrowed to the kept heads at each attention's entry:
  tests/test_hf_bloom_heads.py);
- t5: relative position bias table indexed by head, shared by all layers: heads and table pruned together;
- swin: window attention with a per-head bias table gathered by an index buffer;
- falcon: FalconLinear computes x @ W.T, parallel attention + MLP: groups found (MLP, residual stream);
- mixtral / qwen2_moe: fused experts, each expert's intermediate channels pruned on their own.

For each: `apply` equals `zero_` on the exact groups; after pruning the model runs its own API (forward,
a training step, `generate`); the save/reload route gives identical outputs, and a plain
`from_pretrained` either loads the same model or raises. The round trip also runs on the families of
tests/test_transformers.py (ViT, BERT, GPT-2, Llama).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

pytest.importorskip("transformers")
import hf_zoo  # noqa: E402
from hf_zoo import quiet  # noqa: E402

import tritonprune as tpr  # noqa: E402
from tritonprune.integrations.hf_checkpoint import FILE, plain_load_problem  # noqa: E402
from tritonprune.pruning.plan import PrunePlan  # noqa: E402


@functools.cache
@quiet
def groups_of(name: str, mode: str = "heads"):
    m, x, _ = hf_zoo.build(name)
    return tuple(tpr.find_groups(m, x, head_pruning=mode))


def slots_named(gs, fragment: str):
    return [(i, s) for i, g in enumerate(gs) for s in g.slots if fragment in s.name]


def exact_plan(model, x, gs) -> PrunePlan:
    plan = tpr.prune(copy.deepcopy(model), x, ratio=0.25, groups=list(gs), dry_run=True)
    keep = [i for i, g in enumerate(plan.groups) if g.exact]
    return PrunePlan(plan.model_class, [plan.groups[i] for i in keep], [plan.removed[i] for i in keep], plan.shapes)


# ------------------------------------------------------------------------------------- the rules


def test_qk_norm_belongs_to_the_head_dim():
    gs = groups_of("qwen3")
    assert not slots_named(gs, "q_norm") and not slots_named(gs, "k_norm")  # never pruned on their own
    assert len([g for g in gs if g.unit > 1]) == 2  # whole heads (rotary pairs: unit = head_dim / 2)
    m, x, _ = hf_zoo.build("qwen3")
    norm = m.model.layers[0].self_attn.q_norm.weight.detach().clone()
    tpr.prune(m, x, ratio=0.5, groups=list(gs))
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.out_features == 16 and torch.equal(attn.q_norm.weight, norm)  # 2 of 4 heads left
    # head dims cannot shrink under a norm over them: the dims mode leaves these heads whole
    assert not any(g.blocks > 1 for g in groups_of("qwen3", "dims"))


class _QKLayerNormAttention(torch.nn.Module):
    """timm/Cohere style: nn.LayerNorm(head_dim) on q and k of every head."""

    def __init__(self, C=32, H=4):
        super().__init__()
        self.d = C // H
        self.q, self.k, self.v, self.o = (torch.nn.Linear(C, C) for _ in range(4))
        self.qn, self.kn = torch.nn.LayerNorm(self.d), torch.nn.LayerNorm(self.d)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(self.qn(q), self.kn(k), v)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def test_layernorm_over_the_head_dim_keeps_whole_heads_exact():
    m = torch.nn.Sequential(torch.nn.Linear(8, 32), _QKLayerNormAttention(), torch.nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8)
    gs = tpr.find_groups(m, x)
    (heads,) = [g for g in gs if g.unit > 1]
    assert heads.unit == 8 and heads.exact and not slots_named(gs, "qn") and not slots_named(gs, "kn")
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.5, groups=[heads], dry_run=True)
    a, z = copy.deepcopy(m), copy.deepcopy(m)
    plan.apply(a)
    plan.zero_(z)
    assert a[1].q.out_features == 16 and a[1].qn.weight.shape == (8,)
    assert (a(x) - z(x)).abs().max() < 1e-6


def test_multi_query_packed_projection_loses_query_heads():
    gs = groups_of("gpt_bigcode")
    q = [(i, s) for i, s in slots_named(gs, "attn.c_attn.weight") if s.dim == 0]
    assert len(q) == 2 and all(s.start == 0 and s.length == 32 for _, s in q)  # the q rows; k, v stay
    assert all(gs[i].unit == 8 for i, _ in q)  # whole query heads
    assert sum(g.size == 128 for g in gs) == 2  # the MLPs
    m, x, _ = hf_zoo.build("gpt_bigcode")
    tpr.prune(m, x, ratio=0.5, groups=list(gs))
    attn = m.transformer.h[0].attn
    assert attn.num_heads == 2 and attn.embed_dim == 16 and attn.kv_dim == 8  # split sizes follow
    assert attn.c_attn.out_features == 16 + 2 * 8


# every attention module of these loses whole heads at ratio=0.3 (tiny configs of tests/hf_zoo.py)
HEADS = {"phi": "self_attn", "stablelm": "self_attn", "gptj": "attn", "gpt_neox": "attention",
         "falcon": "self_attention", "gpt_bigcode": "attn", "gemma_mqa": "self_attn", "gemma2": "self_attn",
         "beit": "attention", "mobilevit": "attention.attention", "deberta_v2": "attention.self",
         "phi3": "self_attn", "falcon_new": "self_attention", "siglip_vision": "self_attn|head.attention",
         "deepseek_v2": "self_attn", "deepseek_v3": "self_attn", "bloom": "self_attention"}


def _heads(m: torch.nn.Module, suffix: str) -> list[int]:
    out = []
    for name, mod in m.named_modules():
        if any(name.endswith("." + s) for s in suffix.split("|")):
            n = next((getattr(mod, a) for a in ("num_heads", "num_attention_heads", "n_head")
                      if isinstance(getattr(mod, a, None), int)), None)
            if n is None and hasattr(mod, "q_proj"):  # modules reading the count from the config (Gemma)
                n = mod.q_proj.out_features // mod.head_dim
            elif n is None and hasattr(mod, "qkv_proj"):  # Phi-3: q | k | v rows, the query heads first
                n = mod.qkv_proj.out_features // mod.head_dim - 2 * mod.num_key_value_heads
            elif n is None:  # GPT-NeoX: q, k, v interleaved per head in query_key_value
                n = mod.query_key_value.out_features // (3 * mod.head_size)
            out.append(n)
    return out


@pytest.mark.parametrize("name", sorted(HEADS))
@quiet
def test_every_attention_module_loses_heads(name):
    m, x, _ = hf_zoo.build(name)
    before = _heads(m, HEADS[name])
    tpr.prune(m, x, ratio=0.3)
    after = _heads(m, HEADS[name])
    assert before and all(a < b for a, b in zip(after, before)), (before, after)
    assert torch.isfinite(hf_zoo.output(m, x)).all()


@quiet
def test_phi3_heads_of_one_layer_only_get_a_layer_config(tmp_path):
    """Phi-3 reads its query width from the config shared by all layers: a layer pruned on its own gets
    a LayerConfig (its own head counts, the rest read through), so q | k | v are sliced where they are."""
    heads = [g for g in groups_of("phi3") if g.unit > 1]
    m, x, _ = hf_zoo.build("phi3")
    ref = copy.deepcopy(m)
    plan = tpr.prune(m, x, ratio=0.5, groups=heads[:1])
    a0, a1 = (layer.self_attn for layer in m.model.layers)
    assert a0.qkv_proj.out_features == 32 and a1.qkv_proj.out_features == 64 and m.config.num_attention_heads == 4
    assert (a0.config.num_attention_heads, a0.config.num_key_value_heads) == (2, 1) and a1.config is m.config
    assert a0.config._attn_implementation == m.config._attn_implementation
    plan.zero_(ref)
    assert (hf_zoo.output(m, x) - hf_zoo.output(ref, x)).abs().max() < 1e-6
    tpr.save_pretrained(m, tmp_path)
    assert torch.equal(hf_zoo.output(tpr.from_pretrained(type(m), tmp_path), x), hf_zoo.output(m, x))


def test_t5_bias_table_goes_with_its_heads_in_every_layer():
    gs = groups_of("t5")
    (i, table), = [(i, s) for i, s in slots_named(gs, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias")]
    g = gs[i]
    assert table.dim == 1 and g.size == 4  # one channel per head, shared by both encoder layers
    assert {s.name for s in g.slots} >= {f"encoder.block.{b}.layer.0.SelfAttention.{p}.weight" for b in (0, 1) for p in "qkvo"}
    m, x, _ = hf_zoo.build("t5")
    tpr.prune(m, x, ratio=0.25, groups=list(gs))
    a = m.encoder.block[1].layer[0].SelfAttention
    assert (a.n_heads, a.inner_dim) == (3, 24)
    assert m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (32, 3)


def test_swin_bias_table_gathered_by_index_goes_with_its_heads():
    gs = groups_of("swin")
    found = slots_named(gs, "relative_position_bias_table")
    assert len(found) == 2 and all(s.dim == 1 for _, s in found)
    assert all(any("q_proj" in s.name for s in gs[i].slots) for i, _ in found)


def test_falcon_gets_groups():
    gs = groups_of("falcon")
    assert sum(g.size == 128 and g.exact for g in gs) == 2  # dense_h_to_4h / dense_4h_to_h, per layer
    assert any(not g.exact and g.size == 32 for g in gs)  # the residual stream (LayerNorm mixes it)


@pytest.mark.parametrize("name,experts,inter", [("mixtral", 4, 64), ("qwen2_moe", 4, 16)])
def test_experts_grouped_per_expert(name, experts, inter):
    gs = [g for g in groups_of(name) if g.origin.endswith(".experts")]
    assert len(gs) == 2 and all(g.blocks == experts and g.size == experts * inter and g.exact for g in gs)
    m, x, _ = hf_zoo.build(name)
    ref = copy.deepcopy(m)
    removed = [sorted(e * inter + j for e in range(experts) for j in {(e + 1) % inter, (3 * e + 2) % inter})
               for _ in gs]
    shapes = quiet(tpr.prune)(copy.deepcopy(m), x, groups=gs, dry_run=True).shapes
    plan = PrunePlan(f"{type(m).__module__}.{type(m).__qualname__}", gs, removed, shapes)
    with pytest.warns(UserWarning, match="eager experts implementation"):
        plan.apply(m)  # inter - 2 per expert: rows no longer 16-byte aligned for torch's grouped matmul
    assert m.config._experts_implementation == "eager"
    plan.zero_(ref)
    assert m.model.layers[0].mlp.experts.down_proj.shape[-1] == inter - 2
    assert (hf_zoo.output(m, x) - hf_zoo.output(ref, x)).abs().max() < 1e-5  # each expert lost its own channels


@quiet
def test_dims_mode_keeps_the_scale_and_plain_load_refuses(tmp_path):
    """head_pruning="dims": the scale stays 1/sqrt(original head dim); a config saying head_dim=6 would
    give 1/sqrt(6), so config.json stays the original and a plain load raises."""
    m, x, _ = hf_zoo.build("vit")
    tpr.prune(m, x, ratio=0.25, groups=[g for g in groups_of("vit", "dims") if g.blocks > 1])
    attn = m.vit.layers[0].attention
    assert attn.head_dim == 6 and attn.scaling == pytest.approx(8 ** -0.5)
    assert m.config.to_dict()["num_attention_heads"] == 4 and plain_load_problem(m) is not None
    m.save_pretrained(tmp_path)  # even HF's own save: the config keeps the original attention fields
    with pytest.raises(RuntimeError, match="mismatched"):
        type(m).from_pretrained(tmp_path)


# ------------------------------------------------------------------------- run, train, reload


UNIFORM = {"qwen3", "mixtral", "qwen2_moe", "gpt2", "llama", "vit", "bert", "t5"}
FAMILIES = ["qwen3", "gpt_bigcode", "t5", "swin", "falcon", "mixtral", "qwen2_moe", "vit", "bert", "gpt2", "llama",
            "phi", "gemma_mqa", "gpt_neox", "beit", "phi3", "falcon_new", "siglip_vision", "deepseek_v2", "bloom"]


@pytest.mark.parametrize("name", FAMILIES)
@quiet
def test_prune_run_train_generate_reload(name, tmp_path):
    m, x, kind = hf_zoo.build(name)
    gs = groups_of(name)
    plan = exact_plan(m, x, gs)
    a, z = copy.deepcopy(m), copy.deepcopy(m)
    plan.apply(a)
    plan.zero_(z)
    assert (hf_zoo.output(a, x) - hf_zoo.output(z, x)).abs().max() < 1e-5

    before = sum(p.numel() for p in m.parameters())
    tpr.prune(m, x, ratio=0.25, groups=list(gs))
    assert sum(p.numel() for p in m.parameters()) < before
    m.train()
    out = m(**x, **hf_zoo.labels_for(kind, m, x))
    loss = out.loss if getattr(out, "loss", None) is not None else out[0].square().mean()
    loss.backward()
    torch.optim.SGD(m.parameters(), lr=1e-2).step()
    m.eval()
    y = hf_zoo.output(m, x)
    assert torch.isfinite(y).all()
    if kind in ("causal", "seq2seq"):
        inp = {k: v[:1] for k, v in x.items() if k != "decoder_input_ids"}
        assert m.generate(**inp, max_new_tokens=3, do_sample=False, use_cache=True).shape[-1] >= 3

    tpr.save_pretrained(m, tmp_path)
    back = tpr.from_pretrained(type(m), tmp_path)
    assert torch.equal(hf_zoo.output(back, x), y)
    assert not back.training and all(p.device.type == "cpu" for p in back.parameters())
    problem = plain_load_problem(m)
    if name in UNIFORM:
        assert problem is None  # every layer pruned alike: the config fields match the shapes
    if problem is None:  # uniform pruning: config.json describes the model, and the config fields match
        plain = type(m).from_pretrained(tmp_path)
        assert torch.equal(hf_zoo.output(plain, x), y)
    else:
        with pytest.raises(RuntimeError, match="mismatched"):  # the original config: shapes differ
            type(m).from_pretrained(tmp_path)


@quiet
def test_auto_class_dtype_and_errors(tmp_path):
    from transformers import AutoModelForCausalLM

    m, x, _ = hf_zoo.build("llama")
    with pytest.raises(ValueError, match="no pruning plan"):
        tpr.save_pretrained(m, tmp_path / "none")
    plan = tpr.prune(m, x, ratio=0.5, groups=list(groups_of("llama")))
    tpr.save_pretrained(m, tmp_path / "a", plan=plan)
    assert (tmp_path / "a" / FILE).exists()
    back = tpr.from_pretrained(AutoModelForCausalLM, tmp_path / "a", dtype=torch.float64)
    assert back.model.embed_tokens.weight.dtype == torch.float64
    assert torch.allclose(hf_zoo.output(back, x).float(), hf_zoo.output(m, x), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="tritonprune.save_pretrained"):
        tpr.from_pretrained(AutoModelForCausalLM, tmp_path / "none")
    # twice pruned: both plans are recorded and replayed in order
    tpr.prune(m, x, ratio=0.5, groups=tpr.find_groups(m, x))
    tpr.save_pretrained(m, tmp_path / "b")
    assert torch.equal(hf_zoo.output(tpr.from_pretrained(AutoModelForCausalLM, tmp_path / "b"), x), hf_zoo.output(m, x))


@quiet
def test_eager_experts_recorded_for_a_plain_load(tmp_path):
    # 61 channels per expert: rows not 16-byte aligned for grouped matmul, so pruning switched to the eager
    # experts; config.json must say so, or a plain from_pretrained picks grouped_mm and fails its forward
    m, x, _ = hf_zoo.build("mixtral")
    gs = [g for g in groups_of("mixtral") if g.origin.endswith(".experts")]
    plan = tpr.prune(copy.deepcopy(m), x, ratio=0.3, groups=gs, dry_run=True)
    plan = PrunePlan(plan.model_class, plan.groups, [[b * 64 + j for b in range(4) for j in range(3)] for _ in gs],
                     plan.shapes)
    plan.apply(m)
    assert m.config._experts_implementation == "eager"
    y = hf_zoo.output(m, x)
    tpr.save_pretrained(m, tmp_path)
    plain = type(m).from_pretrained(tmp_path)
    assert plain.config._experts_implementation == "eager" and torch.equal(hf_zoo.output(plain, x), y)
