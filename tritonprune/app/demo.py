"""`tritonprune demo`: what sparse training buys, on real data, in a few minutes of CPU.

A small ResNet learns scikit-learn's bundled digits three ways:

  dense         plain training (SGD, weight decay);
  sparse+prune  the same training through `tpr.RegularizedOptimizer` (GroupNorm by default), then half
                of every group's channels removed with `tpr.prune(..., optimizer=opt)` (the momentum
                state is sliced along), then a short fine-tune;
  l2+prune      the dense model pruned the same way by plain L2 magnitude, then the same fine-tune.

It prints accuracy (before and after the fine-tune), params, MACs, CPU latency per batch and the
regularizer's share of the training step, and writes a figure and the numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tritonprune as tpr

from .._files import write_json, write_text
from ..pruning.counting import count_macs, count_params
from ..pruning.importance import compute_importance
from .demo_config import REGULARIZERS, DemoConfig  # noqa: F401  (torch-free: the CLI parses with it)
from .examples import SmallResNet, load_digits


@dataclass
class Row:
    name: str
    acc: float                      # final accuracy (after the fine-tune for pruned models)
    acc_pruned: float | None        # right after pruning, before the fine-tune
    params: int
    macs: int                       # per image
    latency_ms: float               # median forward time per test batch
    reg_share: float | None = None  # regularize() time / whole train step time
    reg_ms: float | None = None     # regularize() per step
    step_ms: float | None = None    # forward + backward + opt.step per step
    history: list[float] = field(default_factory=list)  # test accuracy per epoch


# ------------------------------------------------------------------------------------------ utilities


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Progress:
    """tqdm when it is installed (a dev dependency), plain prints otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=f"{desc:<13}", unit="step", leave=True, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def epoch(self, epoch: int, epochs: int, loss: float, acc: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{loss:.3f}", acc=f"{acc:.3f}")
        elif self.enabled:
            print(f"{self.desc:<13} epoch {epoch}/{epochs}  loss {loss:.3f}  test acc {acc:.3f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


@torch.no_grad()
def latency_ms(models: list[nn.Module], batch: torch.Tensor, runs: int) -> list[float]:
    """Median wall time of one forward pass on `batch` (eval mode) per model, after two warm-up passes.

    The models take turns, run after run, so that a busy machine slows them all alike.
    """
    for m in models:
        m.eval()
        for _ in range(2):
            m(batch)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for m, t in zip(models, times):
            _sync(batch.device)
            t0 = time.perf_counter()
            m(batch)
            _sync(batch.device)
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def channel_norms(model: nn.Module, groups) -> list[torch.Tensor]:
    """Per group, each channel's L2 norm over the group's weights (RMS over the tensors of the group)."""
    return [imp.sqrt() for imp in compute_importance(model, groups, "l2", normalizer=None) if imp is not None]


class _TimedRegularize:
    """Wraps `opt.regularize` (which `opt.step()` calls) to time it without changing the training loop."""

    def __init__(self, opt: tpr.RegularizedOptimizer, device: torch.device):
        self.inner, self.device, self.seconds, self.calls = opt.regularize, device, 0.0, 0
        opt.regularize = self  # instance attribute: step() looks it up on self first

    def __call__(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        self.inner()
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1


def train(model, opt, data, epochs: int, lr: float, batch_size: int, desc: str, progress: bool,
          seed: int) -> tuple[list[float], float, int]:
    """SGD epochs with a cosine learning rate; returns (test accuracy per epoch, step seconds, steps)."""
    x_tr, y_tr, x_te, y_te = data
    device = x_tr.device
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    for g in opt.param_groups:
        g["lr"] = lr
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    bar = _Progress(epochs * steps_per_epoch, desc, progress)
    history, step_s, steps = [], 0.0, 0
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(len(x_tr), generator=gen).to(device)
            total = 0.0
            for i in range(0, len(x_tr), batch_size):
                idx = perm[i : i + batch_size]
                _sync(device)
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                loss.backward()
                opt.step()  # a RegularizedOptimizer regularizes the gradients here
                opt.zero_grad()
                _sync(device)
                step_s += time.perf_counter() - t0
                steps += 1
                sched.step()
                total += float(loss.detach()) * len(idx)
                bar.update()
            history.append(evaluate(model, x_te, y_te))
            bar.epoch(epoch, epochs, total / len(x_tr), history[-1])
    finally:
        bar.close()
    return history, step_s, steps


# --------------------------------------------------------------------------------------------- demo


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run the three trainings; returns the results (rows, channel norms, timings, config)."""
    if cfg.regularizer not in REGULARIZERS:
        raise ValueError(f"demo: --regularizer must be one of {sorted(REGULARIZERS)}, got {cfg.regularizer!r}")
    if not 0 < cfg.ratio < 1:
        raise ValueError(f"demo: --ratio must be in (0, 1), got {cfg.ratio}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda was asked for but torch sees no CUDA device; use --device cpu")
    reg, importance = REGULARIZERS[cfg.regularizer]
    reg = cfg.reg if cfg.reg is not None else reg
    t_start = time.perf_counter()

    data = tuple(t.to(device) for t in load_digits(seed=cfg.seed, limit=cfg.train_limit))
    x_tr, _, x_te, y_te = data
    example = x_tr[:2]
    one = x_tr[:1]
    lat_batch = x_te[: cfg.batch_size]

    def fresh() -> nn.Module:
        torch.manual_seed(cfg.seed)  # the dense and sparse runs start from the same weights
        return SmallResNet(width=cfg.width).to(device)

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    def measure(name, model, acc, acc_pruned=None, history=()) -> Row:  # latency comes at the end
        return Row(name, acc, acc_pruned, count_params(model), count_macs(model, one).total, 0.0,
                   history=list(history))

    timings: dict[str, float] = {}
    rows: list[Row] = []

    # (a) dense
    dense = fresh()
    init_model = copy.deepcopy(dense)
    opt_dense = sgd(dense)
    t0 = time.perf_counter()
    hist, step_s, steps = train(dense, opt_dense, data, cfg.epochs, cfg.lr, cfg.batch_size, "dense", cfg.progress,
                                cfg.seed)
    timings["dense_train_s"] = time.perf_counter() - t0
    row = measure("dense", dense, hist[-1], history=hist)
    row.step_ms = step_s / steps * 1e3
    rows.append(row)

    # (b) sparse training, prune, fine-tune
    sparse = fresh()
    t0 = time.perf_counter()
    groups = tpr.find_groups(sparse, example)
    timings["find_groups_s"] = time.perf_counter() - t0
    if cfg.regularizer == "growing_reg":  # targeted: only the channels the ratio removes are pulled to 0
        regularizer = tpr.GrowingReg(ratio=cfg.ratio, delta=reg)
    else:
        regularizer = {"group_norm": tpr.GroupNorm, "bn_scale": tpr.BNScale,
                       "group_lasso": tpr.GroupLasso}[cfg.regularizer](reg=reg)
    opt = tpr.RegularizedOptimizer(sgd(sparse), sparse, groups=groups, regularizer=regularizer)
    timer = _TimedRegularize(opt, device)
    t0 = time.perf_counter()
    hist_s, step_s, steps = train(sparse, opt, data, cfg.epochs, cfg.lr, cfg.batch_size, "sparse", cfg.progress,
                                  cfg.seed)
    timings["sparse_train_s"] = time.perf_counter() - t0
    acc_sparse = hist_s[-1]
    norms_after = channel_norms(sparse, groups)
    t0 = time.perf_counter()
    plan_s = tpr.prune(sparse, example, ratio=cfg.ratio, optimizer=opt, importance=importance, groups=groups)
    timings["prune_s"] = time.perf_counter() - t0
    acc_b0 = evaluate(sparse, x_te, y_te)
    # fine-tune without the regularizer, with the (sliced) momentum of the sparse run
    hist_ft, _, _ = train(sparse, opt.optimizer, data, cfg.finetune_epochs, cfg.finetune_lr, cfg.batch_size,
                          "sparse ft", cfg.progress, cfg.seed + 1)
    row = measure(f"{cfg.regularizer} + prune", sparse, hist_ft[-1], acc_b0, hist_s + hist_ft)
    row.reg_ms = timer.seconds / max(1, timer.calls) * 1e3
    row.step_ms = step_s / steps * 1e3
    row.reg_share = timer.seconds / step_s
    rows.append(row)

    # (c) the dense model pruned by plain L2 magnitude, same fine-tune
    naive, opt_naive = copy.deepcopy((dense, opt_dense))  # together, so the state keys follow the params
    plan_n = tpr.prune(naive, example, ratio=cfg.ratio, optimizer=opt_naive, importance="l2", groups=groups)
    acc_c0 = evaluate(naive, x_te, y_te)
    hist_n, _, _ = train(naive, opt_naive, data, cfg.finetune_epochs, cfg.finetune_lr, cfg.batch_size, "l2 ft",
                         cfg.progress, cfg.seed + 1)
    rows.append(measure("l2 + prune (no sparse training)", naive, hist_n[-1], acc_c0, hist + hist_n))
    for row, ms in zip(rows, latency_ms([dense, sparse, naive], lat_batch, cfg.latency_runs)):
        row.latency_ms = ms
    timings["total_s"] = time.perf_counter() - t_start

    return {
        "config": asdict(cfg) | {"reg": reg, "importance": importance},
        "rows": [asdict(r) for r in rows],
        "dense_accuracy_before_prune": rows[0].acc,
        "sparse_accuracy_before_prune": acc_sparse,
        "norms": {
            "init": [t.tolist() for t in channel_norms(init_model, groups)],
            "dense": [t.tolist() for t in channel_norms(dense, groups)],
            "sparse": [t.tolist() for t in norms_after],
        },
        "groups": [g.origin for g in groups],
        "plans": {"sparse": plan_s.summary(), "l2": plan_n.summary()},
        "timings": timings,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


# ------------------------------------------------------------------------------------------ reports


def _fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(results: dict[str, Any]) -> str:
    """The results as a fixed-width text table (also valid Markdown)."""
    rows = results["rows"]
    dense = rows[0]
    head = ["model", "acc. pruned", "acc. final", "params", "MACs/img", "latency/batch", "reg. share of step"]
    lines = []
    for r in rows:
        share = "-" if r["reg_share"] is None else f"{100 * r['reg_share']:.1f}% ({r['reg_ms']:.2f} / {r['step_ms']:.1f} ms)"
        lines.append([
            r["name"], _fmt_acc(r["acc_pruned"]), _fmt_acc(r["acc"]),
            f"{r['params']:,} ({r['params'] / dense['params']:.2f}x)",
            f"{r['macs']:,} ({r['macs'] / dense['macs']:.2f}x)",
            f"{r['latency_ms']:.2f} ms ({r['latency_ms'] / dense['latency_ms']:.2f}x)",
            share,
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def report(results: dict[str, Any]) -> str:
    """The table and the two summary lines the demo prints (and the README shows, from a committed run)."""
    t, cfg = results["timings"], results["config"]
    return "\n".join([
        table(results),
        "",
        f"sparse training before pruning: {_fmt_acc(results['sparse_accuracy_before_prune'])} "
        f"(dense: {_fmt_acc(results['dense_accuracy_before_prune'])}); "
        f"latency: median of {cfg['latency_runs']} forward passes on a batch of {cfg['batch_size']}",
        f"time: {t['total_s']:.0f} s in all (dense training {t['dense_train_s']:.0f} s, sparse training "
        f"{t['sparse_train_s']:.0f} s, find_groups {t['find_groups_s']:.1f} s, prune {t['prune_s']:.1f} s)",
    ])


def figure(results: dict[str, Any], path: str) -> bool:
    """Channel-norm histograms per group and accuracy against params; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    norms, names = results["norms"], results["groups"]
    n = len(names)
    cols = 3
    nrows = math.ceil(n / cols)
    fig = plt.figure(figsize=(15, 2.6 * nrows + 0.6))
    grid = fig.add_gridspec(nrows, cols + 2)
    colors = {"init": "0.6", "dense": "tab:blue", "sparse": "tab:orange"}
    labels = {"init": "initialization", "dense": "after dense training",
              "sparse": f"after sparse training ({results['config']['regularizer']})"}
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        vals = {k: torch.tensor(norms[k][i]).clamp_min(1e-6) for k in ("init", "dense", "sparse")}
        lo = math.log10(min(float(v.min()) for v in vals.values()))
        hi = math.log10(max(float(v.max()) for v in vals.values()))
        bins = torch.logspace(lo, hi + 1e-6, 25).tolist()
        for k, v in vals.items():
            ax.hist(v.tolist(), bins=bins, alpha=0.55, color=colors[k], label=labels[k])
        ax.set_xscale("log")
        ax.set_title(f"{name} ({len(norms['init'][i])} ch.)", fontsize=9)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel("channels", fontsize=8)
    fig.axes[0].legend(fontsize=7, loc="upper left")
    ax = fig.add_subplot(grid[:, cols:])
    rows = results["rows"]
    dense = rows[0]
    ax.scatter([dense["params"]], [100 * dense["acc"]], s=70, color="tab:blue", label="dense", zorder=3)
    for r, c, shift in zip(rows[1:], ("tab:orange", "tab:red"), (0.96, 1.04)):
        x = r["params"] * shift  # both pruned models have the same size: side by side, not on top
        ax.scatter([x], [100 * r["acc_pruned"]], s=50, facecolors="none", edgecolors=c, zorder=3,
                   label=f"{r['name']}: right after pruning")
        ax.scatter([x], [100 * r["acc"]], s=70, color=c, zorder=3, label=f"{r['name']}: fine-tuned")
        ax.annotate("", xy=(x, 100 * r["acc"]), xytext=(x, 100 * r["acc_pruned"]),
                    arrowprops=dict(arrowstyle="->", color=c, alpha=0.6))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"digits, {100 * results['config']['ratio']:.0f}% of channels pruned")
    fig.suptitle("per-group channel norms (log scale): sparse training pushes the channels to drop towards zero",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- CLI


def main(args: argparse.Namespace) -> int:
    """Run the demo with arguments parsed (and checked) by `demo_config.add_arguments`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(ratio=args.ratio, regularizer=args.regularizer, reg=args.reg, finetune_lr=args.finetune_lr,
              device=args.device, seed=args.seed, out=args.out, progress=not args.no_progress)
    d = DemoConfig()
    if args.quick:
        cfg = DemoConfig.quick(**kw)
    else:
        cfg = DemoConfig(epochs=args.epochs, finetune_epochs=args.finetune_epochs, lr=args.lr, width=args.width, **kw)
    # explicit options win over --quick's sizes
    for name in ("epochs", "finetune_epochs", "lr", "width"):
        if args.quick and getattr(args, name) != getattr(d, name):
            setattr(cfg, name, getattr(args, name))

    print(f"tritonprune demo: SmallResNet(width={cfg.width}) on scikit-learn digits, {cfg.epochs} epochs, "
          f"{cfg.regularizer}, {100 * cfg.ratio:.0f}% of channels pruned, device {cfg.device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = run(cfg)
    results["threads"] = torch.get_num_threads()  # float32 sums (so accuracies) depend on it
    os.makedirs(cfg.out, exist_ok=True)
    text = table(results)
    print()
    print(report(results))
    write_json(os.path.join(cfg.out, "results.json"), results, strict=False)
    write_text(os.path.join(cfg.out, "table.md"), text + "\n")
    png = os.path.join(cfg.out, "demo.png")
    if figure(results, png):
        print(f"wrote {png}, {os.path.join(cfg.out, 'results.json')}, {os.path.join(cfg.out, 'table.md')}")
    else:
        print(f"matplotlib is not installed: no figure (pip install matplotlib); wrote "
              f"{os.path.join(cfg.out, 'results.json')}, {os.path.join(cfg.out, 'table.md')}")
    return 0
