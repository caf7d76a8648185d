"""Attention-layer attributes after slicing: head counts, head dims, hidden sizes, model config fields.

Slicing cuts tensors; attention modules also keep integers that their forward reads (the head dim
used to reshape q/k/v into heads, GPT-2's `split_size`, GQA's `num_key_value_groups`, the embed dim
of `nn.MultiheadAttention`). These are derived here from the cuts themselves, per attention module:

- the q rows of a module form `H` heads of `d` rows (`d` from its head-dim attribute, or rows / heads);
  k and v rows form `Hkv` heads of `d` rows;
- a cut that removes whole heads keeps `d` and lowers `H` (and `Hkv`; the query heads of a removed
  key/value head must go with it, so `H / Hkv` is unchanged), or removes the same number of query heads
  under every key/value head, which all stay (multi-query: `H / Hkv` drops);
- a cut that removes the same count from every head lowers `d` and keeps the head counts;
- anything else is refused (the module could not reshape its q/k/v into heads).

The softmax scale stays what it was (1/sqrt of the original head dim), so a sliced model computes what
the soft-pruned one does. Hugging Face modules pass their stored `scaling` explicitly; an
`nn.MultiheadAttention` whose attention width or head dim changes becomes a `PrunedMultiheadAttention`
(same parameters and state-dict keys), since torch's own forward ties the attention width to the
embed dim and derives the scale from the head dim.

Config fields (`hidden_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim`,
`intermediate_size`) are global: they are updated only when every layer agrees on the new value, and
left as they were otherwise (per-layer values live on the layer modules and in the weights). Where head
dims were pruned (the scale kept), the attention fields stay as they were: no config can describe the
kept scale, so a rebuild from the config must fail on the shapes rather than compute something else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_COUNT = ("num_attention_heads", "num_heads", "n_head", "n_heads", "heads")
KV_COUNT = ("num_key_value_heads", "num_kv_heads", "kv_heads")
HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
INNER = ("all_head_size", "split_size", "inner_dim")


@dataclass(frozen=True)
class Rows:
    """`length` rows of a projection, from `start` along `dim` of tensor `name`."""

    name: str
    dim: int
    start: int
    length: int


@dataclass(frozen=True)
class Projections:
    q: Rows
    k: Rows
    v: Rows
    hidden: tuple[str, int]  # the q projection's input dim: (tensor name, dim)
    head_first: bool = False  # packed as [heads, (q, k, v), head dim] (timm MaxViT), not [(q, k, v), heads, dim]


Update = tuple[Any, str, Any]  # (object, attribute, new value)


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 `Conv1D`: a Linear storing its weight as [in, out] (attributes nf, nx)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def conv1d_attributes(m: nn.Module, weight: torch.Tensor | None) -> dict[str, int]:
    """New `nx`/`nf` of a GPT-2 `Conv1D` from its new weight ([nx, nf]); {} for any other module."""
    if weight is None or not _is_conv1d(m):
        return {}
    return {"nx": weight.shape[0], "nf": weight.shape[1]}


def _q(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear_rows(prefix: str, m: nn.Module) -> tuple[Rows, tuple[str, int]] | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if _is_conv1d(m):
        return Rows(_q(prefix, "weight"), 1, 0, w.shape[1]), (_q(prefix, "weight"), 0)
    if isinstance(m, nn.Linear):
        return Rows(_q(prefix, "weight"), 0, 0, w.shape[0]), (_q(prefix, "weight"), 1)
    return None


# the child names projections / grouped_rows / latent_rows look for: a module with none of them (and not
# an nn.MultiheadAttention) is no attention layer they know, found without their attribute lookups
_PROJECTION_CHILDREN = frozenset({
    "q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v", "kv", "query_proj", "key_proj",
    "value_proj", "wq", "wk", "wv", "to_q", "to_k", "to_v", "c_attn", "query_key_value", "qkv_proj", "qkv",
    "to_qkv", "q_b_proj", "kv_b_proj"})


def _may_be_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or not _PROJECTION_CHILDREN.isdisjoint(m._modules)


def projections(name: str, m: nn.Module) -> Projections | None:
    """Where an attention module's q, k and v rows are, or None if it is not one we know."""
    if isinstance(m, nn.MultiheadAttention):
        if m.in_proj_weight is not None:
            e = m.in_proj_weight.shape[0] // 3
            w = _q(name, "in_proj_weight")
            return Projections(Rows(w, 0, 0, e), Rows(w, 0, e, e), Rows(w, 0, 2 * e, e), (w, 1))
        rows = [Rows(_q(name, f"{x}_proj_weight"), 0, 0, getattr(m, f"{x}_proj_weight").shape[0]) for x in "qkv"]
        return Projections(*rows, (_q(name, "q_proj_weight"), 1))
    children = dict(m.named_children())
    for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"),
                  ("query_proj", "key_proj", "value_proj"), ("wq", "wk", "wv"),
                  ("to_q", "to_k", "to_v")):  # wq: CrossViT; to_*: diffusers
        if all(n in children for n in names):
            found = [_linear_rows(_q(name, n), children[n]) for n in names]
            if all(f is not None for f in found):
                return Projections(found[0][0], found[1][0], found[2][0], found[0][1])
    if "q" in children and "kv" in children and "k" not in children:
        # PVT-v2 / Twins / VOLO: q alone, then k and v packed as kv.reshape(B, N, 2, heads, head_dim)
        q, kv = _linear_rows(_q(name, "q"), children["q"]), _linear_rows(_q(name, "kv"), children["kv"])
        if q is not None and kv is not None and kv[0].length % 2 == 0:
            r, e = kv[0], kv[0].length // 2
            return Projections(q[0], Rows(r.name, r.dim, 0, e), Rows(r.name, r.dim, e, e), q[1])
    packed = children.get("c_attn") if "q_attn" not in children else None
    kv = _int_attr(m, ("kv_dim",))
    if packed is not None and kv is not None:
        # multi-query (GPT-BigCode): c_attn holds q, then one k and one v of kv_dim rows each
        found = _linear_rows(_q(name, "c_attn"), packed)
        if found is not None and found[0].length > 2 * kv:
            r, hidden = found
            qn = r.length - 2 * kv
            return Projections(Rows(r.name, r.dim, 0, qn), Rows(r.name, r.dim, qn, kv),
                               Rows(r.name, r.dim, qn + kv, kv), hidden)
    fused = children.get("query_key_value")
    d, h = _int_attr(m, ("head_dim",)), _int_attr(m, ("num_heads",))
    if fused is not None and getattr(m, "multi_query", False) is True and not getattr(m, "new_decoder_architecture", False) \
            and d is not None and h is not None:
        # Falcon multi-query: query_key_value holds the query heads, then one key and one value head
        found = _linear_rows(_q(name, "query_key_value"), fused)
        if found is not None and found[0].length == (h + 2) * d:
            r, hidden = found
            return Projections(Rows(r.name, r.dim, 0, h * d), Rows(r.name, r.dim, h * d, d),
                               Rows(r.name, r.dim, (h + 1) * d, d), hidden)
    fused, kvh, d = children.get("qkv_proj"), _int_attr(m, KV_COUNT), _int_attr(m, HEAD_DIM)
    if fused is not None and kvh is not None and d is not None:
        # Phi-3: qkv_proj holds the query heads, then the key heads, then the value heads
        found = _linear_rows(_q(name, "qkv_proj"), fused)
        if found is not None and found[0].length > 2 * kvh * d:
            r, hidden = found
            qn, kv = r.length - 2 * kvh * d, kvh * d
            return Projections(Rows(r.name, r.dim, 0, qn), Rows(r.name, r.dim, qn, kv),
                               Rows(r.name, r.dim, qn + kv, kv), hidden)
    key = "c_attn" if packed is not None else "qkv" if "qkv" in children else "to_qkv"  # to_qkv: torchvision MaxViT
    packed = packed if packed is not None else children.get(key)
    if packed is not None:
        found = _linear_rows(_q(name, key), packed)
        if found is not None and found[0].length % 3 == 0:
            r, hidden = found
            e = r.length // 3
            return Projections(*(Rows(r.name, r.dim, i * e, e) for i in range(3)), hidden,
                               head_first=getattr(m, "head_first", False) is True)
    return None


