"""Does sparse training pay off? Dense -> L2 prune vs Torch-Pruning's GrowingRegPruner vs tritonprune's
recommended recipe (GrowingReg + the same allocation at prune), same fine-tune, two offline tasks
(bench/sparse_tasks.py: a char-level GPT on the stdlib's source, a CNN on digit-pair sums).

Every arm starts from the same dense checkpoint (N steps) and gets the same number of steps: M more
steps (dense for L2, with the regularizer for the sparse arms), prune, F fine-tune steps. CPU, one thread.

    python bench/bench_sparse_training.py            # 2 seeds, both tasks (~15-20 min on a busy 2-core box)
    python bench/bench_sparse_training.py --quick    # 1 seed, short phases (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_tasks as T  # noqa: E402

import tritonprune as tpr  # noqa: E402
from tritonprune.pruning.counting import count_macs  # noqa: E402

# per task: steps (dense N, sparse/continued M, fine-tune F), batch, lrs, the pruned architecture
TASKS = {
    "charlm": dict(N=400, M=200, F=100, batch=16, lr=2e-3, ft_lr=5e-4,
                   prune=dict(ratio=0.5, allocation="isomorphic",
                              kind_ratios={"residual": 0.0, "heads": 0.5, "mlp": 0.75})),
    "pairs": dict(N=600, M=300, F=150, batch=64, lr=3e-3, ft_lr=5e-4,
                    prune=dict(ratio=0.5, allocation="uniform")),
}
QUICK = dict(N=150, M=100, F=50)


class Task:
    def __init__(self, name: str):
        self.name = name
        if name == "charlm":
            self.data = T.CharData(ctx=64)
            self.example = (self.data.batch(torch.Generator().manual_seed(0), 1)[0],)
            self.val = self.data.val_batches(64, 8)
        else:
            self.data = T.PairData()
            self.example = (self.data.test[0][:1],)

    def model(self, seed: int):
        torch.manual_seed(seed)
        return T.CharGPT(self.data.vocab) if self.name == "charlm" else T.PairNet()

    def loss(self, model, batch):
        x, y = batch
        return T.lm_loss(model, x, y) if self.name == "charlm" else T.ce_loss(model, x, y)

    def batch(self, gen, size):
        return self.data.batch(gen, size)

    def metric(self, model) -> float:
        """charlm: validation loss (nats/char, lower is better); pairs: test accuracy (%)."""
        if self.name == "charlm":
            return T.val_loss(model, self.val)
        return T.accuracy(model, *self.data.test)

    def ignored(self, model):
        return [model.head] if self.name == "charlm" else [model.fc2]


def train(task, model, steps, lr, gen, batch, opt=None, hook=None):
    """AdamW with a cosine schedule over `steps`; `opt` may wrap the AdamW (RegularizedOptimizer)."""
    inner = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if opt is None else opt
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for i in range(steps):
        loss = task.loss(model, task.batch(gen, batch))
        loss.backward()
        if hook is not None:
            hook(i)
        inner.step()
        inner.zero_grad()
        sched.step()
    return inner


def macs(task, model) -> int:
    return count_macs(model, task.example).total


def finish(task, model, cfg, gen, rec, t0):
    rec["pruned"] = task.metric(model)
    rec["macs"] = macs(task, model)
    rec["params"] = sum(p.numel() for p in model.parameters())
    train(task, model, cfg["F"], cfg["ft_lr"], gen, cfg["batch"])
    rec["finetuned"] = task.metric(model)
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def arm_l2(task, dense_m, cfg, seed, prune_kw):
    t0 = time.time()
    m = copy.deepcopy(dense_m)
    rec = {"before": task.metric(m)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tpr.prune(m, task.example, ignored_layers=task.ignored(m), **prune_kw)
    return finish(task, m, cfg, torch.Generator().manual_seed(1000 + seed), rec, t0)


def arm_growing(task, dense, cfg, seed, delta):
    t0 = time.time()
    m = copy.deepcopy(dense)
    p = cfg["prune"]
    reg = tpr.GrowingReg(ratio=p["ratio"], allocation=p["allocation"], kind_ratios=p.get("kind_ratios"),
                         delta=delta, interval=10)
    opt = tpr.RegularizedOptimizer(torch.optim.AdamW(m.parameters(), lr=cfg["lr"], weight_decay=0.0), m,
                                   task.example, regularizer=reg, ignored_layers=task.ignored(m))
    train(task, m, cfg["M"], cfg["lr"], torch.Generator().manual_seed(500 + seed), cfg["batch"], opt=opt)
    rec = {"before": task.metric(m)}
    tpr.prune(m, task.example, optimizer=opt, **p)
    return finish(task, m, cfg, torch.Generator().manual_seed(1000 + seed), rec, t0)


def arm_groupnorm(task, dense, cfg, seed, reg):
    t0 = time.time()
    m = copy.deepcopy(dense)
    opt = tpr.RegularizedOptimizer(torch.optim.AdamW(m.parameters(), lr=cfg["lr"], weight_decay=0.0), m,
                                   task.example, regularizer=tpr.GroupNorm(reg=reg, decoupled=True),
                                   ignored_layers=task.ignored(m))
    train(task, m, cfg["M"], cfg["lr"], torch.Generator().manual_seed(500 + seed), cfg["batch"], opt=opt)
    rec = {"before": task.metric(m)}
    tpr.prune(m, task.example, optimizer=opt, **cfg["prune"])
    return finish(task, m, cfg, torch.Generator().manual_seed(1000 + seed), rec, t0)


def arm_tp(task, dense, cfg, seed, target_macs):
    """Torch-Pruning 1.6's GrowingRegPruner (its README recipe: reg 1e-4 growing by delta_reg every 10 steps)."""
    import torch_pruning as tp

    t0 = time.time()
    m = copy.deepcopy(dense)
    kw = {}
    if task.name == "charlm":
        heads = {}
        for blk in m.blocks:
            for lin in (blk.attn.q, blk.attn.k, blk.attn.v):
                heads[lin] = blk.attn.n_heads
        # the same architecture as the recipe: residual stream kept, heads 50%, MLP 75%
        kw = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5,
                  pruning_ratio_dict={blk.fc1: 0.75 for blk in m.blocks},
                  ignored_layers=[m.head] + [blk.attn for blk in m.blocks], pruning_ratio=0.0)
        kw["ignored_layers"] = [m.head]
        kw["pruning_ratio"] = 0.0
    else:
        kw = dict(ignored_layers=[m.fc2], pruning_ratio=0.5)
    pruner = tp.pruner.GrowingRegPruner(m, task.example[0], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                        reg=1e-4, delta_reg=1e-4, **kw)
    gen = torch.Generator().manual_seed(500 + seed)

    def hook(i):
        pruner.regularize(m)
        if i % 10 == 0:
            pruner.update_reg()

    train(task, m, cfg["M"], cfg["lr"], gen, cfg["batch"], hook=hook)
    rec = {"before": task.metric(m)}
    pruner.step()
    if task.name == "charlm":
        for blk in m.blocks:  # Torch-Pruning prunes heads in the Linear layers; the module keeps the count
            blk.attn.n_heads = pruner.num_heads.get(blk.attn.q, blk.attn.n_heads)
    return finish(task, m, cfg, torch.Generator().manual_seed(1000 + seed), rec, t0)


