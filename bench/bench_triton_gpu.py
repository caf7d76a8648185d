"""GPU benchmark of the Triton backend (skipped without CUDA), for ResNet-50-size (25.6M) and ViT-B-size
(86M) parameter sets, each regularizer:

- effective bandwidth: bytes that must move (importance weights read once for the sums; every updated
  element's w and grad read and grad written once) / time of one full regularization (all launches),
  against a measured device-to-device copy (`dst.copy_(src)`, 2 bytes moved per byte copied).
  Target: >= 60% of the copy bandwidth;
- against Torch-Pruning 1.6.1's `pruner.regularize(model)` on the same GPU. Target: >= 100x faster;
- against one fused AdamW step (`torch.optim.AdamW(fused=True)`) on the same parameters.
  Target: <= 0.6x its time.

Times are medians of CUDA-event-timed batches after warm-up (the device is synchronized around each
batch). Results go to bench/results/triton_gpu_<model>_<regularizer>.json with the device name and the
git commit. Run:

    python -m pytest bench/bench_triton_gpu.py --benchmark-only -s

Not measured yet: this file was written on a machine without a GPU (the kernels were only checked in
the Triton interpreter), so bench/results/ holds no GPU numbers until someone runs it on one.

CUDA graphs (reasoned, not run): a regularization step issues only kernel launches on the current
stream; it allocates with `torch.empty` (served from the graph's private pool while capturing), reads no
device memory on the host, and never synchronizes. Every launch takes its addresses from the pointer
table, so capturing `opt.step()` works provided the gradients keep their addresses across replays:
`zero_grad(set_to_none=False)` and a warm-up step before capture (so .grad exists and
`GroupBuffers.refresh_pointers` sees no change inside the capture). The regularizer's `reg`/`alpha` and
the decoupled mode's learning rates are baked into the captured graph (lr is copied to a device tensor
only when it changes, which must not happen during capture). The plan (work tables) is built on the
first call, on the host, from tensors it uploads with `.to(device)`: do that warm-up step outside the
capture, as torch requires for any lazily initialised state.

torch.compile (reasoned, not run): the Triton launchers read raw addresses from an int64 table and
launch `triton.jit` kernels through Python, which Dynamo does not trace as tensor dataflow. Compile the
forward/backward (the usual `torch.compile(model)`), and call `opt.step()` outside the compiled
function; if the step is inside one, decorate the regularization with `torch.compiler.disable` so the
graph breaks only around it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------------------- models


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn1(self.conv1(x)).relu()
        y = self.bn2(self.conv2(y)).relu()
        y = self.bn3(self.conv3(y))
        return (y + (x if self.down is None else self.down(x))).relu()


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout: stages [3, 4, 6, 3], widths 64..2048, 25.6M parameters."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for mid, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, stride if i == 0 else 1))
                cin = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViTB(nn.Module):
    """ViT-B/16 at 224x224: 12 blocks of width 768, 12 heads, MLP 3072, 86.6M parameters."""

    def __init__(self, d: int = 768, depth: int = 12, heads: int = 12, classes: int = 1000):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 197, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


MODELS = {
    "resnet50": (ResNet50, (2, 3, 64, 64), "fc"),
    "vit_b": (ViTB, (1, 3, 224, 224), "head"),
}
_CACHE: dict = {}


def setup(name: str, device: str = "cuda"):
    """(model with random .grad on `device`, example inputs, groups, head name); cached per process."""
    if name not in _CACHE:
        from tritonprune.graph import find_groups

        torch.manual_seed(0)
        make, shape, head = MODELS[name]
        model, x = make(), (torch.randn(shape),)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = find_groups(model, x)  # traced on CPU: the groups name tensors, not devices
        model = model.to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        _CACHE[name] = (model, tuple(t.to(device) for t in x), groups, head)
    return _CACHE[name]


# ---------------------------------------------------------------------------------------- timing


def cuda_ms(fn, reps: int = 20, trials: int = 7, warmup: int = 3) -> tuple[float, float]:
    """Median and spread (max - min) of the per-call time in ms over `trials` batches of `reps` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times), max(times) - min(times)


def copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), on a buffer of `nbytes`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms, _ = cuda_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def moved_bytes(bufs) -> int:
    """The least a step must move: every weight element it reads, once (importance or update); for every
    updated element, its grad read and written once. A weight in two slots (out-rows of one group,
    in-columns of another) counts once, so reading it twice shows up as lost efficiency."""
    from tritonprune.layout import FLAG_IMPORTANCE, FLAG_UPDATE

    read: dict[int, torch.Tensor] = {}
    upd: dict[int, torch.Tensor] = {}
    size: dict[int, int] = {}
    for (_, _, p), geo, f in zip(bufs.entries, bufs.geometries, bufs.flags):
        size[id(p)] = p.element_size()
        idx = torch.arange(p.numel()).as_strided((geo.G, geo.A, geo.C, geo.B),
                                                 (geo.stride_g, geo.stride_a, geo.stride_c, 1), geo.offset)
        idx = idx.reshape(-1)
        if f & FLAG_IMPORTANCE or (f & FLAG_UPDATE and p.grad is not None):
            read.setdefault(id(p), torch.zeros(p.numel(), dtype=torch.bool))[idx] = True
        if f & FLAG_UPDATE and p.grad is not None:
            upd.setdefault(id(p), torch.zeros(p.numel(), dtype=torch.bool))[idx] = True
    return (sum(int(m.sum()) * size[k] for k, m in read.items())
            + sum(int(m.sum()) * 2 * size[k] for k, m in upd.items()))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tp_pruner(model, x, head, kind):
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ign = [model.get_submodule(head)]
        if kind == "group_norm":
            return tp.pruner.GroupNormPruner(model, list(x), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                             reg=1e-4, ignored_layers=ign)
        return tp.pruner.BNScalePruner(model, list(x), importance=tp.importance.BNScaleImportance(), reg=1e-5,
                                       ignored_layers=ign, group_lasso=(kind == "group_lasso"))


