"""Cost of issue 21's pre-step checks of a decoupled RegularizedOptimizer.step() (lr, lr*reg*gamma, finite
weights), on SmallResNet(width=64), 1 thread: the step with the checks against the step with
Regularization.check_decoupled replaced by prepare() alone (what ran before). CPU time (process_time, steadier on a shared machine): the best of 9 alternated medians of 30 steps.

    PYTHONPATH=. python bench/bench_decoupled_check.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import tritonprune as tpr
from tritonprune._files import write_json
from tritonprune.app.examples import SmallResNet
from tritonprune.regularizing.engine import Regularization

torch.set_num_threads(1)
torch.manual_seed(0)
model = SmallResNet(width=64)
x = torch.randn(2, 1, 8, 8)
opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), model, x,
                               regularizer=tpr.GroupNorm(reg=1e-4, decoupled=True))
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
checked = Regularization.check_decoupled


def time_steps(n=30):
    t = []
    for _ in range(n):
        t0 = time.process_time()
        opt.step()
        t.append(time.process_time() - t0)
    return statistics.median(t) * 1e3


res = {"with_checks_ms": [], "without_ms": []}
for _ in range(9):
    Regularization.check_decoupled = checked
    res["with_checks_ms"].append(time_steps())
    Regularization.check_decoupled = lambda self, lrs: self.prepare()
    res["without_ms"].append(time_steps())
Regularization.check_decoupled = checked
out = {k: round(min(v), 3) for k, v in res.items()}  # CPU time, best of 9 alternated medians
out["params"] = sum(p.numel() for p in model.parameters())
out["overhead"] = round(out["with_checks_ms"] / out["without_ms"] - 1, 3)
print(json.dumps(out))
write_json("bench/results/cpu_decoupled_check.json", out)
