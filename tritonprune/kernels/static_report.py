"""Compile the Triton backend's kernels for a GPU without one, and cost them from their machine code.

    python -m tritonprune.kernels.static_report --arch sm_90 --out DIR

builds the HF ResNet-50 and ViT-B models from their transformers configs (fp32 and bf16), lists every
kernel specialization the Triton backend launches on them for the three regularizers (coupled and
decoupled), compiles each with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` (the
ptxas of the triton wheel; no GPU, no driver), writes each cubin into DIR and `DIR/report.json` (a list, one row per
kernel specialization and arch; `DIR/summary.json` says what was compiled with what), and prints a table. From the SASS (`cuobjdump -sass`, bundled with triton) it finds the hot loop (the
innermost loop with the most 16-byte global loads, else the largest innermost loop) and counts
instructions per element processed: loop instructions / elements each thread handles per iteration.

This is a static model, not a timing: it says how many instructions the SM issues per element, which
bounds the kernel only when issue, not memory, is the limit (an H200 issues ~33 T lane-instructions/s
against 4.8 TB/s: ~7 per byte moved, ~28 per fp32 element the sums read, ~83 per fp32 element the
update reads, reads and writes back; half that in bf16).

The same functions serve tests/test_triton_aot.py (`model_launch_specs`, `compile_specs`). Compilation
needs a process where triton was imported without TRITON_INTERPRET=1 (`--specs` runs a list of
specializations given as JSON for that reason).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .._files import write_json
from .layout import GroupBuffers
from .triton_plan import NUM_WARPS, Spec

# (regularizer name for launch_specs, decoupled)
REGULARIZERS = (("group_norm", False), ("group_norm", True), ("group_lasso", False), ("group_lasso", True),
                ("bn_scale", False), ("bn_scale", True))
TARGETS = {"sm_80": 80, "sm_90": 90}
THREADS = 32 * NUM_WARPS
KEYS = ("kernel", "kind", "specialization", "cubin", "registers", "spills", "hot_loop_instructions",
        "elements_per_thread_per_iteration", "instructions_per_element")


def _regularizer(name: str, decoupled: bool):
    from ..regularizing.regularizers import BNScale, GroupLasso, GroupNorm

    cls = {"group_norm": GroupNorm, "group_lasso": GroupLasso, "bn_scale": BNScale}[name]
    return cls(decoupled=decoupled)


def model_launch_specs(model: torch.nn.Module, groups, dtypes=(torch.float32, torch.bfloat16),
                       regularizers=REGULARIZERS) -> list[Spec]:
    """Every kernel specialization the Triton backend launches for `model` (its `groups`) in each dtype
    and regularizer, without launching: the plans are built on the host from the buffers' structure."""
    from . import triton_impl as ti

    specs: dict[Spec, None] = {}
    for dtype in dtypes:
        m = model if dtype is None else _cast(model, dtype)
        for name, decoupled in regularizers:
            bufs = GroupBuffers.build(m, groups, _regularizer(name, decoupled).select)
            for s in ti.launch_specs(bufs, name, decoupled):
                specs.setdefault(s, None)
    return list(specs)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    import copy

    return copy.deepcopy(model).to(dtype)


# ------------------------------------------------------------------------------------------ compile


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"tritonprune.kernels.static_report: {path} is missing; this triton wheel has no {name}")
    return str(path)


