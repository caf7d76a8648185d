"""Half-precision regularization on CPU: one GroupNorm `regularize` call of the torch backend in float32,
bfloat16 and float16, each against a `torch._foreach_add_(grads, weights)` pass in the same dtype (the
memory floor: read w and g, write g), and the cost of planning the first call on a deep narrow MLP.

    python bench/bench_half_cpu.py            # JSON in bench/results/cpu_half.json

Model: a wide MLP (Linear 1024 -> 4096 -> 1024 with BatchNorm1d, x4; 34M parameters), groups from
`tpr.find_groups`. The half types go through the C loops of kernels/cpu_native (float32 compute, one
rounding on store) where they build; `torch_ops` rows are the same call on torch ops alone (NATIVE =
False, what half types took before). Ours and the floor are timed in alternation; each ratio is the median
of per-round ratios. CPU seconds (process time), one thread: the machine is shared, so wall time swings.
Plan scaling: the first call on `Linear(8, 8) + ReLU` x n builds the per-structure plan; the JSON has
its seconds per layer for each n (flat = linear).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tritonprune, not an installed one
import tritonprune as tpr  # noqa: E402
from tritonprune.kernels import torch_impl  # noqa: E402
from tritonprune.regularizing.engine import Regularization  # noqa: E402
from tritonprune.regularizing.regularizers import GroupNorm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu_half.json"
ROUNDS = int(os.environ.get("TRITONPRUNE_BENCH_ROUNDS", "11"))


def wide_mlp(width: int = 1024, hidden: int = 4096, blocks: int = 4) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


def cpu_ms(fn, rounds: int) -> list[float]:
    fn()
    out = []
    for _ in range(rounds):
        t = time.process_time()
        fn()
        out.append((time.process_time() - t) * 1e3)
    return out


def half_rows(rounds: int) -> dict:
    base = wide_mlp()
    x = torch.randn(8, 1024)
    groups = tpr.find_groups(base, x)
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = wide_mlp().to(dtype)
        m.load_state_dict(base.state_dict())
        params = [p for p in m.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        grads, weights = [p.grad for p in params], [p.detach() for p in params]
        for native in (True, False):
            torch_impl.NATIVE = native
            eng = Regularization(m, groups, GroupNorm(1e-4), backend="torch")
            eng.apply_to_grads()  # plan built
            ours, floor = [], []
            for _ in range(rounds):
                ours += cpu_ms(eng.apply_to_grads, 1)
                floor += cpu_ms(lambda g=grads, w=weights: torch._foreach_add_(g, w, alpha=1e-12), 1)
            key = f"{str(dtype).split('.')[-1]}{'' if native else '_torch_ops'}"
            uses_c = bool(eng.buffers.cache["torch"].matrix.native)
            out[key] = {"ms": statistics.median(ours), "foreach_ms": statistics.median(floor),
                        "x_foreach": statistics.median(a / b for a, b in zip(ours, floor)), "c_loops": uses_c}
            print(f"{key:20s} {out[key]['ms']:8.2f} ms  foreach {out[key]['foreach_ms']:7.2f} ms  "
                  f"x{out[key]['x_foreach']:.2f}  c_loops={uses_c}", flush=True)
    torch_impl.NATIVE = True
    return out


def plan_rows(sizes=(500, 1000, 2000, 5000)) -> dict:
    out = {}
    for n in sizes:
        layers: list[nn.Module] = []
        for _ in range(n):
            layers += [nn.Linear(8, 8), nn.ReLU()]
        m = nn.Sequential(*layers, nn.Linear(8, 2))
        x = torch.randn(2, 8)
        groups = tpr.find_groups(m, x)
        m(x).sum().backward()
        t = time.process_time()
        eng = Regularization(m, groups, GroupNorm(1e-4), backend="torch")
        eng.apply_to_grads()
        first = time.process_time() - t
        t = time.process_time()
        eng.apply_to_grads()
        second = time.process_time() - t
        out[str(n)] = {"groups": len(groups), "first_call_s": first, "ms_per_layer": 1e3 * first / n,
                       "next_call_ms": 1e3 * second}
        print(f"plan, deep MLP {n:5d} layers: first call {first:.2f} s ({1e3 * first / n:.2f} ms/layer), "
              f"next {1e3 * second:.1f} ms", flush=True)
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    res = {"load_before": os.getloadavg(), "threads": 1, "rounds": ROUNDS, "timer": "process_time"}
    res["half"] = half_rows(ROUNDS)
    res["plan"] = plan_rows()
    res["load_after"] = os.getloadavg()
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
