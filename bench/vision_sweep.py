"""Prune every torchvision classifier and a spread of timm families; write bench/results/vision_sweep_*.json.

    OMP_NUM_THREADS=1 python bench/vision_sweep.py torchvision|timm [names...]

One file per source (bench/results/vision_sweep_torchvision.json, ..._timm.json), rewritten after every
model so that an interrupted run keeps what it measured (a run over some names only prints).

Per model (tests/vision_sweep.py): groups found, prunes at ratio 0.5, runs after pruning (eval forward),
trains (one SGD step in train mode), parameter ratio, apply vs zero_ where groups are exact, CPU seconds
of the whole check. A pruned model that fails to run is recorded with its error (the sweep goes on).
"""

from __future__ import annotations

import json
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import tv  # noqa: E402
from test_torchvision_sweep import DEFAULT, OTHERS  # noqa: E402
from vision_sweep import Result, sweep_one  # noqa: E402

TIMM = {  # name -> (input size, pass img_size)
    "vit_tiny_patch16_224": (32, True), "deit_tiny_patch16_224": (32, True), "deit3_small_patch16_224": (32, True),
    "beit_base_patch16_224": (32, True), "cait_xxs24_224": (32, True), "eva02_tiny_patch14_224": (28, True),
    "swin_tiny_patch4_window7_224": (56, True), "swinv2_tiny_window8_256": (64, True),
    "poolformer_s12": (64, False), "poolformerv2_s12": (64, False), "convformer_s18": (64, False),
    "caformer_s18": (64, False), "convnext_atto": (64, False), "convnextv2_atto": (64, False),
    "efficientnet_b0": (64, False), "mobilenetv3_small_100": (64, False), "resnet18": (64, False),
    "regnetx_002": (64, False), "levit_128s": (64, True), "mixer_s16_224": (32, True), "pit_ti_224": (64, True),
    "xcit_nano_12_p16_224": (32, True), "twins_svt_small": (64, True), "edgenext_xx_small": (64, False),
    "mobilevit_xxs": (64, False), "fastvit_t8": (64, False), "repvit_m0_9": (64, False),
    "ghostnet_100": (64, False), "dla34": (64, False), "dpn68": (64, False), "hrnet_w18_small": (64, False),
    "crossvit_tiny_240": (240, True), "tnt_s_patch16_224": (32, True), "nest_tiny": (64, True),
    "gcvit_xxtiny": (64, True), "maxvit_nano_rw_256": (64, True), "coatnet_nano_rw_224": (64, True),
    "inception_next_tiny": (64, False), "mambaout_femto": (64, False), "rexnet_100": (64, False),
    "cspresnet50": (64, False), "res2net50_14w_8s": (64, False), "resnest14d": (64, False),
    "sebotnet33ts_256": (64, True), "nfnet_l0": (64, False), "hiera_tiny_224": (64, True),
    "vitamin_small_224": (64, True), "fastvit_sa12": (64, False),
    "pvt_v2_b0": (64, False), "davit_tiny": (64, False), "twins_pcpvt_small": (64, True),
    "coat_lite_tiny": (64, True),
}


def _one(source: str, name: str, build) -> dict:
    t0 = time.process_time()
    try:
        model, size = build()
    except Exception as e:  # a model this torchvision/timm cannot build here
        return {"source": source, "model": name, "error": f"build: {type(e).__name__}: {e}"[:300]}
    try:
        d = sweep_one(name, model, size).to_dict()
    except Exception as e:  # the pruned model broke: record why
        d = Result(name, size).to_dict()
        d["error"] = f"{type(e).__name__}: {e}"[:300]
        d["param_ratio"] = None  # not measured: the pruned model did not run
    d["seconds"] = round(time.process_time() - t0, 2)
    d["source"] = source
    return d


def main(source: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    if source == "torchvision":
        models = tv.torchvision().models
        todo = {n: (lambda n=n, s=s, k=k: (models.get_model(n, weights=None, num_classes=10, **k), s))
                for n, (s, k) in {**DEFAULT, **OTHERS}.items()}
    elif source == "timm":
        timm = tv.timm()
        todo = {n: (lambda n=n, s=s, i=i: (
            timm.create_model(n, pretrained=False, num_classes=10, **({"img_size": s} if i else {})), s))
            for n, (s, i) in TIMM.items()}
    else:
        raise SystemExit("usage: vision_sweep.py torchvision|timm [names...]")
    out_path = ROOT / "bench" / "results" / f"vision_sweep_{source}.json"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {"commit": commit, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "threads": 1, "ratio": 0.5, "seconds": "CPU seconds of this process per model (build, find_groups, prune, checks)"}
    results = []
    for name, build in todo.items():
        if names and name not in names:
            continue
        results.append(_one(source, name, build))
        print(json.dumps({k: results[-1].get(k) for k in ("model", "runs", "trains", "param_ratio", "seconds", "error")}), flush=True)
        if not names:
            out_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