def run(task_name, seed, quick, arms, delta, gn_reg):
    cfg = dict(TASKS[task_name])
    if quick:
        cfg.update(QUICK)
    task = Task(task_name)
    t0 = time.time()
    dense = task.model(seed)
    train(task, dense, cfg["N"], cfg["lr"], torch.Generator().manual_seed(seed), cfg["batch"])
    out = {"dense_N": task.metric(dense), "macs_dense": macs(task, dense), "arms": {}}
    # the L2 arms' dense model gets the same M extra steps as the sparse arms
    cont = copy.deepcopy(dense)
    train(task, cont, cfg["M"], cfg["lr"], torch.Generator().manual_seed(500 + seed), cfg["batch"])
    out["dense_NM"] = task.metric(cont)
    print(f"[{task_name} seed {seed}] dense {out['dense_N']:.4f} -> {out['dense_NM']:.4f} ({time.time() - t0:.0f}s)",
          flush=True)
    res = out["arms"]
    if "growing" in arms:
        res["tritonprune GrowingReg"] = arm_growing(task, dense, cfg, seed, delta)
    target = res["tritonprune GrowingReg"]["macs"] if res else None
    if "l2" in arms:
        res["L2 (same allocation)"] = arm_l2(task, cont, cfg, seed, cfg["prune"])
        if task_name == "charlm" and target:
            res["L2 (uniform, same MACs)"] = arm_l2(task, cont, cfg, seed, dict(target_macs=target))
    if "groupnorm" in arms and task_name == "charlm":
        res["tritonprune GroupNorm"] = arm_groupnorm(task, dense, cfg, seed, gn_reg)
    if "tp" in arms:
        try:
            res["Torch-Pruning GrowingRegPruner"] = arm_tp(task, dense, cfg, seed, target)
        except Exception as e:  # reported, not hidden
            res["Torch-Pruning GrowingRegPruner"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    for k, v in res.items():
        print(f"  {k:34s} " + ("  ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"
                                          for a, b in v.items())), flush=True)
    return out