def grouped_rows(name: str, m: nn.Module) -> tuple[Rows, tuple[str, int], int, int] | None:
    """(rows, hidden, key/value heads, head dim) of a fused projection laid out per key/value group as
    [that group's query heads, its key head, its value head] (Falcon's new decoder architecture), or None."""
    fused = dict(m.named_children()).get("query_key_value")
    kvh, d = _int_attr(m, ("num_kv_heads",)), _int_attr(m, ("head_dim",))
    if fused is not None and not getattr(m, "new_decoder_architecture", False) and not getattr(m, "multi_query", False) \
            and kvh is None and d is not None and _int_attr(m, ("num_heads",)) is not None:
        # Bloom (and Falcon's old architecture without multi-query): [query, key, value] per head, a group
        # of one query head per key/value head
        kvh = _int_attr(m, ("num_heads",))
        found = _linear_rows(_q(name, "query_key_value"), fused)
        if found is None or found[0].length != 3 * kvh * d:
            return None
        return found[0], found[1], kvh, d
    if fused is None or getattr(m, "new_decoder_architecture", False) is not True or kvh is None or d is None:
        return None
    found = _linear_rows(_q(name, "query_key_value"), fused)
    if found is None or found[0].length % (kvh * d) or found[0].length // (kvh * d) < 3:
        return None
    return found[0], found[1], kvh, d


