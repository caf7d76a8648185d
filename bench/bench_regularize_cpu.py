"""Regularization time per call on CPU: tritonprune's torch backend against Torch-Pruning's `regularize`
and against one `torch._foreach_add_(grads, weights)` pass (the memory floor: read w and g, write g).

Models: a ResNet-50-size CNN (Hugging Face `ResNetConfig(num_labels=1000)`, 25.6M parameters, built
locally, no download) and a wide MLP (Linear + BatchNorm1d, 22M parameters). Groups come from
`tpr.find_groups`; Torch-Pruning builds its own on the same model with the classifier ignored.
Targets (issue 3): >= 20x faster than Torch-Pruning, <= 2.5x the foreach pass.

    python -m pytest bench/bench_regularize_cpu.py --benchmark-only -s

The torch backend runs its matrix path through the C loops of kernels/cpu_native where they build (the
default) and is also timed on torch ops alone (`NATIVE = False`, the fallback without a C compiler).
The machine is shared, so ours, the fallback and the foreach pass are timed in alternation (A B C A B C
...) and each ratio is the median of the per-round ratios; every time has its interquartile range. Torch-Pruning
(~0.4 s a call) gets fewer rounds. The plain SGD (momentum) step is timed once per model for scale.
Results: bench/results/cpu_regularize.json (one entry per model and regularizer, plus the load average).
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
import torch.nn as nn
from timing import iqr, times

import tritonprune as tpr
from tritonprune.kernels import torch_impl
from tritonprune.regularizing.engine import Regularization
from tritonprune.regularizing.regularizers import BNScale, GroupLasso, GroupNorm

tp = pytest.importorskip("torch_pruning")
transformers = pytest.importorskip("transformers")

RESULTS = Path(__file__).parent / "results" / "cpu_regularize.json"
ROUNDS = int(os.environ.get("TRITONPRUNE_BENCH_ROUNDS", "21"))
TP_ROUNDS = int(os.environ.get("TRITONPRUNE_BENCH_TP_ROUNDS", "5"))


class _Logits(nn.Module):
    """The HF model returning a plain tensor (Torch-Pruning's tracer wants one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def resnet50() -> nn.Module:
    return _Logits(transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)))


def wide_mlp(width: int = 3072, depth: int = 3) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(1024, width), nn.BatchNorm1d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    layers.append(nn.Linear(width, 1000))
    return nn.Sequential(*layers)


MODELS = {  # builder, example input, classifier (ignored by Torch-Pruning, as its examples do)
    "resnet50": (resnet50, lambda: torch.randn(2, 3, 64, 64), "model.classifier.1"),
    "wide_mlp": (wide_mlp, lambda: torch.randn(4, 1024), "6"),
}
REGS = {"group_norm": lambda: GroupNorm(1e-4), "bn_scale": lambda: BNScale(1e-5), "group_lasso": lambda: GroupLasso(1e-5)}
_SETUPS: dict = {}


def setup(name: str):
    if name not in _SETUPS:
        torch.manual_seed(0)
        make, inputs, head = MODELS[name]
        model, x = make(), inputs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = tpr.find_groups(model, x)
        model(x).sum().backward()
        _SETUPS[name] = (model, x, groups, head, _sgd_step_ms(model))
    return _SETUPS[name]


def _sgd_step_ms(model: nn.Module) -> float:
    """One SGD (momentum) step on the model's current gradients, lr tiny so the weights barely move."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-12, momentum=0.9)
    return statistics.median(times(opt.step, 11, warmup=2))


def _alternating(fns, rounds: int) -> list[list[float]]:
    """Milliseconds of each of `fns`, called in turn every round."""
    for _ in range(2):
        for f in fns:
            f()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for f, ts in zip(fns, out):
            t0 = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t0) * 1e3)
    return out


def tp_pruner(model, x, head, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ign = [model.get_submodule(head)]
        if kind == "group_norm":
            return tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                             reg=1e-4, ignored_layers=ign)
        return tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(), reg=1e-5,
                                       ignored_layers=ign, group_lasso=(kind == "group_lasso"))


def _save(key: str, info: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = info
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("kind", list(REGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_regularize(benchmark, name, kind):
    model, x, groups, head, sgd_ms = setup(name)
    eng = Regularization(model, groups, REGS[kind](), backend="torch")
    eng.apply_to_grads()  # builds the plan (with the C loops where available)
    torch_impl.NATIVE = False
    try:
        ops = Regularization(model, groups, REGS[kind](), backend="torch")
        ops.apply_to_grads()  # the plan on torch ops alone
    finally:
        torch_impl.NATIVE = True
    native = bool(eng.buffers.cache["torch"].matrix.native)
    params = [p for p in model.parameters() if p.grad is not None]
    grads, weights = [p.grad for p in params], [p.detach() for p in params]
    saved = [g.clone() for g in grads]

    def foreach():
        torch._foreach_add_(grads, weights)

    pruner = tp_pruner(model, x, head, kind)  # traces with autograd: outside no_grad
    with torch.no_grad():
        ours, floor, ours_ops = _alternating([eng.apply_to_grads, foreach, ops.apply_to_grads], ROUNDS)
        ratios = sorted(o / f for o, f in zip(ours, floor))
        ratios_ops = sorted(o / f for o, f in zip(ours_ops, floor))
        try:
            tp_t = times(lambda: pruner.regularize(model), TP_ROUNDS, warmup=1)
        except Exception as e:  # Torch-Pruning 1.6.1 crashes on BNScale(group_lasso) without BatchNorm2d
            tp_t, tp_error = [float("nan")], f"{type(e).__name__}: {e}"
        else:
            tp_error = None
        benchmark.pedantic(eng.apply_to_grads, rounds=ROUNDS, warmup_rounds=1)
        for g, s in zip(grads, saved):  # leave the gradients as found for the next case
            g.copy_(s)

    ours_ms, floor_ms, tp_ms, ops_ms = (statistics.median(t) for t in (ours, floor, tp_t, ours_ops))
    info = {
        "ours_ms": round(ours_ms, 2), "ours_iqr_ms": round(iqr(ours), 2), "c_loops": native,
        "torch_ops_ms": round(ops_ms, 2), "torch_ops_iqr_ms": round(iqr(ours_ops), 2),
        "torch_ops_x_foreach": round(statistics.median(ratios_ops), 2),
        "foreach_ms": round(floor_ms, 2), "foreach_iqr_ms": round(iqr(floor), 2),
        "tp_ms": round(tp_ms, 1), "tp_iqr_ms": round(iqr(tp_t), 1), "tp_error": tp_error,
        "sgd_step_ms": round(sgd_ms, 2),
        "x_foreach": round(statistics.median(ratios), 2),
        "x_foreach_q1_q3": [round(statistics.quantiles(ratios, n=4)[i], 2) for i in (0, 2)],
        "speedup_vs_tp": round(tp_ms / ours_ms, 1),
        "params_M": round(sum(p.numel() for p in params) / 1e6, 1), "groups": len(groups),
        "threads": torch.get_num_threads(), "rounds": ROUNDS, "tp_rounds": TP_ROUNDS,
        "loadavg": os.getloadavg()[0],
    }
    benchmark.extra_info.update(info)
    _save(f"{name}/{kind}", info)
    print(f"\n{name} {kind}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