def _regs():
    from tritonprune.regularizers import BNScale, GroupLasso, GroupNorm

    return {"group_norm": GroupNorm(1e-4), "bn_scale": BNScale(1e-5), "group_lasso": GroupLasso(1e-5)}


CASES = [("resnet50", k) for k in ("group_norm", "bn_scale", "group_lasso")] + [("vit_b", "group_norm")]


@pytest.mark.parametrize("name,kind", CASES)
def test_triton_gpu(benchmark, name, kind):
    from tritonprune.engine import Regularization

    model, x, groups, head = setup(name)
    eng = Regularization(model, groups, _regs()[kind], backend="triton")
    assert eng.buffers.device.type == "cuda"
    bufs = eng.buffers
    params = [p for p in model.parameters() if p.grad is not None]
    saved = [p.grad.clone() for p in params]

    with torch.no_grad():
        ours_ms, ours_spread = cuda_ms(eng.apply_to_grads)
    nbytes = moved_bytes(bufs)
    copy_gbs = copy_bandwidth(max(nbytes, 256 << 20))
    eff_gbs = nbytes / (ours_ms * 1e-3) / 1e9

    adam = torch.optim.AdamW(params, lr=1e-3, fused=True)
    adam_ms, adam_spread = cuda_ms(adam.step)
    with torch.no_grad():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    tp_ms = tp_spread = None
    try:
        pruner = tp_pruner(model, x, head, kind)
        tp_ms, tp_spread = cuda_ms(lambda: pruner.regularize(model), reps=1, trials=3, warmup=1)
    except Exception as e:  # Torch-Pruning fails on some models; record why
        tp_error = f"{type(e).__name__}: {e}"[:300]
    else:
        tp_error = None

    def step():
        eng.apply_to_grads()
        torch.cuda.synchronize()

    with torch.no_grad():
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)

    info = {
        "model": name, "regularizer": kind, "device": torch.cuda.get_device_name(),
        "commit": git_commit(), "torch": torch.__version__, "triton": __import__("triton").__version__,
        "params_M": round(sum(p.numel() for p in params) / 1e6, 2), "slots": bufs.n_slots,
        "ours_ms": round(ours_ms, 4), "ours_spread_ms": round(ours_spread, 4),
        "moved_MB": round(nbytes / 1e6, 1), "effective_GBs": round(eff_gbs, 1),
        "copy_GBs": round(copy_gbs, 1), "bandwidth_fraction": round(eff_gbs / copy_gbs, 3),
        "adamw_fused_ms": round(adam_ms, 4), "adamw_spread_ms": round(adam_spread, 4),
        "ratio_to_adamw": round(ours_ms / adam_ms, 3),
        "tp_ms": None if tp_ms is None else round(tp_ms, 2),
        "tp_spread_ms": None if tp_spread is None else round(tp_spread, 2),
        "speedup_vs_tp": None if tp_ms is None else round(tp_ms / ours_ms, 1), "tp_error": tp_error,
        "targets": {"bandwidth_fraction": ">= 0.6", "speedup_vs_tp": ">= 100", "ratio_to_adamw": "<= 0.6"},
    }
    benchmark.extra_info.update(info)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"triton_gpu_{name}_{kind}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"\n{name} {kind}: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "targets"))
    assert math.isfinite(ours_ms) and ours_ms > 0


def test_cuda_graph_capture():
    """Capture the regularization in a CUDA graph and replay it: same gradients as eager."""
    from tritonprune.engine import Regularization

    model, _, groups, _ = setup("resnet50")
    eng = Regularization(model, groups, _regs()["group_norm"], backend="triton")
    params = [p for p in model.parameters() if p.grad is not None]
    base = [p.grad.clone() for p in params]
    with torch.no_grad():
        eng.apply_to_grads()  # warm-up: plan, kernels compiled
        eager = [p.grad.clone() for p in params]
        for p, g in zip(params, base):
            p.grad.copy_(g)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            eng.apply_to_grads()  # side-stream warm-up, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        for p, g in zip(params, base):
            p.grad.copy_(g)
        with torch.cuda.graph(graph):
            eng.apply_to_grads()
        for p, g in zip(params, base):
            p.grad.copy_(g)
        graph.replay()
        torch.cuda.synchronize()
    for p, e in zip(params, eager):
        assert torch.equal(p.grad, e)


if __name__ == "__main__":  # quick CPU check of the setup (groups, byte counts), no timing
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for n in MODELS:
        from tritonprune.layout import GroupBuffers

        m, _, g, _ = setup(n, "cpu")
        b = GroupBuffers.build(m, g, _regs()["group_norm"].select)
        print(n, f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params, {len(g)} groups, "
              f"{b.n_slots} slots, {moved_bytes(b) / 1e6:.0f} MB to move per GroupNorm step")
