"""Regularization time per call on CPU: tritonprune's torch backend against Torch-Pruning's `regularize`
and against one `torch._foreach_add_(grads, weights)` pass (the memory floor: read w and g, write g).

Models: a ResNet-50-size bottleneck CNN (widths 64..2048, ~25M parameters, built here, no download)
and a wide MLP. Targets: >= 20x faster than Torch-Pruning, <= 2.5x the foreach pass.

    python -m pytest bench/bench_regularize_cpu.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
import time
import warnings

import pytest
import torch
import torch.nn as nn

from tritonprune.engine import Regularization
from tritonprune.regularizers import BNScale, GroupLasso, GroupNorm

tp = pytest.importorskip("torch_pruning")


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn1(self.conv1(x)).relu()
        y = self.bn2(self.conv2(y)).relu()
        y = self.bn3(self.conv3(y))
        return (y + (x if self.down is None else self.down(x))).relu()


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout: stages [3, 4, 6, 3], widths 64..2048, 25.6M parameters."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for mid, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, stride if i == 0 else 1))
                cin = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def wide_mlp(width: int = 3072, depth: int = 3) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(1024, width), nn.BatchNorm1d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    layers.append(nn.Linear(width, 1000))
    return nn.Sequential(*layers)


MODELS = {
    "resnet50": (ResNet50, lambda: (torch.randn(2, 3, 64, 64),), "fc"),
    "wide_mlp": (wide_mlp, lambda: (torch.randn(4, 1024),), "6"),
}
_CACHE: dict = {}


def setup(name: str):
    if name not in _CACHE:
        from tritonprune.graph import find_groups

        torch.manual_seed(0)
        make, inputs, head = MODELS[name]
        model, x = make(), inputs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = find_groups(model, x)
        model(*x).sum().backward()
        _CACHE[name] = (model, x, groups, head)
    return _CACHE[name]


def median_ms(fn, rounds: int = 7, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), (max(times) - min(times))


def tp_pruner(model, x, head, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ign = [model.get_submodule(head)]
        if kind == "group_norm":
            return tp.pruner.GroupNormPruner(model, list(x), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                             reg=1e-4, ignored_layers=ign)
        return tp.pruner.BNScalePruner(model, list(x), importance=tp.importance.BNScaleImportance(), reg=1e-5,
                                       ignored_layers=ign, group_lasso=(kind == "group_lasso"))


REGS = {"group_norm": GroupNorm(1e-4), "bn_scale": BNScale(1e-5), "group_lasso": GroupLasso(1e-5)}


@pytest.mark.parametrize("kind", list(REGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_regularize(benchmark, name, kind):
    model, x, groups, head = setup(name)
    eng = Regularization(model, groups, REGS[kind], backend="torch")
    params = [p for p in model.parameters() if p.grad is not None]
    grads, weights = [p.grad for p in params], [p.detach() for p in params]

    with torch.no_grad():
        foreach_ms, foreach_spread = median_ms(lambda: torch._foreach_add_(grads, weights))
    pruner = tp_pruner(model, x, head, kind)
    tp_ms, tp_spread = median_ms(lambda: pruner.regularize(model), rounds=3, warmup=1)

    benchmark.pedantic(eng.apply_to_grads, rounds=15, warmup_rounds=2)
    ours_ms = benchmark.stats.stats.median * 1e3
    info = {
        "ours_ms": round(ours_ms, 2), "tp_ms": round(tp_ms, 2), "foreach_ms": round(foreach_ms, 2),
        "tp_spread_ms": round(tp_spread, 2), "foreach_spread_ms": round(foreach_spread, 2),
        "speedup_vs_tp": round(tp_ms / ours_ms, 1), "ratio_to_foreach": round(ours_ms / foreach_ms, 2),
        "params_M": round(sum(p.numel() for p in params) / 1e6, 1), "threads": torch.get_num_threads(),
    }
    benchmark.extra_info.update(info)
    print(f"\n{name} {kind}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
