"""The real-forward tracer (graph/record.py): the same groups as torch.export, and the user's model runs
exactly one normal forward (real tensors, its own hooks and caches), in any thread, under autocast."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import threading
import warnings

import hf_zoo
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from group_signatures import both_tracers, difference, signatures
from zoo import ZOO

import tritonprune as tpr


def quiet_groups(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tpr.find_groups(model, x, **kw)


# ---- the same groups as the torch.export tracer ------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_groups_match_export(name):
    model, x = ZOO[name]()
    old, new = both_tracers(model, x)
    assert old and not difference(old, new), difference(old, new)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "swin", "mixtral", "falcon", "whisper"])
def test_hf_groups_match_export(name):
    model, x, _ = hf_zoo.build(name)
    old, new = both_tracers(model, x)
    assert old and not difference(old, new), difference(old, new)


# ---- the model runs one normal forward, on real tensors -----------------------------------------------


class AnchorHead(nn.Module):
    """Caches a grid of anchors on its first forward at a given size (as Ultralytics' Detect does)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 6, 1)
        self.anchors = torch.empty(0)
        self.shape = None

    def forward(self, x):
        y = self.conv(x)
        if self.shape != y.shape[2:]:
            h, w = y.shape[2:]
            self.anchors = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).float()
            self.shape = y.shape[2:]
        return y + self.anchors.sum()


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = AnchorHead(12)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def _is_plain(t) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cpu"


def test_cached_attributes_stay_real_tensors():
    torch.manual_seed(0)
    model, x = Detector().eval(), torch.randn(2, 3, 8, 8)
    groups = tpr.find_groups(model, x)
    assert groups and _is_plain(model.head.anchors) and model.head.anchors.shape == (2, 8, 8)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, x,
                                   regularizer=tpr.GroupLasso(1e-4))
    tpr.prune(model, x, ratio=0.25, dry_run=True)
    assert _is_plain(model.head.anchors) and torch.equal(model.head.anchors[0, :, 0], torch.arange(8.0))
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    out = model(x)
    assert _is_plain(out) and torch.isfinite(out).all()
    tpr.prune(model, x, ratio=0.25, optimizer=opt)
    assert _is_plain(model(x))


def test_hooks_see_one_real_forward():
    torch.manual_seed(0)
    model, x = Detector().train(), torch.randn(2, 3, 8, 8)
    seen = []
    model.body.register_forward_hook(lambda m, a, out: seen.append((type(a[0]), type(out), a[0].device.type)))
    stats = model.body[1].running_mean.clone(), model.body[1].num_batches_tracked.clone()
    groups = tpr.find_groups(model, x)
    assert seen == [(torch.Tensor, torch.Tensor, "cpu")]
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.body[1].running_mean, stats[0]) and torch.equal(model.body[1].num_batches_tracked, stats[1])
    tpr.prune(model, x, ratio=0.25, groups=groups, dry_run=True)
    assert len(seen) == 1  # the run check works on a copy


def test_inputs_the_model_cannot_run_are_refused_before_any_change():
    torch.manual_seed(0)
    model, x = Detector().train(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: tpr.find_groups(model, x.double()), lambda: tpr.prune(model, x.double(), ratio=0.5)):
        with pytest.raises(tpr.TraceError, match=r"in module 'stem.0' \(op torch.conv2d\).*double"):
            call()
        now = model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in before.items()) and model.training


# ---- threads, autocast --------------------------------------------------------------------------------


def test_threads_give_the_sequential_result():
    builds = [lambda: ZOO["resnet_bottleneck"](), lambda: ZOO["mobilenet_v2"](), lambda: hf_zoo.build("bert")[:2]]
    models = [b() for b in builds]
    expected = [signatures(quiet_groups(m, x)) for m, x in models]
    plans = [tpr.prune(copy.deepcopy(m), x, ratio=0.3, dry_run=True).num_removed for m, x in models]
    got, removed, errors = [None] * 3, [None] * 3, []

    def work(i):
        try:
            m, x = models[i]
            for _ in range(3):
                got[i] = signatures(quiet_groups(m, x))
            removed[i] = tpr.prune(copy.deepcopy(m), x, ratio=0.3, dry_run=True).num_removed
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == expected and removed == plans


class Autocast(nn.Module):
    """A forward wrapped in autocast, as accelerate's prepare does under mixed precision."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)


def _strip(sigs, prefix="inner."):
    return [(*g[:4], g[4].removeprefix(prefix),
             tuple((s[0].removeprefix(prefix), s[1].removeprefix(prefix), *s[2:]) for s in g[5])) for g in sigs]


@pytest.mark.parametrize("name", ["resnet_bottleneck", "mlp", "bert"])
def test_autocast_forward_gives_the_same_groups(name):
    model, x = ZOO[name]() if name in ZOO else hf_zoo.build(name)[:2]
    plain = signatures(quiet_groups(model, x))
    wrapped = _strip(signatures(quiet_groups(Autocast(model), x)))
    assert plain and wrapped == plain


# ---- import cost -------------------------------------------------------------------------------------


def _added_modules(prelude: str = "") -> list[str]:
    code = (
        "import sys, torch\n" + prelude +
        "before = set(sys.modules)\n"
        "import tritonprune\n"
        "added = set(sys.modules) - before\n"
        "print(sorted(m for m in added if m.startswith(('torch._dynamo', 'torch.export', 'torch._export'))))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_tracing_imports_neither_dynamo_nor_export():
    # regularizing/engine.py's @torch.compiler.disable imports torch._dynamo at class definition (not this
    # issue's file): stand it in, and check that nothing else imports either
    prelude = "torch.compiler.disable = lambda fn=None, **k: fn if fn is not None else (lambda f: f)\n"
    assert _added_modules(prelude) == "[]"


def test_import_adds_neither_dynamo_nor_export():
    assert _added_modules() == "[]"


def test_second_mode_forward_runs_with_a_batch_of_one():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.aux = nn.Linear(8, 2)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1)
            return (self.fc(y), self.aux(y)) if self.training else self.fc(y)

    model = Aux().eval()
    stats = model.conv[1].running_var.clone()
    groups = tpr.find_groups(model, torch.randn(1, 3, 8, 8))
    assert any(s.name == "aux.weight" for g in groups for s in g.slots)
    assert not model.training and torch.equal(model.conv[1].running_var, stats)
