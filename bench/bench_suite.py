"""regularize() per backend, against Torch-Pruning and a naive per-group PyTorch loop, per model size.

    python -m pytest bench/bench_suite.py --benchmark-only --benchmark-json=bench/results/suite-cpu.json
    TRITONPRUNE_BENCH_WIDTHS=16,64,256 python -m pytest bench/bench_suite.py --benchmark-only

Every row adds the same GroupNorm term (reg=1e-4, alpha=4) to the same gradients of SmallResNet(width=w).
`extra_info` carries `x_tritonprune` (median / tritonprune[torch]'s median at the same width, measured in the
same run) and `x_sgd_step` (median / the SGD step's median). See bench/README.md for comparing runs.
"""

from __future__ import annotations

import os

import pytest
import torch

import tritonprune as tpr
from tritonprune.app import benchmark as tb

WIDTHS = [int(w) for w in os.environ.get("TRITONPRUNE_BENCH_WIDTHS", "16,64,128").split(",") if w.strip()]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
METHODS = [f"tritonprune[{b}]" for b in tb.available_backends(DEVICE)] + ["tritonprune[reference]",
                                                                          "torch-pruning", "naive loop", "sgd step"]
SLOW = {"tritonprune[reference]": 3, "torch-pruning": 5}  # rounds for the per-channel / per-group Python loops
_SETUPS: dict = {}
_MEDIANS: dict = {}
_EXTRA: dict = {}  # extra_info dicts of earlier rows: pytest-benchmark reads them when it writes the JSON


def _setup(width: int):
    if width not in _SETUPS:
        _SETUPS[width] = tb._setup(width, DEVICE)
    return _SETUPS[width]


def _method(name: str, model, x, groups):
    sgd = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    if name.startswith("tritonprune["):
        backend = name[len("tritonprune[") : -1]
        opt = tpr.RegularizedOptimizer(sgd, model, groups=groups, regularizer=tpr.GroupNorm(reg=tb.REG), backend=backend)
        return opt.regularize
    if name == "torch-pruning":
        fn = tb._tp_regularize(model, x)
        if fn is None:
            pytest.skip("torch-pruning is not installed")
        return fn
    if name == "naive loop":
        return tb.naive_group_norm(model, groups)
    return sgd.step


@pytest.mark.parametrize("width, method", [(w, m) for w in WIDTHS for m in METHODS])
def test_regularize(benchmark, width, method):
    if method == "tritonprune[reference]" and width > 32:
        pytest.skip("the reference backend loops over every channel in Python; small widths only")
    model, x, groups = _setup(width)
    fn = _method(method, model, x, groups)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def call():
        fn()
        sync()

    benchmark.group = f"regularize SmallResNet w{width}"
    benchmark.extra_info.update(
        method=method, width=width, params=sum(p.numel() for p in model.parameters()), groups=len(groups),
        device=str(DEVICE), threads=torch.get_num_threads(),
    )
    rounds = SLOW.get(method, 30)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1 if method in SLOW else 3)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to compare
        return
    median = benchmark.stats.stats.median
    _MEDIANS[(width, method)] = median
    _EXTRA[(width, method)] = benchmark.extra_info
    base = _MEDIANS.get((width, METHODS[0]))
    if base:
        benchmark.extra_info["x_tritonprune"] = round(median / base, 3)
    if method == "sgd step":
        for m in METHODS:  # the SGD step comes last: fill its ratio in for every row of this width
            if (width, m) in _MEDIANS:
                _EXTRA[(width, m)]["x_sgd_step"] = round(_MEDIANS[(width, m)] / median, 3)
