"""TraceError says what to do for the failure framework users meet first (a half-precision model traced
with float32 example inputs); a Hugging Face decoder returning its KV cache traces as without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tritonprune as tpr
from tritonprune.integrations import inputs_like


def test_half_precision_model_with_float32_inputs_says_cast():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 3)).to(torch.bfloat16)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(tpr.TraceError, match=r"parameters are torch.bfloat16 but the floating example inputs are "
                                             r"torch.float32: pass example inputs of the model's dtype"):
        tpr.find_groups(model, x)
    cast = inputs_like({"x": x, "ids": torch.ones(2, dtype=torch.long)}, model)
    assert cast["x"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.long  # what the callbacks pass
    assert len(tpr.find_groups(model, cast["x"])) == 1


def test_other_failures_keep_the_generic_advice():
    with pytest.raises(tpr.TraceError, match="Check that example_inputs match what forward"):
        tpr.find_groups(nn.Linear(4, 3), torch.randn(2, 5))


def test_hf_decoder_with_cache_traces_as_without():
    # the forward runs for real: the returned DynamicCache is internal state, not an output whose channels
    # must stay, so the groups are those of use_cache=False
    from group_signatures import signatures
    from tv import torchvision

    torchvision()
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 32, (1, 5))
    with_cache = signatures(tpr.find_groups(model, {"input_ids": ids}))
    assert with_cache and with_cache == signatures(tpr.find_groups(model, {"input_ids": ids, "use_cache": False}))
