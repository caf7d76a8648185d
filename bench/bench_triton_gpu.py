"""GPU check and benchmark of the Triton backend, one call of at most ~8 minutes on an H100/H200:

    python bench/bench_triton_gpu.py            # or: python -m pytest bench/bench_triton_gpu.py -s

1. correctness on CUDA against the torch backend: every zoo model (tests/zoo.py), ResNet-50, ViT-B/16 and
   a Llama config (transformers; skipped if it is not installed), fp32 and bf16, the three regularizers,
   coupled and decoupled; each tensor by ||triton - torch|| / ||torch|| (fp32 <= 1e-5, bf16 <= 1e-2), NaN
   never passes, gradients drawn fresh (never zeros);
2. achieved bandwidth: the bytes one regularization must move (each read weight once; each updated grad
   read and written once) over its time (all launches replayed from a CUDA graph, so the kernels and not
   the host's launch overhead are timed; CUDA events, median of batches after warm-up; the eager time
   is recorded beside it), against a measured device-to-device copy of 1 GiB (bytes read + written).
   Target >= 60% of the copy;
3. against Torch-Pruning 1.6.1's `pruner.regularize(model)` on the same GPU and model. Target >= 100x;
4. against one `torch.optim.AdamW(fused=True)` step on the same parameters. Target <= 0.6x its time;
5. CUDA-graph capture of `opt.step()` (RegularizedOptimizer over SGD with momentum): replays equal the
   eager steps bitwise;
6. a `torch.compile`d training step (forward, backward, `opt.step()`; the regularization breaks the
   graph, by design) equals the eager one.

A short table comes last; everything goes to bench/results/triton_gpu_<device>.json with the device name,
versions and commit. Without CUDA it builds the models, groups and launch plans (host-side only), prints
the bytes each step must move, and says it skipped the GPU parts: that much runs on any machine.

Floors to hold the results against (bytes each step must move, fp32, from the dry run; an H200 copies
at about 4.8 TB/s on its datasheet, the script measures its own copy): GroupNorm on ResNet-50 306 MB
(~64 us), on ViT-B/16 1036 MB (~216 us), on the 4-layer Llama 639 MB (~133 us); bf16 halves them. The
kernels do no arithmetic worth counting (a few flops per byte), so the floor is memory; the static
model (bench/results/triton_static_sm90) puts the sums at 4.4 (fp32) / 5.2 (bf16) and the update at
6.0 / 8.2 SASS instructions per element, far under what an H200 issues per element at full bandwidth
(~33 T lane-instructions/s over 4.8 TB/s: ~7 per byte, so ~28 per fp32 element read by the sums, ~83 per
fp32 element read, read and written by the update). Known extra traffic: one fp32 column partial per 16 fp32 / 8 bf16 weight elements in the sums.

Status: written on a machine without a GPU (no GPU was lent for this work); nothing here has been run on
CUDA yet. See bench/results/triton_static_sm90/ for the static (compiled, not timed) model of the kernels.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT / "tests"))  # tests/zoo.py
sys.path.insert(0, str(ROOT))

REGS = ("group_norm", "bn_scale", "group_lasso")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


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


def _llama():
    """A 4-layer Llama (width 1024, GQA 16/4 heads, MLP 2816), or None without transformers."""
    try:
        from tritonprune.kernels.static_report import _torchvision_or_stub

        _torchvision_or_stub()
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception:  # noqa: BLE001 - optional
        return None
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=8000, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg).eval(), (torch.randint(0, 8000, (1, 32)),)


def big_models() -> dict:
    """name -> (model, example inputs, head module name for Torch-Pruning or None)."""
    torch.manual_seed(0)
    out = {"resnet50": (ResNet50(), (torch.randn(2, 3, 64, 64),), "fc"),
           "vit_b": (ViTB(), (torch.randn(1, 3, 224, 224),), "head")}
    llama = _llama()
    if llama is not None:
        out["llama_4l"] = (*llama, None)
    return out


_GROUPS: dict = {}


def groups_of(name: str, model: nn.Module, x) -> list:
    from tritonprune.graph import find_groups

    if name not in _GROUPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _GROUPS[name] = find_groups(model, x)  # traced on CPU: groups name tensors, not devices
    return _GROUPS[name]


def regularizer(kind: str, decoupled: bool = False):
    from tritonprune.regularizing.regularizers import BNScale, GroupLasso, GroupNorm

    return {"group_norm": GroupNorm(1e-4, decoupled=decoupled), "bn_scale": BNScale(1e-5, decoupled=decoupled),
            "group_lasso": GroupLasso(1e-5, decoupled=decoupled)}[kind]


def moved_bytes(bufs) -> int:
    """The least a step must move: every weight element it reads, once (importance or update); for every
    updated element, its grad read and written once. A weight in two slots counts once."""
    from tritonprune.kernels.layout import FLAG_IMPORTANCE, FLAG_UPDATE

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
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written) on a buffer of `nbytes`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms, _ = cuda_ms(lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------- parts


def _capture(fn) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # side-stream warm-up, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def check_correctness(models: dict, log) -> list[dict]:
    """triton vs torch backend on CUDA, every model x dtype x regularizer x (coupled, decoupled)."""
    from zoo import ZOO

    from tritonprune.regularizing.engine import Regularization

    rows = []
    cases = [(f"zoo:{n}", *ZOO[n](), None) for n in sorted(ZOO)] + [(n, m, x, h) for n, (m, x, h) in models.items()]
    for name, model, x, _ in cases:
        groups = groups_of(name, model, x)
        for dtype in (torch.float32, torch.bfloat16):
            base = copy.deepcopy(model).to(device="cuda", dtype=dtype)
            gen = torch.Generator(device="cuda").manual_seed(1)
            grads = {n: torch.randn(p.shape, generator=gen, device="cuda").to(dtype) for n, p in base.named_parameters()}
            for kind in REGS:
                for decoupled in (False, True):
                    out = {}
                    for backend in ("torch", "triton"):
                        m = copy.deepcopy(base)
                        for n, p in m.named_parameters():
                            p.grad = grads[n].clone()
                        eng = Regularization(m, groups, regularizer(kind, decoupled), backend=backend)
                        with torch.no_grad():
                            if decoupled:
                                eng.apply_decoupled({id(p): 0.1 for p in m.parameters()})
                            else:
                                eng.apply_to_grads()
                        torch.cuda.synchronize()
                        out[backend] = {n: (p.detach() if decoupled else p.grad).clone() for n, p in m.named_parameters()}
                    worst = max((_rel(out["triton"][n], out["torch"][n]) for n in out["torch"]), default=0.0)
                    ok = worst <= TOL[dtype]
                    rows.append({"model": name, "dtype": str(dtype)[6:], "regularizer": kind, "decoupled": decoupled,
                                 "max_rel_err": worst, "ok": ok})
                    if not ok:
                        log(f"MISMATCH {name} {dtype} {kind} decoupled={decoupled}: rel err {worst:.3g}")
    return rows


def _tp_pruner(model, x, head, kind):
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ign = [model.get_submodule(head)]
        if kind == "group_norm":
            return tp.pruner.GroupNormPruner(model, list(x), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                             reg=1e-4, ignored_layers=ign)
        return tp.pruner.BNScalePruner(model, list(x), importance=tp.importance.BNScaleImportance(), reg=1e-5,
                                       ignored_layers=ign, group_lasso=(kind == "group_lasso"))


def time_models(models: dict, copy_gbs: float, log) -> list[dict]:
    from tritonprune.regularizing.engine import Regularization

    rows = []
    for name, (model, x, head) in models.items():
        groups = groups_of(name, model, x)
        for dtype in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(model).to(device="cuda", dtype=dtype)
            params = list(m.parameters())
            for p in params:
                p.grad = torch.randn_like(p)
            adam = torch.optim.AdamW(params, lr=1e-3, fused=True)
            adam_ms, adam_spread = cuda_ms(adam.step)
            for kind in REGS:
                if kind != "group_norm" and not any(isinstance(mod, nn.modules.batchnorm._BatchNorm)
                                                    for mod in m.modules()):
                    continue
                eng = Regularization(m, groups, regularizer(kind), backend="triton")
                bufs = eng.buffers
                with torch.no_grad():
                    eager_ms, _ = cuda_ms(eng.apply_to_grads)  # with the host's launch overhead
                    graph = _capture(eng.apply_to_grads)  # the kernels alone, as a captured step runs them
                    ours_ms, ours_spread = cuda_ms(graph.replay)
                nbytes = moved_bytes(bufs)
                eff = nbytes / (ours_ms * 1e-3) / 1e9
                tp_ms = None
                tp_error = None
                if dtype == torch.float32 and head is not None:
                    try:
                        tm = copy.deepcopy(model).cuda()
                        for p in tm.parameters():
                            p.grad = torch.randn_like(p)
                        pruner = _tp_pruner(tm, tuple(t.cuda() for t in x), head, kind)
                        tp_ms, _ = cuda_ms(lambda pr=pruner, mm=tm: pr.regularize(mm), reps=1, trials=3, warmup=1)
                    except Exception as e:  # noqa: BLE001 - recorded, not fatal
                        tp_error = f"{type(e).__name__}: {e}"[:200]
                row = {"model": name, "dtype": str(dtype)[6:], "regularizer": kind,
                       "params_M": round(sum(p.numel() for p in params) / 1e6, 2), "slots": bufs.n_slots,
                       "ours_ms": round(ours_ms, 4), "ours_spread_ms": round(ours_spread, 4),
                       "ours_eager_ms": round(eager_ms, 4),
                       "moved_MB": round(nbytes / 1e6, 1), "effective_GBs": round(eff, 1),
                       "bandwidth_fraction": round(eff / copy_gbs, 3),
                       "adamw_fused_ms": round(adam_ms, 4), "adamw_spread_ms": round(adam_spread, 4),
                       "ratio_to_adamw": round(ours_ms / adam_ms, 3),
                       "tp_ms": None if tp_ms is None else round(tp_ms, 2),
                       "speedup_vs_tp": None if tp_ms is None else round(tp_ms / ours_ms, 1), "tp_error": tp_error}
                rows.append(row)
                log(f"{name} {row['dtype']} {kind}: {ours_ms:.3f} ms, {eff:.0f} GB/s "
                    f"({row['bandwidth_fraction']:.0%} of copy), AdamW x{row['ratio_to_adamw']}, TP x{row['speedup_vs_tp']}")
    return rows


def check_cuda_graph(model: nn.Module, x, groups) -> dict:
    """Capture RegularizedOptimizer(SGD momentum).step() in a CUDA graph; replays equal eager steps."""
    import tritonprune as tpr

    def make():
        m = copy.deepcopy(model).cuda()
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt = tpr.RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), m,
                                       regularizer=regularizer("group_norm"), groups=groups, backend="triton")
        return m, opt

    gen = torch.Generator(device="cuda").manual_seed(2)
    feeds = [[torch.randn(p.shape, generator=gen, device="cuda") for p in model.parameters()] for _ in range(6)]
    eager_m, eager_opt = make()
    graph_m, graph_opt = make()
    for m, opt in ((eager_m, eager_opt), (graph_m, graph_opt)):  # warm-up step: plans, state, compiled kernels
        for p, g in zip(m.parameters(), feeds[0]):
            p.grad.copy_(g)
        opt.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for p, g in zip(graph_m.parameters(), feeds[1]):
            p.grad.copy_(g)
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(s)
    for p, g in zip(eager_m.parameters(), feeds[1]):
        p.grad.copy_(g)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for feed in feeds[2:]:
        for p, g in zip(graph_m.parameters(), feed):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager_m.parameters(), feed):
            p.grad.copy_(g)
        eager_opt.step()
    torch.cuda.synchronize()
    equal = all(torch.equal(a, b) for a, b in zip(graph_m.parameters(), eager_m.parameters()))
    worst = max(_rel(a, b) for a, b in zip(graph_m.parameters(), eager_m.parameters()))
    replay_ms, _ = cuda_ms(graph.replay)
    eager_ms, _ = cuda_ms(eager_opt.step)
    return {"equal": equal, "max_rel_err": worst, "replay_ms": round(replay_ms, 4), "eager_ms": round(eager_ms, 4)}


def check_compiled_step(model: nn.Module, x, groups) -> dict:
    """A torch.compile'd training step (forward, backward, opt.step()) against the eager one."""
    import tritonprune as tpr

    x = tuple(t.cuda() for t in x)
    res = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(3)
        m = copy.deepcopy(model).cuda().train()
        opt = tpr.RegularizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), m,
                                       regularizer=regularizer("group_norm"), groups=groups, backend="triton")

        def train_step(m=m, opt=opt):
            out = m(*x)
            loss = (out.float() ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            return loss

        fn = torch.compile(train_step) if mode == "compiled" else train_step
        t0 = time.perf_counter()
        losses = [float(fn()) for _ in range(3)]
        torch.cuda.synchronize()
        res[mode] = (losses, [p.detach().clone() for p in m.parameters()], time.perf_counter() - t0)
    worst = max(_rel(a, b) for a, b in zip(res["compiled"][1], res["eager"][1]))
    return {"max_rel_err_params": worst, "ok": worst <= 1e-4, "losses_eager": res["eager"][0],
            "losses_compiled": res["compiled"][0], "compile_and_3_steps_s": round(res["compiled"][2], 1)}


# ------------------------------------------------------------------------------------------- main


def dry_run(models: dict, log) -> list[dict]:
    """What runs without a GPU: groups, buffers, launch plans (host-side), bytes per step."""
    from tritonprune.kernels import triton_impl as ti
    from tritonprune.kernels.layout import GroupBuffers

    rows = []
    for name, (model, x, _) in models.items():
        groups = groups_of(name, model, x)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for kind in REGS:
            bufs = GroupBuffers.build(model, groups, regularizer(kind).select)
            specs = ti.launch_specs(bufs, kind)
            rows.append({"model": name, "regularizer": kind, "slots": bufs.n_slots, "launches": len(specs),
                         "moved_MB_fp32": round(moved_bytes(bufs) / 1e6, 1)})
            log(f"{name} {kind}: {bufs.n_slots} slots, {len(specs)} launches per step, "
                f"{rows[-1]['moved_MB_fp32']} MB to move (fp32)")
    return rows


def main() -> int:
    t0 = time.perf_counter()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    models = big_models()
    if not torch.cuda.is_available():
        dry_run(models, log)
        log("no CUDA device: correctness, bandwidth, Torch-Pruning, AdamW, CUDA-graph and torch.compile parts skipped")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    device = torch.cuda.get_device_name()
    info = {"device": device, "commit": git_commit(), "torch": torch.__version__,
            "triton": __import__("triton").__version__}
    info["copy_GBs"] = round(copy_bandwidth(), 1)
    log(f"{device}: device-to-device copy {info['copy_GBs']} GB/s")
    info["correctness"] = check_correctness(models, log)
    info["timing"] = time_models(models, info["copy_GBs"], log)
    rn, rx, _ = models["resnet50"]
    info["cuda_graph"] = check_cuda_graph(rn, rx, groups_of("resnet50", rn, rx))
    from zoo import ZOO

    zm, zx = ZOO["resnet_bottleneck"]()
    info["torch_compile"] = check_compiled_step(zm, zx, groups_of("zoo:resnet_bottleneck", zm, zx))
    info["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in device).strip("_").lower()
    path = RESULTS / f"triton_gpu_{slug}.json"
    path.write_text(json.dumps(info, indent=1) + "\n")

    bad = [r for r in info["correctness"] if not r["ok"]]
    print(f"\n{device}, {info['seconds']} s, results in {path.relative_to(ROOT)}")
    print(f"correctness: {len(info['correctness']) - len(bad)}/{len(info['correctness'])} cases within tolerance"
          + (f"; worst {max(r['max_rel_err'] for r in bad):.3g}" if bad else ""))
    print(f"cuda graph of opt.step(): equal={info['cuda_graph']['equal']} "
          f"(replay {info['cuda_graph']['replay_ms']} ms vs eager {info['cuda_graph']['eager_ms']} ms); "
          f"torch.compile step: ok={info['torch_compile']['ok']}")
    head = (f"{'model':<9} {'dtype':<8} {'regularizer':<12} {'ms':>7} {'eager':>7} {'GB/s':>6} {'of copy':>7} "
            f"{'/AdamW':>6} {'x TP':>6}")
    print(head)
    for r in info["timing"]:
        print(f"{r['model']:<9} {r['dtype']:<8} {r['regularizer']:<12} {r['ours_ms']:>7.3f} {r['ours_eager_ms']:>7.3f} "
              f"{r['effective_GBs']:>6.0f} "
              f"{r['bandwidth_fraction']:>7.0%} {r['ratio_to_adamw']:>6.2f} {str(r['speedup_vs_tp']):>6}")
    print("targets: >= 60% of copy, >= 100x Torch-Pruning, <= 0.6x fused AdamW")
    return 0 if not bad and info["cuda_graph"]["equal"] and info["torch_compile"]["ok"] else 1


def test_bench_triton_gpu():
    """pytest entry: the whole run; skipped without CUDA (`python bench/bench_triton_gpu.py` then runs the
    host-side parts)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert main() == 0


if __name__ == "__main__":
    sys.exit(main())
