"""Packaging: everything on CPU works without triton installed (it is the `gpu` extra), and asking for
the Triton backend then says how to get it. `import tritonprune` loads no framework."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on a CPU-only install
import torch
from torch import nn
import tritonprune as tpr

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                      nn.Linear(16, 2))
x = torch.randn(2, 3, 6, 6)
assert len(tpr.find_groups(model, x)) == 2
for backend in ("auto", "torch"):
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, x,
                                   regularizer=tpr.GroupNorm(reg=1e-3), backend=backend)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
plan = tpr.prune(model, x, ratio=0.5, optimizer=opt)
assert model[0].out_channels == 4 and plan.num_removed == 6
model(x).sum().backward()
opt.step()
try:  # refused at construction, before anything could step
    tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, x,
                             regularizer=tpr.GroupNorm(reg=1e-3), backend="triton")
except ValueError as e:
    assert "pip install 'tritonprune[gpu]'" in str(e), e
else:
    raise AssertionError("backend='triton' without triton did not fail")
for name in ("triton", "transformers", "accelerate", "lightning", "torch_pruning", "matplotlib"):
    assert sys.modules.get(name) is None, name
print("ok")
"""


def test_cpu_paths_work_without_triton():
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITONPRUNE_NATIVE="0", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_triton_is_an_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not any(d.lower().startswith("triton") for d in project["dependencies"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["gpu"])


def test_bench_says_threads_and_what_is_missing(capsys, monkeypatch):
    import importlib.util

    from tritonprune.app.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_pruning" else find_spec(name, *a))
    threads = __import__("torch").get_num_threads()
    try:
        assert main(["bench", "--sizes", "4", "--min-time", "0.001", "--quiet"]) == 0
        assert __import__("torch").get_num_threads() == 1  # the default, like the demo
    finally:
        __import__("torch").set_num_threads(threads)
    out = capsys.readouterr().out
    assert "1 threads" in out
    assert "torch-pruning is not installed: its rows are left out" in out
    assert "| torch-pruning" not in out and "tritonprune[torch]" in out