def table(results) -> str:
    lines = []
    for task_name, by_seed in results.items():
        unit = "val loss, nats/char (lower is better)" if task_name == "charlm" else "test accuracy % (higher is better)"
        seeds = sorted(by_seed)
        d0 = by_seed[seeds[0]]
        lines += [f"### {task_name}: {unit}; {len(seeds)} seed(s), min-max over seeds", "",
                  f"dense after N steps {_span([by_seed[s]['dense_N'] for s in seeds])}, after N+M "
                  f"{_span([by_seed[s]['dense_NM'] for s in seeds])}; dense MACs {d0['macs_dense'] / 1e6:.2f} M", "",
                  "| arm | before prune | right after prune | after fine-tune | MACs (M) | x fewer |",
                  "|---|---|---|---|---|---|"]
        for arm in d0["arms"]:
            recs = [by_seed[s]["arms"].get(arm, {}) for s in seeds]
            if any("error" in r for r in recs):
                lines.append(f"| {arm} | did not run: {recs[0].get('error', '')[:80]} | | | | |")
                continue
            mc = recs[0]["macs"]
            lines.append(f"| {arm} | {_span([r['before'] for r in recs])} | {_span([r['pruned'] for r in recs])} | "
                         f"{_span([r['finetuned'] for r in recs])} | {mc / 1e6:.2f} | {d0['macs_dense'] / mc:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _span(xs) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--tasks", nargs="+", default=["charlm", "pairs"])
    ap.add_argument("--arms", nargs="+", default=["growing", "l2", "tp", "groupnorm"])
    ap.add_argument("--delta", type=float, default=2e-2)
    ap.add_argument("--gn-reg", type=float, default=0.3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    seeds = a.seeds or ([0] if a.quick else [0, 1])
    results = {}
    t0 = time.time()
    for task_name in a.tasks:
        results[task_name] = {s: run(task_name, s, a.quick, a.arms, a.delta, a.gn_reg) for s in seeds}
    md = table(results)
    print(md)
    print(f"total {time.time() - t0:.0f}s")
    if a.out:
        meta = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": 1,
                "config": {k: TASKS[k] for k in a.tasks}, "quick": a.quick, "delta": a.delta, "gn_reg": a.gn_reg,
                "seconds": round(time.time() - t0)}
        with open(a.out + ".json", "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(f"`{meta['command']}` ({meta['seconds']} s, CPU, 1 thread)\n\n" + md)


if __name__ == "__main__":
    main()
