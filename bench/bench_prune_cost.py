"""What `prune` costs against `find_groups` on the same model and inputs, in the same run.

    python bench/bench_prune_cost.py                     # JSON in bench/results/cpu_prune_cost.json
    TRITONPRUNE_BENCH_MODELS=resnet18,hf_bert TRITONPRUNE_BENCH_ROUNDS=3 python bench/bench_prune_cost.py

Per model (1 thread, after one warm-up call of each, `rounds` interleaved rounds): the median wall and
CPU (process) time of `find_groups`, of `prune(ratio=0.3)` on a fresh copy, of `prune(ratio=0.3,
dry_run=True)` and of `prune(ratio=0.3, steps=3)` on a fresh copy, reported as ratios to find_groups
(CPU time is the steadier figure on a shared machine; the load average is recorded). prune traces once, ranks, checks the planned model on a copy (a real clone for models up
to 256 MiB of tensors on the CPU, fake tensors otherwise), slices and verifies attributes.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_find_groups import _torchvision  # noqa: E402
from bench_find_groups import build as build_sweep  # noqa: E402  (the same models and inputs)

import tritonprune as tpr  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu_prune_cost.json"
MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16", "hf_bert", "hf_gpt2",
          "hf_llama", "diffusers_unet")


def diffusers_unet() -> tuple[torch.nn.Module, dict]:
    """diffusers' small test UNet2DConditionModel, built from its config (no weights): block_out_channels
    (32, 64), one layer per block, cross-attention width 32, a 32x32 latent and 8 text tokens."""
    _torchvision()  # diffusers imports transformers, which imports torchvision where installed
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    x = {"sample": torch.randn(1, 4, 32, 32), "timestep": torch.tensor([10]),
         "encoder_hidden_states": torch.randn(1, 8, 32)}
    return model.eval(), x


def build(name: str) -> tuple[torch.nn.Module, object]:
    return diffusers_unet() if name == "diffusers_unet" else build_sweep(name)


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU (process) time is the steadier figure on a shared machine."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


STEPS = 3


def measure(name: str, rounds: int) -> dict:
    model, x = build(name)
    # each call gets the model to work on: prune a fresh copy (made before the clock starts), the rest the model
    calls = {
        "find_groups": (False, lambda m: tpr.find_groups(m, x)),
        "prune": (True, lambda m: tpr.prune(m, x, ratio=0.3)),
        "prune_dry_run": (False, lambda m: tpr.prune(m, x, ratio=0.3, dry_run=True)),
        f"prune_steps{STEPS}": (True, lambda m: tpr.prune(m, x, ratio=0.3, steps=STEPS)),
    }
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fresh, fn in calls.values():
            fn(copy.deepcopy(model) if fresh else model)  # warm-up
        for _ in range(rounds):  # interleaved, so load swings hit every call alike
            for k, (fresh, fn) in calls.items():
                m = copy.deepcopy(model) if fresh else model
                w, c = _timed(lambda fn=fn, m=m: fn(m))
                wall[k].append(w)
                cpu[k].append(c)
    out: dict = {}
    for k in calls:
        out[f"{k}_s"] = statistics.median(wall[k])
        out[f"{k}_cpu_s"] = statistics.median(cpu[k])
    for k in calls:
        if k != "find_groups":
            out[f"{k}_x"] = out[f"{k}_s"] / out["find_groups_s"]
            out[f"{k}_cpu_x"] = out[f"{k}_cpu_s"] / out["find_groups_cpu_s"]
    return out


def main() -> None:
    torch.set_num_threads(1)
    names = os.environ.get("TRITONPRUNE_BENCH_MODELS", ",".join(MODELS)).split(",")
    rounds = int(os.environ.get("TRITONPRUNE_BENCH_ROUNDS", "5"))
    out = {"torch": torch.__version__, "threads": 1, "rounds": rounds, "load_before": os.getloadavg()[0],
           "models": {}}
    for name in names:
        out["models"][name] = r = measure(name, rounds)
        print(f"{name:20s} find_groups {r['find_groups_s']:.3f}s (cpu {r['find_groups_cpu_s']:.3f}s)  "
              f"prune {r['prune_x']:.1f}x (cpu {r['prune_cpu_x']:.1f}x)  dry_run {r['prune_dry_run_x']:.1f}x "
              f"(cpu {r['prune_dry_run_cpu_x']:.1f}x)  steps={STEPS} {r[f'prune_steps{STEPS}_x']:.1f}x "
              f"(cpu {r[f'prune_steps{STEPS}_cpu_x']:.1f}x)  load {os.getloadavg()[0]:.1f}", flush=True)
    out["load_after"] = os.getloadavg()[0]
    for key in ("prune_x", "prune_cpu_x", "prune_dry_run_x", f"prune_steps{STEPS}_x"):
        ratios = [r[key] for r in out["models"].values()]
        out[f"median_{key}"] = statistics.median(ratios)
        out[f"max_{key}"] = max(ratios)
    print(f"prune / find_groups: median {out['median_prune_x']:.1f}x, max {out['max_prune_x']:.1f}x (wall); "
          f"cpu median {out['median_prune_cpu_x']:.1f}x, max {out['max_prune_cpu_x']:.1f}x")
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
