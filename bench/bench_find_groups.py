"""find_groups against Torch-Pruning's `DependencyGraph().build_dependency` on torchvision classifiers and
small Hugging Face configs (BERT, GPT-2, Llama: 2 layers, hidden 64), as a ratio measured in the same run,
with where our time goes; and the scaling on a deep narrow MLP.

    python bench/bench_find_groups.py                      # everything, JSON in bench/results/
    TRITONPRUNE_BENCH_MODELS=resnet18,resnet50 python bench/bench_find_groups.py --no-scaling
    python -m pytest bench/bench_find_groups.py --benchmark-only   # the same, under pytest-benchmark

Per model: the median of `rounds` calls of each (more for fast models, until each side ran 0.5 s; after one
warm-up call), alternated (ours, theirs,
ours, ...) so load swings hit both, plus one instrumented call of ours split into its phases (CPU time)
(recording the forward, the walk applying the coupling rules, assembly into Groups), and one plain
no_grad forward of the model for scale. Wall and CPU (process)
time are both recorded: on a shared machine CPU time is the steadier of the two. The deep narrow MLP
(`Linear(8, 8) + ReLU` repeated n times) shows the cost per layer stays flat as n grows. The load
average is recorded next to the figures: the machine is shared.
Results: bench/results/cpu_find_groups.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tritonprune, not an installed one
from timing import iqr  # noqa: E402

import tritonprune as tpr  # noqa: E402
from tritonprune.graph import Walker, assemble, resolve_ignored  # noqa: E402
from tritonprune.graph.record import trace  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu_find_groups.json"
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
          "regnet_y_400mf", "convnext_tiny", "vit_b_16", "hf_bert", "hf_gpt2", "hf_llama")
SCALING = (250, 500, 1000, 2000)


def _torchvision():
    # torchvision's model code from the tests-only folder `make test` fills, as the tests load it (tests/tv.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tv

    tv.install()
    import torchvision

    return torchvision


def hf_model(name: str) -> tuple[nn.Module, dict]:
    """A small Hugging Face model from its config (2 layers, hidden 64) and a batch of token ids."""
    _torchvision()  # transformers imports torchvision where installed: it needs the same stand-in
    import transformers as T

    T.logging.set_verbosity_error()
    common = dict(vocab_size=1000, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    if name == "hf_bert":
        model = T.BertModel(T.BertConfig(**common))
    elif name == "hf_gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               use_cache=False))
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(**common, use_cache=False))  # (TP 1.6.1 hangs on GQA here)
    return model.eval(), {"input_ids": torch.randint(0, 1000, (1, 32))}


def build(name: str) -> tuple[nn.Module, object]:
    if name.startswith("hf_"):
        return hf_model(name)
    torch.manual_seed(0)
    return getattr(_torchvision().models, name)().eval(), torch.randn(1, 3, 224, 224)


def deep_mlp(n: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 2))


def _call(model: nn.Module, x: object) -> object:
    return model(**x) if isinstance(x, dict) else model(x)


def phases(model: nn.Module, x: object) -> dict[str, float]:
    """CPU seconds (process time) of one find_groups split into record / walk / assemble, and of one
    plain no_grad forward."""
    t0 = time.process_time()
    tr = trace(model, x)
    t1 = time.process_time()
    walker = Walker(tr, model)
    walker.run()
    t2 = time.process_time()
    groups = assemble(walker.space, resolve_ignored(model, ()))
    t3 = time.process_time()
    with torch.no_grad():
        _call(model, x)
    t4 = time.process_time()
    return {"record_s": t1 - t0, "walk_s": t2 - t1, "assemble_s": t3 - t2, "forward_s": t4 - t3,
            "groups": len(groups), "nodes": len(tr.graph.nodes)}


MIN_SECONDS, MAX_ROUNDS = 0.5, 200


def compare(model: nn.Module, x: object, rounds: int) -> dict:
    import torch_pruning as tp

    def ours():
        return tpr.find_groups(model, x)

    def theirs():
        return list(tp.DependencyGraph().build_dependency(model, example_inputs=x).get_all_groups())

    ours(), theirs()  # warm-up: first-call caches
    a, b, ca, cb = [], [], [], []
    # at least `rounds` rounds, more for fast models until each side has run MIN_SECONDS: a 10 ms call
    # measured 5 times swings by +-20% on a shared machine
    while len(a) < rounds or (sum(a) + sum(b) < 2 * MIN_SECONDS and len(a) < MAX_ROUNDS):
        for fn, out, cpu in ((ours, a, ca), (theirs, b, cb)):
            t, c = time.perf_counter(), time.process_time()
            fn()
            out.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"ours_s": statistics.median(a), "ours_iqr_s": iqr(a), "tp_s": statistics.median(b),
            "tp_iqr_s": iqr(b), "ratio": statistics.median(x_ / y_ for x_, y_ in zip(a, b)),
            "ours_cpu_s": statistics.median(ca), "tp_cpu_s": statistics.median(cb),
            "cpu_ratio": statistics.median(x_ / y_ for x_, y_ in zip(ca, cb)), "rounds": len(a),
            "tp_groups": len(theirs()), **phases(model, x)}


def run(models: list[str], scaling: list[int], rounds: int) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict = {"load_before": os.getloadavg(), "torch": torch.__version__, "threads": 1, "models": {},
                 "deep_mlp": {}}
    if models:
        for name in models:
            model, x = build(name)
            out["models"][name] = r = compare(model, x, rounds)
            r["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            print(f"{name:20s} ours {r['ours_s']:.3f} s  TP {r['tp_s']:.3f} s  ratio {r['ratio']:.2f} "
                  f"(CPU time: {r['ours_cpu_s']:.3f} / {r['tp_cpu_s']:.3f} s = {r['cpu_ratio']:.2f})  "
                  f"(record {r['record_s']:.3f} walk {r['walk_s']:.3f} assemble {r['assemble_s']:.3f}; "
                  f"plain forward {r['forward_s']:.3f})", flush=True)
        out["median_ratio"] = statistics.median(r["ratio"] for r in out["models"].values())
        out["median_cpu_ratio"] = statistics.median(r["cpu_ratio"] for r in out["models"].values())
        out["median_ours_s"] = statistics.median(r["ours_s"] for r in out["models"].values())
        out["median_tp_s"] = statistics.median(r["tp_s"] for r in out["models"].values())
        out["max_ratio"] = max(r["ratio"] for r in out["models"].values())
        out["max_cpu_ratio"] = max(r["cpu_ratio"] for r in out["models"].values())
    x = torch.randn(2, 8)
    trace(deep_mlp(4), x)  # warm-up
    for n in scaling:
        r = phases(deep_mlp(n), x)
        r["total_s"] = r["record_s"] + r["walk_s"] + r["assemble_s"]
        r["ms_per_layer"] = 1e3 * r["total_s"] / n
        out["deep_mlp"][str(n)] = r
        print(f"deep MLP {n:5d} layers: {r['total_s']:.2f} CPU s ({r['ms_per_layer']:.2f} ms/layer; record "
              f"{r['record_s']:.2f} walk {r['walk_s']:.2f} assemble {r['assemble_s']:.2f})", flush=True)
    out["load_after"] = os.getloadavg()
    return out


def test_find_groups_vs_torch_pruning(benchmark):
    """pytest-benchmark entry: the first two models, ratio in extra_info."""
    import pytest

    pytest.importorskip("torch_pruning")
    pytest.importorskip("torchvision")
    res = benchmark.pedantic(run, args=(list(MODELS[:2]), [250], 3), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in res.items() if k != "machine"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("TRITONPRUNE_BENCH_ROUNDS", "3")))
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args()
    models = [m for m in os.environ.get("TRITONPRUNE_BENCH_MODELS", ",".join(MODELS)).split(",") if m]
    scaling = [] if args.no_scaling else [int(n) for n in os.environ.get(
        "TRITONPRUNE_BENCH_LAYERS", ",".join(map(str, SCALING))).split(",") if n]
    res = run(models, scaling, args.rounds)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"median ratio ours/TP {res.get('median_ratio', float('nan')):.2f}; written {args.json}")


if __name__ == "__main__":
    main()