def _grouped_shape(mname: str, found, tensors, cuts) -> tuple[Shape, Shape]:
    """(before, after) of a per-group fused layout: whole key/value groups go, or the same count of query
    heads from every group (the key/value heads stay)."""
    rows, hidden, kvh, d = found
    per = rows.length // (kvh * d)  # query heads per group + 2
    removed = _removed(rows, cuts).view(kvh, per, d)
    heads = removed.sum(-1)
    if not bool(((heads == 0) | (heads == d)).all()):
        raise ValueError(f"{mname}: the cut removes part of a head of the per-group query/key/value layout; "
                         "prune whole heads (head_pruning='heads')")
    gone = heads == d
    kv_gone = gone[:, -2]
    q_gone = gone[:, :-2].sum(1)
    kept = ~kv_gone
    if not torch.equal(gone[:, -1], kv_gone) or not bool(gone[kv_gone].all()) or \
            (kept.any() and not bool((q_gone[kept] == q_gone[kept][0]).all())):
        raise ValueError(f"{mname}: the cut removes {gone.int().tolist()} (per key/value group: query heads, key, "
                         "value); whole groups or the same count of query heads from every group must go")
    before = Shape(kvh * (per - 2), kvh, d, tensors[hidden[0]].shape[hidden[1]])
    kv_after = int(kept.sum())
    rep_after = per - 2 - (int(q_gone[kept][0]) if kept.any() else 0)
    return before, Shape(kv_after * rep_after, kv_after, d, _kept(hidden[0], hidden[1], tensors, cuts))


def latent_rows(name: str, m: nn.Module) -> tuple[Rows, Rows, tuple[str, int], int, int, int] | None:
    """(query rows, key/value up-projection rows, hidden, heads, query/key head dim, key+value dims per
    head) of a multi-head latent attention module (DeepSeek-V2/V3: `q_b_proj` or `q_proj`, and
    `kv_b_proj` carrying the heads out of the compressed latent), or None."""
    children = dict(m.named_children())
    q, kv = children.get("q_b_proj") or children.get("q_proj"), children.get("kv_b_proj")
    h, qk = _int_attr(m, HEAD_COUNT), _int_attr(m, ("qk_head_dim",))
    nope, vd = _int_attr(m, ("qk_nope_head_dim",)), _int_attr(m, ("v_head_dim",))
    if not isinstance(q, nn.Linear) or not isinstance(kv, nn.Linear) or None in (h, qk, nope, vd):
        return None
    if q.out_features != h * qk or kv.out_features != h * (nope + vd):
        return None
    qn = _q(name, "q_b_proj" if "q_b_proj" in children else "q_proj")
    a = children.get("kv_a_proj_with_mqa")
    hidden = (_q(name, "kv_a_proj_with_mqa.weight"), 1) if isinstance(a, nn.Linear) else (_q(qn, "weight"), 1)
    return (Rows(_q(qn, "weight"), 0, 0, q.out_features), Rows(_q(name, "kv_b_proj.weight"), 0, 0, kv.out_features),
            hidden, h, qk, nope + vd)


