"""Torch-Pruning 1.6.1 next to tritonprune on the timm models of issue 22 (ratio 0.5, parameters after / before).

    OMP_NUM_THREADS=1 python bench/tp_vision_compare.py [names...]  -> bench/results/tp_vision_compare.json

Torch-Pruning with its timm ViT recipe: MagnitudePruner (L2), the classifier ignored, `num_heads` given for
every module with a `qkv` / `q` Linear and a `num_heads` attribute (whole heads pruned, head dims kept), the
attributes set from `pruner.num_heads` afterwards. Per model and tool: the parameter ratio and whether the
pruned model runs an eval forward (else the error). tritonprune: `prune(model, x, ratio=0.5)`.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import tv  # noqa: E402

import tritonprune as tpr  # noqa: E402

MODELS = {"cait_xxs24_224": (32, True), "pvt_v2_b0": (64, False), "twins_pcpvt_small": (64, True),
          "crossvit_tiny_240": (240, True), "swin_tiny_patch4_window7_224": (56, True),
          "maxvit_nano_rw_256": (64, True), "xcit_nano_12_p16_224": (32, True)}


def _build(name):
    size, img = MODELS[name]
    timm = tv.timm()
    m = timm.create_model(name, pretrained=False, num_classes=10, **({"img_size": size} if img else {}))
    return m.eval(), torch.randn(2, 3, size, size)


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def torch_pruning(name) -> dict:
    import torch_pruning as tp

    m, x = _build(name)
    before = _params(m)
    heads = {}
    for mod in m.modules():
        lin = getattr(mod, "qkv", None) or getattr(mod, "q", None)
        if isinstance(lin, torch.nn.Linear) and isinstance(getattr(mod, "num_heads", None), int):
            heads[lin] = mod.num_heads
    head = m.get_classifier() if hasattr(m, "get_classifier") else None
    ignored = [mm for mm in (head if isinstance(head, torch.nn.ModuleList) else [head]) if isinstance(mm, torch.nn.Module)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                               pruning_ratio=0.5, ignored_layers=ignored, num_heads=heads,
                                               prune_num_heads=True, prune_head_dims=False)
            pruner.step()
        for mod in m.modules():
            lin = getattr(mod, "qkv", None) or getattr(mod, "q", None)
            if lin in pruner.num_heads:
                mod.num_heads = pruner.num_heads[lin]  # whole heads pruned: the head dim stays
    except Exception as e:  # Torch-Pruning refuses or crashes: recorded
        return {"param_ratio": None, "runs": False, "error": f"prune: {type(e).__name__}: {e}"[:200]}
    ratio = round(_params(m) / before, 4)
    try:
        with torch.no_grad():
            m(x)
    except Exception as e:
        return {"param_ratio": ratio, "runs": False, "error": f"forward: {type(e).__name__}: {e}"[:200]}
    return {"param_ratio": ratio, "runs": True, "error": None}


def ours(name) -> dict:
    m, x = _build(name)
    before = _params(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpr.prune(m, x, ratio=0.5)
    with torch.no_grad():
        m(x)
    return {"param_ratio": round(_params(m) / before, 4), "runs": True, "dropped": len(plan.info.get("dropped", []))}


def main(names) -> None:
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = ROOT / "bench" / "results" / "tp_vision_compare.json"
    rows = []
    for n in names or MODELS:
        rows.append({"model": n, "torch_pruning": torch_pruning(n), "tritonprune": ours(n)})
        print(json.dumps(rows[-1]), flush=True)
        if not names:  # rewritten after every model: an interrupted run keeps what it measured
            out.write_text(json.dumps({"meta": {"commit": commit, "ratio": 0.5, "torch": torch.__version__},
                                       "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
