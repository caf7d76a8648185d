"""What `prune` costs against `find_groups` on the same model and inputs, in the same run.

    python bench/bench_prune_cost.py                     # JSON in bench/results/cpu_prune_cost.json
    TRITONPRUNE_BENCH_MODELS=resnet18,hf_bert python bench/bench_prune_cost.py

Per model (1 thread, after one warm-up call of each): the median wall time of `find_groups`, of
`prune(ratio=0.3)` on a fresh copy, and of `prune(ratio=0.3, dry_run=True)`, reported as ratios to
find_groups. prune traces once, ranks, checks the planned model on a copy (a real clone for models up
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


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, rounds: int) -> dict:
    model, x = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tpr.find_groups(model, x)
        tpr.prune(copy.deepcopy(model), x, ratio=0.3)
        fg = _median_time(lambda: tpr.find_groups(model, x), rounds)
        copies = [copy.deepcopy(model) for _ in range(rounds)]
        pr = _median_time(lambda: tpr.prune(copies.pop(), x, ratio=0.3), rounds)
        dry = _median_time(lambda: tpr.prune(model, x, ratio=0.3, dry_run=True), rounds)
    return {"find_groups_s": fg, "prune_s": pr, "prune_dry_run_s": dry,
            "prune_x": pr / fg, "prune_dry_run_x": dry / fg}


def main() -> None:
    torch.set_num_threads(1)
    names = os.environ.get("TRITONPRUNE_BENCH_MODELS", ",".join(MODELS)).split(",")
    out = {"torch": torch.__version__, "threads": 1, "load": os.getloadavg()[0], "models": {}}
    for name in names:
        out["models"][name] = r = measure(name, rounds=3)
        print(f"{name:20s} find_groups {r['find_groups_s']:.3f}s  prune {r['prune_x']:.1f}x  "
              f"dry_run {r['prune_dry_run_x']:.1f}x", flush=True)
    ratios = [r["prune_x"] for r in out["models"].values()]
    out["median_prune_x"] = statistics.median(ratios)
    out["max_prune_x"] = max(ratios)
    print(f"median prune / find_groups {out['median_prune_x']:.1f}x, max {out['max_prune_x']:.1f}x")
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
