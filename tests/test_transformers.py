"""Transformers: attention heads, head dims, the residual stream and MLPs on Hugging Face ViT, BERT,
GPT-2, Llama (GQA + rotary) and nn.TransformerEncoder, all built from small configs (no downloads).

- the groups are found (heads, MLP, residual stream);
- `apply` equals `zero_` on head and MLP groups (whole heads, and head dims where the scale is explicit);
- after pruning every group the model keeps working through its own API (loss, backward, a step,
  `generate`), with its attention attributes and config fields updated;
- a cut that splits a head is refused before anything changes;
- GroupNorm regularization agrees with Torch-Pruning's GroupNormPruner on ViT and BERT (same groups),
  and with the reference backend elsewhere; LayerNorm weights count in the importance.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")  # (conftest stubs what it imports of torchvision)

from hf_zoo import quiet  # noqa: E402

import tritonprune as tpr  # noqa: E402
from tritonprune.graph.group import LAYERNORM, OUT, PARAM  # noqa: E402
from tritonprune.pruning.attention_attrs import PrunedMultiheadAttention  # noqa: E402
from tritonprune.pruning.plan import PrunePlan  # noqa: E402
from tritonprune.pruning.slicing import apply_cuts, build_cuts, model_tensors  # noqa: E402
from tritonprune.regularizing.engine import Regularization  # noqa: E402

T = transformers
H, D, HIDDEN, INTER = 4, 12, 48, 96


@quiet
def build(name: str):
    """(model in eval mode, example inputs); the same weights on every call."""
    torch.manual_seed(0)
    if name == "vit":
        c = T.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=H, intermediate_size=INTER,
                        image_size=16, patch_size=4, num_labels=3)
        return T.ViTForImageClassification(c).eval(), (torch.randn(2, 3, 16, 16),)
    if name == "bert":
        c = T.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=H,
                         intermediate_size=INTER, max_position_embeddings=32)
        return T.BertForSequenceClassification(c).eval(), (torch.randint(0, 100, (2, 10)),)
    if name == "gpt2":
        c = T.GPT2Config(vocab_size=100, n_embd=HIDDEN, n_layer=2, n_head=H, n_positions=32, use_cache=False,
                         bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(c).eval(), (torch.randint(0, 100, (2, 10)),)
    if name == "llama":
        c = T.LlamaConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=H,
                          num_key_value_heads=2, intermediate_size=INTER, max_position_embeddings=32,
                          use_cache=False, bos_token_id=0, eos_token_id=0)
        return T.LlamaForCausalLM(c).eval(), (torch.randint(0, 100, (2, 10)),)
    layer = nn.TransformerEncoderLayer(HIDDEN, H, INTER, batch_first=True, dropout=0.0)
    return (nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(HIDDEN, 3)).eval(),
            (torch.randn(2, 10, HIDDEN),))


MODELS = ["vit", "bert", "gpt2", "llama", "enc"]


@functools.cache
@quiet
def groups_of(name: str, mode: str = "heads"):
    m, x = build(name)
    return tuple(tpr.find_groups(m, x, head_pruning=mode))


def head_groups(gs):
    return [g for g in gs if g.unit > 1 or g.blocks > 1]


def mlp_groups(gs):
    return [g for g in gs if g.unit == 1 and g.blocks == 1 and g.exact and len(g.slots) == 3
            and g.size == INTER]


def residual_groups(gs):
    """The residual stream: norms mix its channels (LayerNorm; Llama's RMSNorm weights are bare parameters)."""
    return [g for g in gs if not g.exact and g.size == HIDDEN and g.slots_of(LAYERNORM, PARAM)]


def attention_modules(m: nn.Module):
    names = ("attention", "attn", "self_attn")
    return [mod for n, mod in m.named_modules() if n.rsplit(".", 1)[-1] in names + ("self",)
            and any(hasattr(mod, a) for a in ("head_dim", "attention_head_size"))]


def head_dims(m: nn.Module) -> list[int]:
    return [getattr(a, "head_dim", None) or a.attention_head_size for a in attention_modules(m)]


def output(m: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        y = m(*x)
    return y.logits if hasattr(y, "logits") else y


def loss_of(name: str, m: nn.Module, x) -> torch.Tensor:
    """The loss through the model's own API."""
    if name == "vit":
        return m(pixel_values=x[0], labels=torch.tensor([0, 2])).loss
    if name == "bert":
        return m(input_ids=x[0], labels=torch.tensor([0, 1])).loss
    if name in ("gpt2", "llama"):
        return m(input_ids=x[0], labels=x[0]).loss
    return m(*x).square().mean()


# ------------------------------------------------------------------------------------------ groups


@pytest.mark.parametrize("name", MODELS)
def test_groups_found(name):
    gs = groups_of(name)
    heads = head_groups(gs)
    assert len(heads) == 2, gs  # one per layer
    unit = D // 2 if name == "llama" else D  # rotary pairs: a head dim and its partner share a channel
    assert all(g.unit == unit and g.exact for g in heads)
    if name == "llama":
        assert all(g.size == 2 * unit for g in heads)  # two key/value groups (GQA)
    else:
        assert all(g.size == H * D for g in heads)
    assert len(mlp_groups(gs)) == 2 or name == "gpt2"
    if name == "gpt2":  # n_inner = 4 * hidden
        assert sum(g.size == 4 * HIDDEN for g in gs) == 2
    if name != "enc":  # nn.TransformerEncoder: the graph leaves the residual stream out (fixed size in MHA)
        (res,) = residual_groups(gs)
        assert not res.exact and res.size == HIDDEN


@pytest.mark.parametrize("name", ["vit", "bert", "gpt2"])
def test_dims_mode_blocks(name):
    heads = head_groups(groups_of(name, "dims"))
    assert len(heads) == 2 and all(g.blocks == H and g.unit == 1 and g.exact for g in heads)


# ------------------------------------------------------------------------------------ apply == zero_


def _apply_vs_zero(name, groups, ratio=0.5):
    m, x = build(name)
    plan = tpr.prune(m, x, ratio=ratio, groups=list(groups), dry_run=True)
    assert plan.num_removed > 0
    a, z = copy.deepcopy(m), copy.deepcopy(m)
    plan.zero_(z)
    plan.apply(a)
    ya, yz, y0 = output(a, x), output(z, x), output(m, x)
    assert (ya - yz).abs().max().item() < 1e-5
    assert (yz - y0).abs().max().item() > 1e-4  # the pruning did something
    return m, a


@pytest.mark.parametrize("name", MODELS)
def test_apply_equals_zero_heads_and_mlp(name):
    gs = groups_of(name)
    m, a = _apply_vs_zero(name, head_groups(gs) + mlp_groups(gs))
    # whole heads went: the head dim is unchanged, the attention width halves
    assert head_dims(a) == head_dims(m)
    if name == "llama":
        for att in attention_modules(a):
            assert att.k_proj.out_features == D and att.q_proj.out_features == 2 * D
            assert att.num_key_value_groups == 2
        assert a.config.num_key_value_heads == 1 and a.config.num_attention_heads == 2
    elif name == "enc":
        for att in attention_modules(a):
            assert isinstance(att, PrunedMultiheadAttention) and att.num_heads == 2 and att.embed_dim == HIDDEN
    else:
        assert a.config.num_attention_heads == 2
        assert a.config.hidden_size == HIDDEN
    if name == "gpt2":
        assert all(att.split_size == 2 * D for att in attention_modules(a))


@pytest.mark.parametrize("name", ["vit", "bert", "gpt2", "enc"])
def test_apply_equals_zero_head_dims(name):
    """Hugging Face passes its stored scale to the attention; PrunedMultiheadAttention keeps the old one."""
    gs = groups_of(name, "dims")
    heads = head_groups(gs)
    if name == "enc":  # MHA's own forward derives the scale from the head dim: the graph calls it mixing
        assert heads and not any(g.exact for g in heads)
    m, a = _apply_vs_zero(name, heads)
    assert head_dims(a) == [D // 2] * 2
    if name != "enc":
        assert a.config.num_attention_heads == H


def test_mha_unbatched_masks_and_weights():
    """PrunedMultiheadAttention against the soft-pruned nn.MultiheadAttention: masks, need_weights, layouts."""
    torch.manual_seed(1)
    for batch_first in (True, False):
        for kv in ({}, {"add_bias_kv": True}):
            mha = nn.MultiheadAttention(HIDDEN, H, batch_first=batch_first, **kv).eval()
            x = torch.randn(3, 5, HIDDEN)
            groups = tpr.find_groups(mha, (x, x, x, None, False))
            heads = [g for g in groups if g.unit > 1]
            plan = tpr.prune(mha, (x, x, x), ratio=0.5, groups=heads, dry_run=True)
            a, z = copy.deepcopy(mha), copy.deepcopy(mha)
            plan.zero_(z)
            plan.apply(a)
            assert isinstance(a, PrunedMultiheadAttention) and a.num_heads == 2
            B, L = (3, 5) if batch_first else (5, 3)
            pad = torch.zeros(B, L, dtype=torch.bool)  # (batch, source) in both layouts
            pad[:, -1] = True
            causal = torch.ones(L, L, dtype=torch.bool).triu(1)
            for kw in ({}, {"key_padding_mask": pad}, {"attn_mask": causal, "need_weights": False},
                       {"attn_mask": causal.float() * -1e4, "key_padding_mask": pad.float() * -1e4},
                       {"attn_mask": causal, "is_causal": True, "need_weights": False}):
                with torch.no_grad():
                    ya, wa = a(x, x, x, **kw)
                    yz, wz = z(x, x, x, **kw)
                assert (ya - yz).abs().max() < 1e-5, kw
                assert (wa is None) == (wz is None)
            with torch.no_grad():  # separate key/value tensors (not one packed projection), unbatched input
                kv = torch.randn_like(x)
                assert (a(x, kv, kv)[0] - z(x, kv, kv)[0]).abs().max() < 1e-5
                u = x[0] if batch_first else x[:, 0]
                assert (a(u, u, u)[0] - z(u, u, u)[0]).abs().max() < 1e-5


# ------------------------------------------------------------------------- prune everything, then train


@pytest.mark.parametrize("name", MODELS)
@quiet
def test_prune_all_then_train(name):
    m, x = build(name)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    loss_of(name, m, x).backward()
    opt.step()
    opt.zero_grad()
    before = sum(p.numel() for p in m.parameters())
    tpr.prune(m, x, ratio=0.25, groups=list(groups_of(name)), optimizer=opt)
    assert sum(p.numel() for p in m.parameters()) < before
    loss = loss_of(name, m, x)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    if name != "enc":
        assert m.config.hidden_size == HIDDEN * 3 // 4
        assert m.config.num_attention_heads == 3 or name == "llama"
    if name in ("gpt2", "llama"):
        m.eval()
        ids = x[0][:1]
        for cache in (False, True):
            out = m.generate(ids, max_new_tokens=3, do_sample=False, use_cache=cache, pad_token_id=0)
            assert out.shape == (1, ids.shape[1] + 3)
    if name == "gpt2":  # tied embeddings stay tied, and the head reads the pruned stream
        assert m.lm_head.weight is m.transformer.wte.weight
        assert m.lm_head.in_features == m.transformer.wte.embedding_dim == HIDDEN * 3 // 4
        assert m.transformer.h[0].mlp.c_fc.nf == 3 * HIDDEN and m.config.n_inner == 3 * HIDDEN
    if name == "enc":  # the pruned attention is found again, as packed q/k/v heads
        heads = head_groups(tpr.find_groups(m.eval(), x))
        assert len(heads) == 2 and all(g.unit == D and g.size == 3 * D for g in heads)
    if name == "vit":
        assert m.vit.embeddings.cls_token.shape[-1] == HIDDEN * 3 // 4
        assert m.vit.layers[0].layernorm_before.normalized_shape == (HIDDEN * 3 // 4,)


@pytest.mark.parametrize("name,mode", [("gpt2", "dims"), ("enc", "heads")])
@quiet
def test_iterative_steps(name, mode):
    """Two rounds: the second reads the attributes the first one set (head dim, heads, attention width)."""
    m, x = build(name)
    ref = copy.deepcopy(m)
    gs = head_groups(groups_of(name, mode)) + mlp_groups(groups_of(name, mode))
    plan = tpr.prune(m, x, ratio=0.5, groups=gs, steps=2)
    expected = [D // 2] * 2 if mode == "dims" else [D] * 2
    assert head_dims(m) == expected
    plan.zero_(ref)
    assert (output(m, x) - output(ref, x)).abs().max() < 1e-5


def test_plan_roundtrip_sets_attributes(tmp_path):
    m, x = build("bert")
    plan = tpr.prune(m, x, ratio=0.5, groups=list(groups_of("bert")))
    plan.save(tmp_path / "p.json")
    fresh, _ = build("bert")
    PrunePlan.load(tmp_path / "p.json").apply(fresh)
    for a, b in zip(attention_modules(m), attention_modules(fresh)):
        assert (a.num_attention_heads, a.all_head_size) == (b.num_attention_heads, b.all_head_size) == (2, 2 * D)
    assert torch.allclose(output(m, x), output(fresh, x))


def test_cut_splitting_a_head_is_refused():
    m, x = build("bert")
    (g,) = head_groups(groups_of("bert"))[:1]
    split = copy.copy(g)
    split.unit = 1  # pretend rows can go one by one
    tensors = model_tensors(m)
    cuts = build_cuts([(split, [0, 1, 2])], tensors)
    q = m.bert.encoder.layer[0].attention.self.query.weight
    with pytest.raises(ValueError, match="per head"):
        apply_cuts(m, cuts)
    assert m.bert.encoder.layer[0].attention.self.query.weight is q  # nothing changed


# ---------------------------------------------------------------------------------------- regularizer

REG = 1e-2


def _with_grads(m: nn.Module, x, dtype=torch.float64) -> nn.Module:
    """In float64, channels made unequal (as after training: freshly initialized channels have nearly equal
    norms, and gamma's exponent then magnifies any rounding), gradients from one backward, scaled down."""
    m = m.to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                w = mod.weight
                w.mul_(torch.rand(w.shape[0], generator=g, dtype=dtype).add(0.5).view(-1, *[1] * (w.dim() - 1)))
                w.mul_(torch.rand(w.shape[1], generator=g, dtype=dtype).add(0.5).view(1, -1, *[1] * (w.dim() - 2)))
    xs = tuple(t.to(dtype) if t.is_floating_point() else t for t in x)
    out = output_grad(m, xs)
    out.sum().backward()
    for p in m.parameters():
        if p.grad is not None:
            p.grad.mul_(1e-2)
    return m


def output_grad(m, x):
    y = m(*x)
    return y.logits if hasattr(y, "logits") else y


def _clone(m: nn.Module) -> nn.Module:
    c = copy.deepcopy(m)
    for p, q in zip(m.parameters(), c.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return c


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", ["vit", "bert"])
@quiet
def test_group_norm_agrees_with_torch_pruning(name):
    tp = pytest.importorskip("torch_pruning")
    import tp_oracle

    m, x = build(name)
    gs = list(groups_of(name))
    tp_slots = tp_oracle.tp_group_slots(m, x)
    assert sorted(map(tp_oracle.our_group_slots, gs)) == sorted(tp_slots)  # the same groups
    m = _with_grads(m, x)
    before = _grads(m)
    ours, theirs = _clone(m), _clone(m)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1), ours, groups=gs,
                                   regularizer=tpr.GroupNorm(REG), backend="torch")
    opt.regularize()
    num_heads = {}
    for mod in theirs.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
            if all(hasattr(mod, n) for n in names):
                for n in names:
                    num_heads[getattr(mod, n)] = mod.num_attention_heads
    xs = [t.double() if t.is_floating_point() else t for t in x]
    ignored = tp_oracle.output_layers(tp_oracle.build_graph(theirs, xs), theirs)
    pr = tp.pruner.GroupNormPruner(theirs, xs, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=REG,
                                   ignored_layers=ignored, num_heads=num_heads)
    pr.regularize(theirs)
    tg = dict(theirs.named_parameters())
    changed = set()
    for n, p in ours.named_parameters():
        if p.grad is None:
            continue
        d_ours, d_tp = p.grad - before[n], tg[n].grad - before[n]
        # TP sums the importance in float32 even for a float64 model: ~1e-7 relative, which gamma's
        # exponent magnifies to ~1e-5 in the term. A slot counted wrongly changes it by percents.
        assert _rel(p.grad, tg[n].grad) < 5e-5, n
        assert _rel(d_ours, d_tp) < 5e-5 or d_ours.abs().max() == d_tp.abs().max() == 0, n
        if d_ours.abs().max() > 0:
            changed.add(n)
    # attention q/k/v/o and both MLP layers are regularized; LayerNorm weights are not (TP neither)
    q = "vit.layers.0.attention.q_proj.weight" if name == "vit" else "bert.encoder.layer.0.attention.self.query.weight"
    fc = "vit.layers.0.mlp.fc1.weight" if name == "vit" else "bert.encoder.layer.0.intermediate.dense.weight"
    assert q in changed and fc in changed
    assert not any("layernorm" in n.lower() for n in changed)


@pytest.mark.parametrize("name", ["gpt2", "llama", "enc"])
@quiet
def test_group_norm_covers_attention_and_mlp(name):
    """Torch-Pruning's groups differ here (GPT-2's Conv1D is no root layer for TP; GQA, packed MHA): the
    torch backend is held to the reference backend, and every head and MLP group is regularized."""
    m, x = build(name)
    gs = list(groups_of(name))
    m = _with_grads(m, x)
    before = _grads(m)
    results = {}
    for backend in ("torch", "reference"):
        c = _clone(m)
        Regularization(c, gs, tpr.GroupNorm(REG), backend=backend).apply_to_grads()
        results[backend] = _grads(c)
    for n in results["torch"]:
        assert _rel(results["torch"][n], results["reference"][n]) < 1e-5, n  # fp32 importance sums
    for g in head_groups(gs) + mlp_groups(gs):
        for s in g.slots:
            if s.role == OUT and not s.is_bias:
                assert (results["torch"][s.name] - before[s.name]).abs().max() > 0, s.name


def test_layernorm_counts_in_importance():
    """Scaling one residual channel's LayerNorm weights changes the term on the Linear columns of that group."""
    m, x = build("vit")
    res = residual_groups(groups_of("vit"))
    m = _with_grads(m, x)
    terms = []
    for scale in (1.0, 50.0):
        c = _clone(m)
        with torch.no_grad():
            for mod in c.modules():
                if isinstance(mod, nn.LayerNorm):
                    mod.weight[0] *= scale
        before = c.vit.layers[0].mlp.fc1.weight.grad.clone()
        Regularization(c, res, tpr.GroupNorm(REG), backend="torch").apply_to_grads()
        terms.append((c.vit.layers[0].mlp.fc1.weight.grad - before)[:, 0].clone())
    assert not torch.allclose(terms[0], terms[1])
