"""Work grows linearly with model size: the number of torch calls made by the walk, the assembly into
Groups and the torch backend's plan, counted on deep narrow MLPs of 10, 20 and 40 layers, must grow by
the same amount for each added layer (a per-layer loop that rescans earlier layers would not).
Timings belong in bench/ (bench_find_groups.py, bench_half_cpu.py); this counts calls instead."""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tritonprune.graph import Walker, assemble
from tritonprune.graph.trace import export
from tritonprune.regularizing.engine import Regularization
from tritonprune.regularizing.regularizers import GroupNorm


class _Count(TorchFunctionMode):
    """Torch calls, weighted by the elements they return (so an op over an ever larger tensor counts)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.elems = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        if isinstance(out, torch.Tensor):
            self.elems += out.numel()
        return out


def _mlp(n: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 2))


def _work(n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    torch.manual_seed(0)
    m, x = _mlp(n), torch.randn(2, 8)
    ep = export(m, x)
    with _Count() as graph:
        walker = Walker(ep, m)
        walker.run()
        groups = assemble(walker.space, set())
    assert len(groups) == n
    m(x).sum().backward()
    eng = Regularization(m, groups, GroupNorm(1e-4), backend="torch")
    with _Count() as plan:
        eng.apply_to_grads()  # the first call builds the plan
    return (graph.calls, graph.elems), (plan.calls, plan.elems)


def test_find_groups_and_plan_work_is_linear_in_depth():
    (g10, p10), (g20, p20), (g40, p40) = _work(10), _work(20), _work(40)
    for name, a, b, c in (("graph", g10, g20, g40), ("plan", p10, p20, p40)):
        for i, what in enumerate(("calls", "elements")):
            step1, step2 = b[i] - a[i], c[i] - b[i]  # 10 more layers, then 20 more
            assert step2 <= 2 * step1 + 2, f"{name} {what}: {a[i]}, {b[i]}, {c[i]} at 10/20/40 layers (superlinear)"
