"""Which Hugging Face families lose attention heads: prune every tiny config of tests/hf_zoo.py at ratio 0.3.

    OMP_NUM_THREADS=1 python bench/hf_heads.py [names...]    # writes bench/results/hf_heads.json (all names)

Per family: parameter ratio after / before, attention modules (those with q/k/v projections) whose query
rows shrank out of all, the groups the run check left out, and whether the pruned model runs.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hf_zoo  # noqa: E402
import torch  # noqa: E402

import tritonprune as tpr  # noqa: E402
from tritonprune.pruning.attention_attrs import projections  # noqa: E402


def _query_rows(model) -> dict[str, int]:
    tensors = dict(model.named_parameters())
    return {n: p.q.length for n, m in model.named_modules() if (p := projections(n, m)) is not None
            and p.q.name in tensors} | {n: m.q_proj.out_features for n, m in model.named_modules()
                                         if hasattr(m, "q_proj") and projections(n, m) is None}


def one(name: str) -> dict:
    m, x, _ = hf_zoo.build(name)
    rows0 = {n: r for n, r in _query_rows(m).items()}
    if name == "gpt_neox":  # q, k, v interleaved per head in query_key_value
        rows0 = {n: mod.query_key_value.out_features for n, mod in m.named_modules() if hasattr(mod, "query_key_value")}
    p0 = sum(p.numel() for p in m.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = tpr.prune(m, x, ratio=0.3)
    mods = dict(m.named_modules())
    rows1 = {n: (mods[n].query_key_value.out_features if name == "gpt_neox" else _query_rows(m).get(n, rows0[n]))
             for n in rows0}
    with torch.no_grad():
        ok = bool(torch.isfinite(hf_zoo.output(m, x)).all())
    return {"model": name, "param_ratio": round(sum(p.numel() for p in m.parameters()) / p0, 4),
            "attention_modules_losing_heads": f"{sum(rows1[n] < rows0[n] for n in rows0)}/{len(rows0)}",
            "left_out_by_run_check": len(plan.info.get("dropped", [])), "runs": ok,
            "warnings": sorted({str(w.message).split(";")[0][:160] for w in caught if "tritonprune" in str(w.message)})}


if __name__ == "__main__":
    torch.set_num_threads(1)
    hf_zoo.T.logging.set_verbosity_error()
    names = sys.argv[1:] or hf_zoo.NAMES
    results = []
    for n in names:
        try:
            results.append(one(n))
        except Exception as e:  # record and go on
            results.append({"model": n, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "warnings"}), flush=True)
    if not sys.argv[1:]:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        meta = {"commit": commit, "torch": torch.__version__, "ratio": 0.3, "command": "python bench/hf_heads.py"}
        (ROOT / "bench" / "results" / "hf_heads.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
