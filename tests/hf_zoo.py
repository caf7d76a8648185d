"""Hugging Face models from tiny configs (no downloads) for the HF tests and the coverage sweep.

`build(name)` returns (model in eval mode, example inputs as a dict, kind); kind is "causal",
"seq2seq", "cls" (sequence/image classification with integer labels) or "base" (no head, no loss).
The same weights on every call. transformers imports torchvision when present: on the CPU torch build
that import fails unless its fake-kernel module is stubbed (tests/tv.py), so it is stubbed here too, for
the sweep script run outside pytest.
"""

from __future__ import annotations

import functools
import warnings

import torch
import tv  # noqa: E402

tv.install_stub()
import transformers as T  # noqa: E402


def quiet(fn):
    """`fn` with its warnings silenced (tracing and pruning these models warns about the ops left out)."""

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*a, **k)

    return wrapped


V = 100
TEXT = dict(vocab_size=V, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
DEC = dict(TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           use_cache=False, tie_word_embeddings=False)


def _ids(n: int = 8) -> torch.Tensor:
    return torch.randint(1, V, (2, n))


def _causal(cls, config):
    return cls(config), {"input_ids": _ids()}, "causal"


def _enc(cls, config):
    return cls(config), {"input_ids": _ids()}, "cls"


def _image(cls, config, size=16):
    return cls(config), {"pixel_values": torch.randn(2, 3, size, size)}, "cls"


BUILDERS = {
    "llama": lambda: _causal(T.LlamaForCausalLM, T.LlamaConfig(**DEC, num_key_value_heads=2)),
    "mistral": lambda: _causal(T.MistralForCausalLM, T.MistralConfig(**DEC, num_key_value_heads=2, sliding_window=None)),
    "qwen2": lambda: _causal(T.Qwen2ForCausalLM, T.Qwen2Config(**DEC, num_key_value_heads=2)),
    "qwen3": lambda: _causal(T.Qwen3ForCausalLM, T.Qwen3Config(**DEC, num_key_value_heads=2, head_dim=8)),
    "gemma": lambda: _causal(T.GemmaForCausalLM, T.GemmaConfig(**DEC, num_key_value_heads=2, head_dim=8)),
    "phi": lambda: _causal(T.PhiForCausalLM, T.PhiConfig(**DEC, partial_rotary_factor=0.5)),
    "phi3": lambda: _causal(T.Phi3ForCausalLM, T.Phi3Config(**DEC, num_key_value_heads=2)),
    "gpt2": lambda: _causal(T.GPT2LMHeadModel, T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                            n_positions=32, use_cache=False, bos_token_id=0,
                                                            eos_token_id=0)),
    "gpt_bigcode": lambda: _causal(T.GPTBigCodeForCausalLM, T.GPTBigCodeConfig(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, multi_query=True, use_cache=False,
        bos_token_id=0, eos_token_id=0)),
    "gpt_neox": lambda: _causal(T.GPTNeoXForCausalLM, T.GPTNeoXConfig(**DEC, rotary_pct=0.5)),
    "falcon": lambda: _causal(T.FalconForCausalLM, T.FalconConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, use_cache=False,
        bos_token_id=0, eos_token_id=0)),
    "falcon_new": lambda: _causal(T.FalconForCausalLM, T.FalconConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, use_cache=False, bos_token_id=0, eos_token_id=0)),
    "mixtral": lambda: _causal(T.MixtralForCausalLM, T.MixtralConfig(**DEC, num_key_value_heads=2,
                                                                      num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: _causal(T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
        **DEC, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32)),
    "opt": lambda: _causal(T.OPTForCausalLM, T.OPTConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=32, word_embed_proj_dim=32, use_cache=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=1)),
    "t5": lambda: (T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        use_cache=False, pad_token_id=0, eos_token_id=1)),
        {"input_ids": _ids(), "decoder_input_ids": _ids(5)}, "seq2seq"),
    "bert": lambda: _enc(T.BertForSequenceClassification, T.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32)),
    "roberta": lambda: _enc(T.RobertaForSequenceClassification, T.RobertaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=1)),
    "vit": lambda: _image(T.ViTForImageClassification, T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3)),
    "deit": lambda: _image(T.DeiTForImageClassification, T.DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3)),
    "swin": lambda: _image(T.SwinForImageClassification, T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
        num_labels=3), size=32),
    "clip_text": lambda: (T.CLIPTextModel(T.CLIPTextConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32)), {"input_ids": _ids()}, "base"),
    "clip_vision": lambda: (T.CLIPVisionModel(T.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4)), {"pixel_values": torch.randn(2, 3, 16, 16)}, "base"),
    "whisper": lambda: (T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16, decoder_start_token_id=0, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, use_cache=False)),
        {"input_features": torch.randn(2, 8, 16), "decoder_input_ids": _ids(5)}, "seq2seq"),
    "gemma_mqa": lambda: _causal(T.GemmaForCausalLM, T.GemmaConfig(**DEC, num_key_value_heads=1, head_dim=8)),
    "gemma2": lambda: _causal(T.Gemma2ForCausalLM, T.Gemma2Config(**DEC, num_key_value_heads=2, head_dim=8,
                                                                  sliding_window=4)),
    "stablelm": lambda: _causal(T.StableLmForCausalLM, T.StableLmConfig(**DEC, num_key_value_heads=2)),
    "gptj": lambda: _causal(T.GPTJForCausalLM, T.GPTJConfig(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, rotary_dim=4, use_cache=False,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)),
    "bloom": lambda: _causal(T.BloomForCausalLM, T.BloomConfig(
        vocab_size=V, hidden_size=32, n_layer=2, n_head=4, use_cache=False, bos_token_id=0, eos_token_id=0)),
    "deberta_v2": lambda: _enc(T.DebertaV2ForSequenceClassification, T.DebertaV2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"])),
    "beit": lambda: _image(T.BeitForImageClassification, T.BeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3, use_relative_position_bias=True)),
    "mobilevit": lambda: _image(T.MobileViTForImageClassification, T.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2, num_labels=3), size=32),
    "siglip_vision": lambda: (T.SiglipVisionModel(T.SiglipVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4)), {"pixel_values": torch.randn(2, 3, 16, 16)}, "base"),
    "deepseek_v2": lambda: _causal(T.DeepseekV2ForCausalLM, T.DeepseekV2Config(
        **DEC, num_key_value_heads=4, q_lora_rank=20, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
        first_k_dense_replace=1)),
    "deepseek_v3": lambda: _causal(T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
        **DEC, num_key_value_heads=4, q_lora_rank=20, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
        first_k_dense_replace=1, n_group=1, topk_group=1)),
}
NAMES = list(BUILDERS)


def build(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, x, kind = BUILDERS[name]()
    torch.manual_seed(1)
    return m.eval(), x, kind


def labels_for(kind: str, m, x) -> dict:
    """Keyword arguments that make the model's own API return a loss."""
    if kind == "causal":
        return {"labels": x["input_ids"]}
    if kind == "seq2seq":
        return {"labels": x["decoder_input_ids"]}
    if kind == "cls":
        return {"labels": torch.tensor([0, 1])}
    return {}


def output(m, x) -> torch.Tensor:
    """The model's main output; with a pooled output too (CLIP, SigLIP's attention-pooling head), both
    flattened into one vector."""
    with torch.no_grad():
        y = m(**x)
    for k in ("logits", "last_hidden_state"):
        if getattr(y, k, None) is not None:
            pooled = getattr(y, "pooler_output", None)
            return getattr(y, k) if pooled is None else torch.cat([getattr(y, k).flatten(), pooled.flatten()])
    return y[0]