@functools.cache
def _compiled(spec: Spec, cc: int) -> bytes:
    """The cubin of `spec` for compute capability `cc` (cached for the process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_impl as ti

    kernels = _kernels()
    args = ti.SIGNATURES[spec.kernel]
    consts = dict(spec.constexprs)
    sig = dict(args)
    sig.update({k: "constexpr" for k in consts})
    # tensors from torch's allocator are 16-byte aligned: the launcher specializes them so at run time
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(args.values()) if t.startswith("*")}
    num_warps = NUM_WARPS
    src = ASTSource(kernels[spec.kernel], sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps}).asm["cubin"]


@functools.lru_cache(maxsize=1)
def _kernels() -> dict:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.standard.sum, InterpretedFunction):
        raise RuntimeError("tritonprune.kernels.static_report: triton was imported with TRITON_INTERPRET=1; compile "
                           "in a process without it (`python -m tritonprune.kernels.static_report --specs FILE`)")
    from . import triton_impl as ti

    return ti.compiled_kernels()


# ------------------------------------------------------------------------------------------- SASS

_INSN = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def resources_of(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"tritonprune.kernels.static_report: no resource usage in cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def loops_of(sass: str) -> list[list[str]]:
    """Bodies of the innermost loops (a backward branch and what lies between its target and it)."""
    insns = [(int(m.group(1), 16), m.group(2)) for m in map(_INSN.match, sass.splitlines()) if m]
    spans = []
    for addr, text in insns:
        b = _BRANCH.search(text)
        if b and int(b.group(1), 16) < addr:  # (the `BRA` to itself after EXIT is no loop)
            spans.append((int(b.group(1), 16), addr))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [[t for a, t in insns if lo <= a <= hi] for lo, hi in inner]


def _vector_loads(body: list[str]) -> int:
    return sum(1 for t in body if re.search(r"\bLDG\b.*\.(128|ENL2\.256)", t) or re.search(r"LDG\.E\.128", t))


def elements_per_thread(spec: Spec) -> int:
    """Elements one thread handles in one iteration of the kernel's hot loop."""
    c = dict(spec.constexprs)
    if spec.kernel in ("mat_sums", "mat_update"):
        return c["BR"] * c["VEC"]
    if spec.kernel == "slot_sums":
        return max(1, c["BLOCK_C"] * c["BLOCK_K"] // THREADS)
    return max(1, c.get("BLOCK", THREADS) // THREADS)


def analyse(spec: Spec, cubin: bytes) -> dict:
    sass = sass_of(cubin)
    res = resources_of(cubin)
    loops = loops_of(sass)
    if loops:
        hot = max(loops, key=lambda b: (_vector_loads(b), len(b)))
    else:  # straight-line kernel: one pass
        hot = [t for m in map(_INSN.match, sass.splitlines()) if m for t in [m.group(2)]]
    spills = sum(1 for line in sass.splitlines() if re.search(r"\b(STL|LDL)\b", line))
    n = elements_per_thread(spec)
    return {
        "registers": res["registers"],
        "spills": spills + res["local"],
        "hot_loop_instructions": len(hot),
        "hot_loop_vector_loads": _vector_loads(hot),
        "elements_per_thread_per_iteration": n,
        "instructions_per_element": round(len(hot) / n, 2),
    }


def cubin_name(spec: Spec, arch: str) -> str:
    h = hashlib.sha1(spec.label.encode()).hexdigest()[:10]
    return f"{spec.kernel}_{arch}_{h}.cubin"


def compile_specs(specs, arch: str, out: Path | None = None) -> list[dict]:
    """Compile every spec for `arch` ("sm_80" | "sm_90"); one report row each (cubins into `out`)."""
    cc = TARGETS[arch]
    rows = []
    for spec in specs:
        cubin = _compiled(spec, cc)
        name = cubin_name(spec, arch)
        if out is not None:
            (out / name).write_bytes(cubin)
        row = {"kernel": spec.kernel, "kind": spec.kind, "specialization": dict(spec.constexprs), "cubin": name,
               "arch": arch}
        row.update(analyse(spec, cubin))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ models


def _torchvision_or_stub() -> None:
    """transformers imports torchvision when it is installed; a torchvision wheel built for another torch
    fails while registering its compiled ops, which no model here needs: load it without them."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        import types

        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    except ImportError:
        pass


def hf_models() -> dict:
    """The HF ResNet-50 and ViT-B/16 from their default transformers configs, random weights."""
    _torchvision_or_stub()
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    return {"resnet50": (ResNetForImageClassification(ResNetConfig()).eval(), (x,)),
            "vit_b16": (ViTForImageClassification(ViTConfig()).eval(), (x,))}


def targets_met(row: dict) -> bool:
    limit = {"sums": 6.0, "update": 16.0}.get(row["kind"])
    return row["spills"] == 0 and (limit is None or row["instructions_per_element"] <= limit)


def table(rows: list[dict]) -> str:
    head = f"{'kernel':<12} {'kind':<7} {'dtype':<5} {'specialization':<44} {'regs':>4} {'spill':>5} " \
           f"{'loop':>5} {'el/thr':>6} {'ins/el':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        spec = dict(r["specialization"])
        dtype = {0: "fp32", 1: "fp16", 2: "bf16", 3: "fp64"}.get(spec.pop("DTYPE", None), "-")
        s = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items())
        lines.append(f"{r['kernel']:<12} {r['kind']:<7} {dtype:<5} {s:<44} {r['registers']:>4} {r['spills']:>5} "
                     f"{r['hot_loop_instructions']:>5} {r['elements_per_thread_per_iteration']:>6} "
                     f"{r['instructions_per_element']:>7.2f}  {'yes' if targets_met(r) else 'NO'}")
    return "\n".join(lines)


def _spec_from_json(d: dict) -> Spec:
    return Spec(d["kernel"], d["kind"], tuple((k, v) for k, v in d["constexprs"]))


def spec_to_json(s: Spec) -> dict:
    return {"kernel": s.kernel, "kind": s.kind, "constexprs": [list(kv) for kv in s.constexprs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritonprune.kernels.static_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90", help="comma-separated: sm_80, sm_90")
    ap.add_argument("--out", required=True, help="directory for the cubins and report.json")
    ap.add_argument("--specs", help="JSON file of specializations to compile instead of the HF models' own")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = {}
    if args.specs:
        specs = [_spec_from_json(d) for d in json.loads(Path(args.specs).read_text())]
    else:
        from ..graph import find_groups

        specs_d: dict[Spec, list[str]] = {}
        for name, (model, inputs) in hf_models().items():
            groups = find_groups(model, inputs)
            models[name] = {"groups": len(groups), "parameters": sum(p.numel() for p in model.parameters())}
            for s in model_launch_specs(model, groups):
                specs_d.setdefault(s, []).append(name)
        specs = list(specs_d)
    rows = []
    for arch in args.arch.split(","):
        rows += compile_specs(specs, arch.strip(), out)
    rows.sort(key=lambda r: ({"sums": 0, "update": 1}.get(r["kind"], 2), r["kernel"], r["arch"],
                             json.dumps(r["specialization"])))
    summary = {
        "note": "static model, not a timing: SASS instructions per element of each kernel's hot loop, compiled "
                "without a GPU (triton.compile for the target, cuobjdump -sass from the triton wheel)",
        "targets": {"sums_instructions_per_element": 6, "update_instructions_per_element": 16, "spills": 0},
        "triton": __import__("triton").__version__,
        "torch": torch.__version__,
        "models": models,
        "specializations": len(rows),
        "all_targets_met": all(targets_met(r) for r in rows),
        "compile_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "report.json", rows, strict=False)
    write_json(out / "summary.json", summary, strict=False)
    print(table(rows))
    print(f"\nstatic model, not a timing; {len(rows)} specializations, all targets met: {summary['all_targets_met']}; "
          f"report in {out / 'report.json'}")
    return 0 if summary["all_targets_met"] else 1


if __name__ == "__main__":  # pragma: no cover
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
