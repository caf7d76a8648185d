"""The vision sweep: prune a torchvision / timm classifier and check that the pruned model runs.

Shared by tests/test_torchvision_sweep.py, tests/test_timm_families.py and bench/vision_sweep.py (which
writes bench/results/vision_sweep_*.json). One call per model: find_groups on the model in eval mode,
a plan at ratio 0.5, zero_ then apply on the same model (so no copy is made: on exact groups the
applied model must give the zeroed model's output), then an eval forward and one SGD step in train
mode on the pruned model.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import tritonprune as tpr


@dataclass
class Result:
    model: str
    size: int
    params_before: int = 0
    params_after: int = 0
    groups: int = 0
    exact: bool = True
    apply_vs_zero: float | None = None  # max |apply - zero_| on exact groups
    runs: bool = False  # eval forward after pruning
    trains: bool = False  # train-mode forward, backward and SGD step after pruning
    refused: str | None = None  # the library's error, where it refuses the model
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # CPU seconds of this process (the machine may be shared)

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["param_ratio"] = round(self.param_ratio, 4)
        return d


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]  # GoogLeNet / Inception named tuples: the main head first


def sweep_one(name: str, model: nn.Module, size: int, batch: int = 2) -> Result:
    """Prune `model` in place at ratio 0.5 and check that it runs; raises on a pruned model that breaks."""
    t0 = time.process_time()
    torch.manual_seed(0)
    r = Result(name, size)
    model.eval()
    x = torch.randn(batch, 3, size, size)
    r.params_before = sum(p.numel() for p in model.parameters())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups = tpr.find_groups(model, x)
            plan = tpr.prune(model, x, ratio=0.5, groups=groups, dry_run=True)
    except (ValueError, tpr.TraceError) as e:  # a clear refusal is an allowed outcome
        r.refused = f"{type(e).__name__}: {e}"
        r.seconds = time.process_time() - t0
        return r
    r.warnings = sorted({str(w.message)[:200] for w in caught if "tritonprune" in str(w.message)})
    r.groups = len(groups)
    r.exact = all(g.exact for g in groups)
    with torch.no_grad():
        plan.zero_(model)
        zeroed = _logits(model(x)) if r.exact else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan.apply(model)
        r.params_after = sum(p.numel() for p in model.parameters())
        out = _logits(model(x))
    r.runs = True
    if zeroed is not None:
        r.apply_vs_zero = float((out - zeroed).abs().max())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = model(x)
    loss = sum(_logits(o).float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    opt.step()
    r.trains = True
    r.seconds = time.process_time() - t0
    return r