def _latent_shape(mname: str, found, tensors, cuts) -> tuple[Shape, Shape]:
    """(before, after) of a latent attention module: heads go whole from both up projections."""
    q, kv, hidden, h, qk, per = found
    qw, qr = _head_cut(mname, "query", _removed(q, cuts), qk)
    kw, kr = _head_cut(mname, "key/value", _removed(kv, cuts), per)
    if qr or kr or not torch.equal(qw, kw):
        raise ValueError(f"{mname}: the cut removes query heads {qw.nonzero().flatten().tolist()} and key/value "
                         f"heads {kw.nonzero().flatten().tolist()} of a latent attention layer; whole heads must "
                         "go from both up projections (head_pruning='heads')")
    n = h - int(qw.sum())
    return (Shape(h, h, qk, tensors[hidden[0]].shape[hidden[1]]),
            Shape(n, n, qk, _kept(hidden[0], hidden[1], tensors, cuts)))


def _int_attr(m: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _removed(rows: Rows, cuts: Mapping[tuple[str, int], Any]) -> torch.Tensor:
    cut = cuts.get((rows.name, rows.dim))
    if cut is None:
        return torch.zeros(rows.length, dtype=torch.bool)
    if cut.blocks != 1:
        raise ValueError(f"{rows.name}: attention rows cut per block; the plan does not fit this attention layer")
    return cut.removed[0, rows.start : rows.start + rows.length]


def _kept(name: str, dim: int, tensors: Mapping[str, torch.Tensor], cuts) -> int:
    cut = cuts.get((name, dim))
    n = tensors[name].shape[dim]
    return n - (int(cut.removed[0].sum()) if cut is not None and cut.blocks == 1 else 0)


@dataclass
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int


def _head_cut(mname: str, what: str, removed: torch.Tensor, d: int) -> tuple[torch.Tensor, int]:
    """Per head: removed whole (bool [heads]) and the rows removed from every head (0 if whole heads go)."""
    if removed.numel() % d:
        raise ValueError(f"{mname}: {what} has {removed.numel()} rows, not a multiple of the head dim {d}")
    per = removed.view(-1, d).sum(1)
    whole = per == d
    if not per.any():
        return whole, 0
    if bool(((per == 0) | whole).all()):
        return whole, 0
    if bool((per == per[0]).all()):
        return whole, int(per[0])
    raise ValueError(
        f"{mname}: the cut removes {per.tolist()} {what} rows per head; an attention layer needs whole heads "
        "removed or the same dims removed from every head (find the groups again with find_groups)"
    )


def new_shape(mname: str, m: nn.Module, p: Projections, tensors, cuts,
              heads: int | None = None) -> tuple[Shape, Shape] | None:
    """(before, after) head counts, head dim and hidden size of one attention module, or None if unknown.
    `heads`: the head count where the module keeps it under another name (see _unnamed_head_count)."""
    q_rows, k_rows = p.q.length, p.k.length
    d = _int_attr(m, HEAD_DIM)
    if d is None:
        h = _int_attr(m, HEAD_COUNT) or heads
        if h is None or q_rows % h:
            return None
        d = q_rows // h
    if q_rows % d or k_rows % d or p.v.length != k_rows:
        return None
    hidden = tensors[p.hidden[0]].shape[p.hidden[1]]
    before = Shape(q_rows // d, k_rows // d, d, hidden)
    if before.kv_heads == 0 or before.heads % before.kv_heads:
        return None
    rep = before.heads // before.kv_heads
    removed = [_removed(p.q, cuts), _removed(p.k, cuts), _removed(p.v, cuts)]
    if p.head_first:  # the packed rows are [heads, (q, k, v), d]: regroup them as q, k, v
        rows = torch.cat(removed).view(before.heads, 3, d)
        removed = [rows[:, i].flatten() for i in range(3)]
    qw, qr = _head_cut(mname, "query", removed[0], d)
    kw, kr = _head_cut(mname, "key", removed[1], d)
    vw, vr = _head_cut(mname, "value", removed[2], d)
    if not (qr == kr == vr):
        raise ValueError(f"{mname}: query, key and value lose different dims per head ({qr}, {kr}, {vr})")
    # query heads removed under kept key/value heads (multi-query): the same count from every group
    query_only = not kw.any() and not vw.any() and qr == 0 and bool(
        (qw.view(before.kv_heads, rep).sum(1) == qw.view(before.kv_heads, rep).sum(1)[0]).all())
    if not query_only and (not torch.equal(kw, vw) or not torch.equal(qw, kw.repeat_interleave(rep))):
        raise ValueError(
            f"{mname}: the cut removes query heads {qw.nonzero().flatten().tolist()} and key/value heads "
            f"{kw.nonzero().flatten().tolist()}; with {rep} query heads per key/value head they must go together"
        )
    after = Shape(
        before.heads - int(qw.sum()),
        before.kv_heads - int(kw.sum()),
        d - qr,
        _kept(p.hidden[0], p.hidden[1], tensors, cuts),
    )
    return before, after


# ------------------------------------------------------------------------------ nn.MultiheadAttention


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An `nn.MultiheadAttention` whose attention width (heads x head dim) may differ from its embed dim.

    Same parameters, buffers and state-dict keys; `inner_dim` is the attention width and `scaling` the
    softmax scale kept from before pruning. `_qkv_same_embed_dim` is False so that
    `nn.TransformerEncoderLayer` does not take its fused fast path, which assumes the unpruned layout.
    """

    inner_dim: int
    scaling: float

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        same = query is key and key is value
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, T, _ = query.shape
        n = self.inner_dim
        if self.in_proj_weight is not None and same:
            # one packed projection, as torch does for self-attention (find_groups follows this layout)
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, n)).unbind(-2)
        else:
            if self.in_proj_weight is not None:
                wq, wk, wv = self.in_proj_weight.split(n)
            else:
                wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            bq = bk = bv = None
            if self.in_proj_bias is not None:
                bq, bk, bv = self.in_proj_bias.split(n)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, 1, n).expand(B, 1, n)], 1)
            v = torch.cat([v, self.bias_v.view(1, 1, n).expand(B, 1, n)], 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, 1, n)], 1)
            v = torch.cat([v, v.new_zeros(B, 1, n)], 1)
        S = k.shape[1]
        H, d = self.num_heads, self.head_dim
        q, k, v = (t.reshape(B, -1, H, d).transpose(1, 2) for t in (q, k, v))
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # as torch does: the mask is only a hint, SDPA's is_causal does the masking
        mask = self._mask(attn_mask, key_padding_mask, B, T, S, q.dtype, is_causal)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.scaling
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, p, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scaling)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, n))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, B, T, S, dtype, is_causal):
        """MHA's masks (bool True = masked out, or additive floats) as one additive [B or 1, H or 1, T, S]."""

        def additive(m):
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is None and is_causal:  # top-left aligned, as SDPA's is_causal
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=self.out_proj.weight.device).triu(1)
        if attn_mask is not None:
            a = additive(attn_mask)
            a = a.view(1, 1, T, -1) if a.dim() == 2 else a.view(B, self.num_heads, T, -1)
            mask = F.pad(a, (0, S - a.shape[-1]))
        if key_padding_mask is not None:
            kp = F.pad(additive(key_padding_mask).view(B, 1, 1, -1), (0, S - key_padding_mask.shape[-1]))
            mask = kp if mask is None else mask + kp
        return mask


def _mha_updates(m: nn.MultiheadAttention, after: Shape) -> list[Update]:
    inner = after.heads * after.head_dim
    ups: list[Update] = [(m, "num_heads", after.heads), (m, "head_dim", after.head_dim),
                         (m, "embed_dim", after.hidden)]
    if m.in_proj_weight is not None:
        ups += [(m, "kdim", after.hidden), (m, "vdim", after.hidden)]
    changed = isinstance(m, PrunedMultiheadAttention) or inner != after.hidden or after.head_dim != m.head_dim
    if changed:
        scaling = getattr(m, "scaling", None) or 1.0 / math.sqrt(m.head_dim)
        ups += [(m, "inner_dim", inner), (m, "scaling", scaling), (m, "_qkv_same_embed_dim", False)]
        if not isinstance(m, PrunedMultiheadAttention):
            ups.append((m, "__class__", PrunedMultiheadAttention))
    return ups


# ------------------------------------------------------------------------------ Hugging Face modules


def _hf_updates(m: nn.Module, after: Shape) -> list[Update]:
    ups: list[Update] = []

    def put(names: tuple[str, ...], value: int) -> None:
        for n in names:
            if _int_attr(m, (n,)) is not None:
                ups.append((m, n, value))

    put(HEAD_COUNT, after.heads)
    put(KV_COUNT, after.kv_heads)
    put(("num_key_value_groups",), after.heads // after.kv_heads)
    put(HEAD_DIM, after.head_dim)
    put(INNER, after.heads * after.head_dim)
    put(("kv_dim",), after.kv_heads * after.head_dim)
    if _int_attr(m, ("embed_dim",)) is not None:
        # GPT-2 keeps the hidden size in embed_dim (the attention width is split_size); CLIP-style
        # modules and GPT-BigCode (which splits c_attn's output by embed_dim) mean the attention width
        gpt2 = hasattr(m, "split_size") and not hasattr(m, "kv_dim")
        ups.append((m, "embed_dim", after.hidden if gpt2 else after.heads * after.head_dim))
    return ups


def _unnamed_head_count(name: str, m: nn.Module, p: Projections, cuts) -> str | None:
    """The attribute holding the head count of a module that keeps it under a name not in HEAD_COUNT
    (`nh`, `h`) and stores no head dim either, where the cut removes whole heads; None where none do.

    Its forward then reads the count from that attribute (`view(B, T, self.heads, -1)`): left alone, the
    module would split its fewer rows into the old number of narrower heads and compute something else
    without any error. Candidates are the integer attributes its code reads that split the query rows
    into heads the cut removes whole; with several, the cut is refused (ValueError: prune leaves those
    heads out, naming the module)."""
    if _int_attr(m, HEAD_COUNT + HEAD_DIM) is not None:
        return None
    removed = _removed(p.q, cuts)
    cut = cuts.get((p.q.name, p.q.dim))
    if not removed.any() or cut is None or not cut.units:
        return None
    from .module_attrs import reads

    found = []  # the head dims of the groups that cut these rows say how many heads the rows hold
    for k, v in vars(m).items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 2 or p.q.length % v or not reads(m, k):
            continue
        heads = removed.view(v, -1)
        if p.q.length // v in cut.units and bool((heads.all(1) | ~heads.any(1)).all()):  # heads kept or gone whole
            found.append(k)
    if len(found) <= 1:
        return found[0] if found else None
    raise ValueError(
        f"attention module {name!r} ({type(m).__name__}): the cut removes whole heads, but its head count is "
        f"not stored under a known name ({', '.join(HEAD_COUNT)}) nor its head dim ({', '.join(HEAD_DIM)}), and "
        f"several attributes could be it ({', '.join(found)}); rename the attribute, put the module in "
        "ignored_layers, or prune with head_pruning='dims'"
    )


_MLP_FIRST = ("up_proj", "fc1", "c_fc", "dense", "w1", "wi", "wi_0")


def _mlp_size(m: nn.Module, tensors, cuts, prefix: str) -> tuple[int, int] | None:
    """(before, after) intermediate size of a module that stores `intermediate_size`, from its first Linear."""
    children = dict(m.named_children())
    for n in _MLP_FIRST:
        c = children.get(n)
        found = _linear_rows(_q(prefix, n), c) if c is not None else None
        if found is not None:
            r = found[0]
            return r.length, _kept(r.name, r.dim, tensors, cuts)
    return None


def _intermediate_sizes(model: nn.Module, tensors, cuts) -> list[tuple[int, int]]:
    """(before, after) intermediate size of every MLP we recognise (Llama, ViT, BERT, GPT-2 layouts)."""
    out = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        children = dict(m.named_children())
        if ("gate_proj" in children and "up_proj" in children) or "MLP" in cls or cls.endswith("Intermediate") \
                or cls.endswith("ActDense"):  # T5's DenseActDense / DenseGatedActDense
            s = _mlp_size(m, tensors, cuts, name)
            if s is not None:
                out.append(s)
    return out


def _uniform(values: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The one (before, after) pair if all agree on both, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


def _config_updates(model: nn.Module, shapes: list[tuple[Shape, Shape]], mlps, expert_sizes) -> list[Update]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    ups: list[Update] = []

    def put(name: str, before: int, after: int) -> None:
        if before != after and getattr(config, name, None) in (before, None) and hasattr(config, name):
            ups.append((config, name, after))

    if any(a.head_dim != b.head_dim for b, a in shapes):
        # head dims pruned, softmax scale kept: a config saying the new head dim (or hidden / heads giving
        # it) would rebuild the model with another scale, silently, from a plain save_pretrained. Leave the
        # attention fields as they were, so that rebuilding from this config fails on the shapes instead
        # (tritonprune.save_pretrained / from_pretrained reload such models exactly).
        shapes = []
    hidden = _uniform([(b.hidden, a.hidden) for b, a in shapes])
    if hidden is not None:
        put("hidden_size", *hidden)
    heads = _uniform([(b.heads, a.heads) for b, a in shapes])
    if heads is not None:
        put("num_attention_heads", *heads)
    kv = _uniform([(b.kv_heads, a.kv_heads) for b, a in shapes])
    if kv is not None:
        put("num_key_value_heads", *kv)
    dims = _uniform([(b.head_dim, a.head_dim) for b, a in shapes])
    if dims is not None:
        if getattr(config, "head_dim", None) is not None:
            put("head_dim", *dims)
        elif hidden is not None and heads is not None and dims[1] != hidden[1] // heads[1]:
            # ViT reads getattr(config, "head_dim", hidden // heads): say it where that is no longer right
            ups.append((config, "head_dim", dims[1]))
    inter = _uniform(mlps)
    if inter is not None:
        names = [n for n in ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "shared_expert_intermediate_size")
                 if hasattr(config, n)]
        # the field holding this size; GPT-2's n_inner=None means 4 * hidden: set it too
        match = [n for n in names if getattr(config, n) == inter[0]] or [n for n in names if getattr(config, n) is None]
        if match:
            put(match[0], *inter)
    experts = _uniform(expert_sizes)
    if experts is not None:
        for name in ("moe_intermediate_size", "intermediate_size"):
            if getattr(config, name, None) == experts[0]:
                put(name, *experts)
                break
    return ups


def attention_updates(model: nn.Module, tensors: Mapping[str, torch.Tensor], cuts) -> list[Update]:
    """Every attribute to set after `cuts` are applied; raises ValueError (touching nothing) if a cut
    leaves an attention layer unable to split its q/k/v rows into heads."""
    ups: list[Update] = []
    shapes: list[tuple[Shape, Shape]] = []
    own: list[tuple[nn.Module, Shape]] = []  # modules whose forward reads head counts from the config
    attention: set[int] = set()  # the attention modules found (ids)
    for name, m in model.named_modules():
        if not _may_be_attention(m):
            continue
        p = projections(name, m)
        grouped = grouped_rows(name, m) if p is None else None
        latent = latent_rows(name, m) if p is None and grouped is None else None
        if p is None and grouped is None and latent is None:
            continue
        attention.add(id(m))
        if p is not None:
            s = new_shape(name, m, p, tensors, cuts)
        else:
            s = _grouped_shape(name, grouped, tensors, cuts) if grouped else _latent_shape(name, latent, tensors, cuts)
        unnamed = None
        if s is None:
            unnamed = _unnamed_head_count(name, m, p, cuts)
            s = new_shape(name, m, p, tensors, cuts, heads=getattr(m, unnamed)) if unnamed else None
        if s is None:
            continue
        shapes.append(s)
        before, after = s
        if before == after:
            continue
        if isinstance(m, nn.MultiheadAttention):
            ups += _mha_updates(m, after)
        else:
            ups += _hf_updates(m, after)
            if grouped is not None and not getattr(m, "new_decoder_architecture", False) \
                    and _int_attr(m, ("hidden_size",)) == before.heads * before.head_dim:
                # Bloom's attention keeps its width as hidden_size (read to split the output projection)
                ups.append((m, "hidden_size", after.heads * after.head_dim))
            if _reads_config_counts(m):
                own.append((m, after))
            if unnamed is not None and before.heads != after.heads:
                ups.append((m, unnamed, after.heads))
    hidden = _uniform([(b.hidden, a.hidden) for b, a in shapes])
    mlps = _intermediate_sizes(model, tensors, cuts)
    for name, m in model.named_modules():
        if id(m) in attention or isinstance(m, nn.MultiheadAttention):
            continue
        own_attrs = vars(m)  # the sizes below are plain attributes set in __init__ (no Module.__getattr__)
        # modules that store the hidden size (LlamaMLP, LlamaDecoderLayer, GPT2Model.embed_dim)
        if hidden is not None and hidden[0] != hidden[1]:
            for attr in ("hidden_size", "embed_dim"):
                if attr in own_attrs and _int_attr(m, (attr,)) == hidden[0]:
                    ups.append((m, attr, hidden[1]))
        if "intermediate_size" in own_attrs and _int_attr(m, ("intermediate_size",)) is not None:
            s = _mlp_size(m, tensors, cuts, name)
            if s is not None and s[0] != s[1] and m.intermediate_size == s[0]:
                ups.append((m, "intermediate_size", s[1]))
    from ..graph.experts import expert_modules, intermediate_updates

    new_shapes = {}
    for (tname, dim), cut in cuts.items():
        if tname.endswith(".down_proj") and tname in tensors and cut.removed.any():
            shape = list(tensors[tname].shape)
            shape[dim] -= int(cut.removed[0].sum())
            new_shapes[tname] = torch.Size(shape)
    experts = intermediate_updates(model, new_shapes)
    sizes = [(int(tensors[f"{n}.down_proj"].shape[2]), int(new_shapes.get(f"{n}.down_proj", tensors[f"{n}.down_proj"].shape)[2]))
             for n in expert_modules(model)]
    config = _config_updates(model, shapes, mlps, sizes)
    return ups + experts + config + _layer_configs(own, config)


_COUNTS = {"num_attention_heads": "heads", "num_key_value_heads": "kv_heads"}


def _reads_config_counts(m: nn.Module) -> bool:
    """The forward of `m` reads a head count from its config (Phi-3: `self.config.num_attention_heads`)."""
    from .module_attrs import _class_source

    src = _class_source(type(m))
    return src is not None and re.search(r"config\.(num_attention_heads|num_key_value_heads)\b", src) is not None


def _layer_configs(own: list[tuple[nn.Module, Shape]], config_updates: list[Update]) -> list[Update]:
    """A `LayerConfig` for each module that reads its head counts from the shared config where pruning
    left it with other counts than that config says (layers pruned unevenly)."""
    ups: list[Update] = []
    for m, after in own:
        config = getattr(m, "config", None)
        if config is None:
            continue
        base = config.__dict__["_base"] if isinstance(config, LayerConfig) else config
        new = {a: v for obj, a, v in config_updates if obj is base}
        counts = {k: getattr(after, f) for k, f in _COUNTS.items() if isinstance(getattr(base, k, None), int)}
        if any(new.get(k, getattr(base, k)) != v for k, v in counts.items()) or isinstance(config, LayerConfig):
            ups.append((m, "config", LayerConfig(base, **counts)))
    return ups


class LayerConfig:
    """One layer's view of the model's config: its own head counts (what pruning left this layer with),
    everything else read from, and written to, the shared config (`_attn_implementation` included)."""

    def __init__(self, base: Any, **own: int):
        self.__dict__.update(_base=base, _own=dict(own))

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name.startswith("__") or "_base" not in d:  # copy/pickle probing an object not yet filled
            raise AttributeError(name)
        return d["_own"][name] if name in d["_own"] else getattr(d["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__["_own"]:
            self.__dict__["_own"][name] = value
        else:
            setattr(self.__dict__["_base"], name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({self.__dict__['_own']}, base={type(self.__dict__['_base']).__name__})"


def commit(updates: list[Update]) -> None:
    for obj, attr, value in updates:
        setattr(obj, attr, value)
