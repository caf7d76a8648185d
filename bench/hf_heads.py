"""Which Hugging Face families lose attention heads: prune every tiny config of tests/hf_zoo.py at ratio 0.3.

    OMP_NUM_THREADS=1 python bench/hf_heads.py [names...]    # writes bench/results/hf_heads.json (all names)

Per family: parameter ratio after / before, attention modules (those with q/k/v projections) whose query
rows shrank out of all, what lost channels ("pruned": heads, MLP, residual stream, experts, norm groups,
other inner dims such as DeepSeek's low-rank latents), the groups the run check left out, and whether the
pruned model runs. `python bench/hf_table.py` renders docs/huggingface.md's coverage table from the JSON.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hf_zoo  # noqa: E402
import torch  # noqa: E402

import tritonprune as tpr  # noqa: E402
from tritonprune.pruning.attention_attrs import grouped_rows, projections  # noqa: E402


def _query_rows(model) -> dict[str, int]:
    """Per attention module: the rows of its query projection (all of a per-group fused one; the up
    projection of a latent-attention module, or its plain q_proj)."""
    tensors = dict(model.named_parameters())
    out = {}
    for n, m in model.named_modules():
        p = projections(n, m)
        if p is not None and p.q.name in tensors:
            out[n] = p.q.length
        elif (g := grouped_rows(n, m)) is not None:
            out[n] = g[0].length
        elif isinstance(q := getattr(m, "q_b_proj", None) or getattr(m, "q_proj", None), torch.nn.Linear):
            out[n] = q.out_features
        elif isinstance(getattr(m, "query_key_value", None), torch.nn.Linear):  # q, k, v interleaved per head
            out[n] = m.query_key_value.out_features
    return out


MLP = re.compile(r"(mlp|fc1|fc2|intermediate|dense_h_to_4h|c_fc|ffn|feed_forward|DenseReluDense|wi|ff|"
                 r"shared_expert|conv_1x1|expand|reduce)", re.I)


def kinds(plan, attention: set[str]) -> list[str]:
    """What lost channels: one word per kind of group with channels removed."""
    out = set()
    for g, removed in plan._removals():
        if not removed:
            continue
        heads = any(s.role == "out" and any(s.module == a or s.module.startswith(a + ".") for a in attention)
                    for s in g.slots)
        layers = {x.group(1) for s in g.slots if (x := re.search(r"\.(\d+)\.", s.name))}
        if g.origin.endswith("experts"):
            out.add("experts")
        elif heads and (g.unit > 1 or any(s.repeat > 1 for s in g.slots)):
            out.add("heads")
        elif any(s.kind == "embedding" for s in g.slots) or len(layers) > 1:
            out.add("residual")
        elif g.blocks > 1 and any(s.kind == "groupnorm" for s in g.slots):
            out.add("norm groups")
        elif MLP.search(g.origin):
            out.add("mlp")
        else:
            out.add("other")
    return sorted(out)


def one(name: str) -> dict:
    m, x, _ = hf_zoo.build(name)
    rows0 = _query_rows(m)
    p0 = sum(p.numel() for p in m.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = tpr.prune(m, x, ratio=0.3)
    pruned = kinds(plan, set(rows0))
    rows1 = _query_rows(m)
    rows1 = {n: rows1.get(n, rows0[n]) for n in rows0}
    with torch.no_grad():
        ok = bool(torch.isfinite(hf_zoo.output(m, x)).all())
    return {"model": name, "param_ratio": round(sum(p.numel() for p in m.parameters()) / p0, 4),
            "attention_modules_losing_heads": f"{sum(rows1[n] < rows0[n] for n in rows0)}/{len(rows0)}",
            "pruned": pruned, "left_out_by_run_check": len(plan.info.get("dropped", [])), "runs": ok,
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
