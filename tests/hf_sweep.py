"""Coverage sweep over the HF families of tests/hf_zoo.py (not a test; run by hand):

    OMP_NUM_THREADS=1 python tests/hf_sweep.py [names...] [--dims]

Per model: groups found (heads, MLP-like, residual), prune at 25% of every group, apply == zero_ on the
exact groups, forward, a training step, `generate` (decoders), plain save_pretrained/from_pretrained
and the tritonprune route."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import traceback
import warnings

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]
import hf_zoo  # noqa: E402

import tritonprune as tpr  # noqa: E402
from tritonprune.pruning.plan import PrunePlan  # noqa: E402


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:150]}" if str(e) else type(e).__name__


def sweep(name: str, mode: str) -> dict:
    r = {"model": name}
    m, x, kind = hf_zoo.build(name)
    try:
        gs = tpr.find_groups(m, x, head_pruning=mode)
    except Exception as e:
        r["groups"] = "FAIL " + short(e)
        return r
    experts = [g for g in gs if g.origin.endswith("experts")]
    heads = [g for g in gs if g not in experts and (g.unit > 1 or g.blocks > 1 or any(s.repeat > 1 for s in g.slots))]
    r["groups"] = (f"{len(gs)} ({len(heads)} attention, {len(experts)} experts, "
                   f"{sum(not g.exact for g in gs)} inexact)")
    ref = copy.deepcopy(m)
    try:
        plan = tpr.prune(m, x, ratio=0.25, groups=gs)
        r["prune"] = f"params {sum(p.numel() for p in ref.parameters())}->{sum(p.numel() for p in m.parameters())}"
    except Exception as e:
        r["prune"] = "FAIL " + short(e)
        return r
    try:
        ex = [i for i, g in enumerate(plan.groups) if g.exact]
        sub = PrunePlan(plan.model_class, [plan.groups[i] for i in ex], [plan.removed[i] for i in ex], plan.shapes)
        a, z = copy.deepcopy(ref), copy.deepcopy(ref)
        sub.apply(a)
        sub.zero_(z)
        r["apply=zero"] = f"{(hf_zoo.output(a, x) - hf_zoo.output(z, x)).abs().max():.1e}"
    except Exception as e:
        r["apply=zero"] = "FAIL " + short(e)
    try:
        y = hf_zoo.output(m, x)
        r["forward"] = "ok" if torch.isfinite(y).all() else "nonfinite"
    except Exception as e:
        r["forward"] = "FAIL " + short(e)
        return r
    try:
        m.train()
        out = m(**x, **hf_zoo.labels_for(kind, m, x))
        loss = out.loss if getattr(out, "loss", None) is not None else out[0].square().mean()
        loss.backward()
        torch.optim.SGD(m.parameters(), lr=1e-3).step()
        m.eval()
        r["train"] = "ok"
    except Exception as e:
        r["train"] = "FAIL " + short(e)
        m.eval()
    if kind in ("causal", "seq2seq"):
        try:
            inp = {k: v[:1] for k, v in x.items() if k != "decoder_input_ids"}
            for cache in (False, True):
                m.generate(**inp, max_new_tokens=3, do_sample=False, use_cache=cache)
            r["generate"] = "ok"
        except Exception as e:
            r["generate"] = "FAIL " + short(e)
    y = hf_zoo.output(m, x)
    with tempfile.TemporaryDirectory() as d:
        try:
            tpr.save_pretrained(m, d)
            back = tpr.from_pretrained(type(m), d).eval()
            diff = (hf_zoo.output(back, x) - y).abs().max()
            r["tpr reload"] = "ok" if diff < 1e-5 else f"DIFF {diff:.1e}"
        except Exception as e:
            r["tpr reload"] = "FAIL " + short(e)
            traceback.print_exc()
            return r
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = type(m).from_pretrained(d).eval()
            diff = (hf_zoo.output(back, x) - y).abs().max()
            r["plain reload"] = "ok" if diff < 1e-5 else f"SILENT DIFF {diff:.1e}"
        except Exception as e:
            r["plain reload"] = "refused (" + short(e)[:60] + ")"
    return r


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    mode = "dims" if "--dims" in sys.argv else "heads"
    warnings.simplefilter("ignore")
    hf_zoo.T.logging.set_verbosity_error()  # the mismatch tables of refused plain loads
    for n in args or hf_zoo.NAMES:
        try:
            r = sweep(n, mode)
        except Exception as e:
            r = {"model": n, "crash": short(e)}
        print(" | ".join(f"{k}: {v}" for k, v in r.items()), flush=True)
