"""GroupNorm regularization time per step on a ViT-B-size transformer on CPU (Hugging Face ViTConfig
defaults: hidden 768, 12 layers, 12 heads, MLP 3072, 224x224 images, patch 16: 86M parameters, built
from the config, no download).

Compared in the same run: tritonprune's torch backend (`Regularization.apply_to_grads`, what
`RegularizedOptimizer.step()` adds), Torch-Pruning 1.6.1's `GroupNormPruner.regularize` (built with
`num_heads` for the attention projections, as its HF ViT example does), one
`torch._foreach_add_(grads, weights)` pass (the memory floor: read w and g, write g) and an SGD
(momentum) step. Medians and interquartile ranges in ms; JSON to bench/results/cpu_transformers.json.

    python -m pytest bench/bench_transformers.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from pathlib import Path

import pytest
import torch
from timing import iqr, times

import tritonprune as tpr
from tritonprune.regularizing.engine import Regularization

transformers = pytest.importorskip("transformers")
tp = pytest.importorskip("torch_pruning")

RESULTS = Path(__file__).parent / "results" / "cpu_transformers.json"
ROUNDS, TP_ROUNDS = 15, 3
_SETUP: dict = {}


def setup(head_pruning: str):
    if head_pruning not in _SETUP:
        torch.manual_seed(0)
        config = transformers.ViTConfig(num_labels=1000)  # ViT-B/16 defaults
        model = transformers.ViTForImageClassification(config).train()
        x = torch.randn(1, 3, config.image_size, config.image_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            groups = tpr.find_groups(model, (x,), head_pruning=head_pruning)
            find_s = time.perf_counter() - t
        model(pixel_values=x).logits.sum().backward()
        _SETUP[head_pruning] = (model, x, groups, find_s)
    return _SETUP[head_pruning]


def tp_pruner(model, x):
    num_heads = {}
    for m in model.modules():
        if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj")):
            for n in ("q_proj", "k_proj", "v_proj"):
                num_heads[getattr(m, n)] = m.num_attention_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pruner.GroupNormPruner(model, [x], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                         reg=1e-4, ignored_layers=[model.classifier], num_heads=num_heads)


def _save(key: str, info: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = info
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("head_pruning", ["heads", "dims"])
def test_vit_b_group_norm(benchmark, head_pruning):
    model, x, groups, find_s = setup(head_pruning)
    params = [p for p in model.parameters() if p.grad is not None]
    grads, weights = [p.grad for p in params], [p.detach() for p in params]
    saved = [g.clone() for g in grads]
    eng = Regularization(model, groups, tpr.GroupNorm(1e-4), backend="torch")
    sgd = torch.optim.SGD(params, lr=1e-12, momentum=0.9)

    with torch.no_grad():
        ours = times(eng.apply_to_grads, ROUNDS, warmup=2)
        floor = times(lambda: torch._foreach_add_(grads, weights), ROUNDS)
        sgd_t = times(sgd.step, ROUNDS)
    tp_t = None
    if head_pruning == "heads":  # TP's groups do not depend on our mode; time it once
        pruner = tp_pruner(model, x)  # traces with autograd: outside no_grad
        with torch.no_grad():
            tp_t = times(lambda: pruner.regularize(model), TP_ROUNDS)
    with torch.no_grad():
        benchmark.pedantic(eng.apply_to_grads, rounds=ROUNDS, warmup_rounds=1)
        for g, s in zip(grads, saved):
            g.copy_(s)

    med = statistics.median
    info = {
        "ours_ms": round(med(ours), 2), "ours_iqr_ms": round(iqr(ours), 2),
        "foreach_ms": round(med(floor), 2), "foreach_iqr_ms": round(iqr(floor), 2),
        "sgd_step_ms": round(med(sgd_t), 2),
        "x_foreach": round(med(ours) / med(floor), 2),
        "x_sgd_step": round(med(ours) / med(sgd_t), 2),
        "params_M": round(sum(p.numel() for p in params) / 1e6, 1), "groups": len(groups),
        "find_groups_s": round(find_s, 1), "threads": torch.get_num_threads(), "rounds": ROUNDS,
        "loadavg": os.getloadavg()[0],
    }
    if tp_t is not None:
        info.update({"tp_ms": round(med(tp_t), 1), "tp_iqr_ms": round(iqr(tp_t), 1),
                     "speedup_vs_tp": round(med(tp_t) / med(ours), 1), "tp_rounds": TP_ROUNDS})
    benchmark.extra_info.update(info)
    _save(f"vit_b16/group_norm/{head_pruning}", info)
    print(f"\nViT-B/16 group_norm ({head_pruning}): " + ", ".join(f"{k}={v}" for k, v in info.items()))
