"""Time one regularization call, the tritonprune way and the others, for `tritonprune bench` and bench/.

Methods, all adding the same GroupNorm term to the same gradients of the same model:

  tritonprune[<backend>]  `RegularizedOptimizer.regularize()` (backends: torch; triton on CUDA; reference)
  torch-pruning           `GroupNormPruner.regularize(model)` of Torch-Pruning 1.6.1, its documented use
  naive loop              what one writes by hand: per group, per tensor, slice views in a Python loop
  sgd step                the inner `SGD(momentum=0.9).step()`, the cost the term should be small beside

Models: `SmallResNet(width=w)` (stem, three stages, widths w / 2w / 4w): the size grows as w^2.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..graph.geometry import slot_geometry, slot_view
from ..graph.group import BATCHNORM, CONV, CONV_T, LAYERNORM, LINEAR
from .examples import SmallResNet

DEFAULT_WIDTHS = (16, 32, 64)
REG = 1e-4


@dataclass
class Timing:
    width: int
    params: int
    groups: int
    method: str
    median_ms: float
    iqr_ms: float
    rounds: int
    vs_tritonprune: float | None = None  # this method's time / tritonprune[torch]'s (or the first backend's)
    vs_sgd_step: float | None = None     # this method's time / the SGD step's


def time_ms(fn: Callable[[], object], min_time: float = 0.3, min_rounds: int = 5, max_rounds: int = 200,
            warmup: int = 2, sync: Callable[[], None] = lambda: None) -> tuple[float, float, int]:
    """(median, interquartile range, rounds) of `fn` in ms; rounds until `min_time` seconds have passed."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < min_time and len(times) < max_rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0], len(times)


def naive_group_norm(model: nn.Module, groups, reg: float = REG, alpha: float = 4.0) -> Callable[[], None]:
    """A hand-written GroupNorm regularizer: a Python loop over groups and their tensors (same maths)."""
    params = dict(model.named_parameters())
    importance = (CONV, CONV_T, LINEAR, BATCHNORM, LAYERNORM)
    update = (CONV, CONV_T, LINEAR, BATCHNORM)
    plan = []
    for g in groups:
        slots = [s for s in g.slots if not s.is_buffer and not s.is_bias and s.kind in importance and s.name in params]
        plan.append((g.size, [(s, params[s.name], slot_geometry(params[s.name], s)) for s in slots]))

    @torch.no_grad()
    def step() -> None:
        for size, slots in plan:
            sq = torch.zeros(size)
            for s, p, geo in slots:
                sq[s.offset : s.offset + s.length] += slot_view(p.detach(), geo).float().pow(2).sum((1, 3)).reshape(-1)
            n = sq.sqrt()
            spread = n.max() - n.min()
            gamma = 2.0 ** (alpha * (n.max() - n) / spread) if size > 1 and spread > 0 else torch.ones(size)
            for s, p, geo in slots:
                if s.kind in update and p.grad is not None:
                    c = gamma[s.offset : s.offset + s.length].view(geo.G, 1, geo.C, 1)
                    slot_view(p.grad, geo).add_(reg * c * slot_view(p.detach(), geo))

    return step


def _setup(width: int, device: torch.device):
    import tritonprune as tpr

    torch.manual_seed(0)
    model = SmallResNet(width=width).to(device)
    x = torch.randn(2, 1, 8, 8, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = tpr.find_groups(model, x)
    model(x).sum().backward()
    return model, x, groups


def _tp_regularize(model: nn.Module, x: torch.Tensor) -> Callable[[], None] | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=REG, ignored_layers=[model.fc])
    return lambda: pruner.regularize(model)


def available_backends(device: torch.device) -> list[str]:
    from ..kernels import _has_triton

    return ["torch", "triton"] if device.type == "cuda" and _has_triton() else ["torch"]


def run(widths: Sequence[int] = DEFAULT_WIDTHS, backends: Sequence[str] | None = None, device: str = "cpu",
        torch_pruning: bool = True, naive: bool = True, min_time: float = 0.3,
        progress: Callable[[str], None] | None = None) -> list[Timing]:
    """Time every method on every width; ratios are against the first backend measured in the same run."""
    import tritonprune as tpr

    dev = torch.device(device)
    backends = list(backends or available_backends(dev))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    out: list[Timing] = []
    for w in widths:
        model, x, groups = _setup(w, dev)
        nparams = sum(p.numel() for p in model.parameters())
        methods: list[tuple[str, Callable[[], object], dict]] = []
        sgd = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
        for b in backends:
            opt = tpr.RegularizedOptimizer(sgd, model, groups=groups, regularizer=tpr.GroupNorm(reg=REG), backend=b)
            # the reference backend loops over every channel in Python: few rounds are plenty
            kw = {"min_rounds": 2, "warmup": 1} if b == "reference" else {}
            methods.append((f"tritonprune[{b}]", opt.regularize, kw))
        if torch_pruning:
            fn = _tp_regularize(model, x)
            if fn is not None:
                methods.append(("torch-pruning", fn, {"min_rounds": 3, "warmup": 1}))
        if naive:
            methods.append(("naive loop", naive_group_norm(model, groups), {}))
        methods.append(("sgd step", sgd.step, {}))
        rows = []
        for name, fn, kw in methods:
            if progress:
                progress(f"width {w}: {name}")
            med, iqr, rounds = time_ms(fn, min_time=min_time, sync=sync, **kw)
            rows.append(Timing(w, nparams, len(groups), name, med, iqr, rounds))
        base, step = rows[0].median_ms, rows[-1].median_ms
        for r in rows:
            r.vs_tritonprune = r.median_ms / base
            r.vs_sgd_step = r.median_ms / step
        out += rows
    return out


def table(rows: Sequence[Timing]) -> str:
    """Markdown table: one line per (width, method)."""
    head = ["model", "params", "groups", "method", "median ms", "IQR ms", "x tritonprune", "x SGD step"]
    body = [[f"SmallResNet w{r.width}", f"{r.params / 1e6:.2f}M", str(r.groups), r.method, f"{r.median_ms:.3f}",
             f"{r.iqr_ms:.3f}", f"{r.vs_tritonprune:.2f}", f"{r.vs_sgd_step:.2f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)] if body else [len(h) for h in head]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


def cpu_accelerator() -> str:
    """'on', or 'off: <why>' for the torch backend's C loops (kernels/cpu_native)."""
    from ..kernels import cpu_native

    why = cpu_native.why_unavailable()
    return "on" if why is None else f"off: {why}"


def to_json(rows: Sequence[Timing]) -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_accelerator": cpu_accelerator(),
        "reg": REG,
        "rows": [asdict(r) for r in rows],
    }
