"""tritonprune command line: `demo` (the main job), `bench` (regularize timings), `inspect` (a model's groups).

    tritonprune demo                       sparse training vs plain pruning on digits (a few CPU minutes)
    tritonprune bench --sizes 16,32,64     regularize() against Torch-Pruning and a naive loop
    tritonprune inspect MODULE:FACTORY --input-shape 1,3,224,224
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import logging
import math
import os
import re
import sys
import warnings

from .._files import write_json
from .demo_config import at_least_one, number  # torch-free, like this module

# torch is imported by the commands, not here: the arguments are parsed (and bad ones refused, exit 2)
# first. --input-dtype names -> torch dtype attribute names
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64",
           "int32": "int32"}


def _fail(command: str, message: str) -> SystemExit:
    return SystemExit(f"tritonprune {command}: {message}")


def _load_factory(spec: str):
    """MODULE:FACTORY or path/to/file.py:FACTORY -> the callable (or nn.Module instance) it names."""
    if ":" not in spec:
        raise _fail("inspect", f"expected MODULE:FACTORY (e.g. tritonprune.examples:small_resnet), got {spec!r}")
    mod_name, attr = spec.rsplit(":", 1)
    if not mod_name or not attr:
        raise _fail("inspect", f"expected MODULE:FACTORY with both parts, got {spec!r}")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise _fail("inspect", f"no such file {mod_name!r}")
        loader_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        # like `python -m`, let modules of the current directory be found
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise _fail("inspect", f"cannot import {mod_name!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _fail("inspect", f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _build(spec: str):
    import torch

    obj = _load_factory(spec)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise _fail("inspect", f"{spec} is neither an nn.Module nor callable")
        try:
            obj = obj()
        except TypeError as e:
            raise _fail("inspect", f"{spec}() failed: {e} (the factory must build the model without arguments)") from e
    if not isinstance(obj, torch.nn.Module):
        raise _fail("inspect", f"{spec}() returned a {type(obj).__name__}, not an nn.Module")
    return obj


def _shape(text: str) -> tuple[int, ...]:
    parts = [s.strip() for s in re.split(r"[,x]", text.strip())]  # 1,3,224,224 or 1x3x224x224
    if not all(p.isdigit() for p in parts):  # an empty or non-numeric part is a typo, never skipped
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 1,3,224,224, got {text!r}")
    shape = tuple(int(p) for p in parts)
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 1,3,224,224, got {text!r}")
    return shape


def _ints(text: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 16,32,64, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive ints like 16,32,64, got {text!r}")
    return vals


_seconds = number(float, lambda v: math.isfinite(v) and v >= 0, "expected a finite number of seconds >= 0",
                  "expected a finite number of seconds >= 0")
_ratio = number(float, lambda r: 0 <= r < 1, "expected a number in [0, 1)", "expected a number in [0, 1)")


def group_table(groups) -> str:
    lines = [f"{'#':>4} {'origin':<40} {'size':>6} {'blocks':>6} {'slots':>6}  tensors"]
    for g in groups:
        names = ", ".join(dict.fromkeys(s.name for s in g.slots if not s.is_buffer))
        if len(names) > 70:
            names = names[:67] + "..."
        lines.append(f"{g.index:>4} {g.origin[:40]:<40} {g.size:>6} {g.blocks:>6} {len(g.slots):>6}  {names}")
    lines.append(f"{len(groups)} groups, {sum(g.size for g in groups)} prunable channels")
    return "\n".join(lines)


def _example_inputs(shapes: list[tuple[int, ...]], dtype):
    import torch

    def make(shape):
        if dtype.is_floating_point:
            return torch.randn(*shape, dtype=dtype)
        return torch.randint(0, 2, shape, dtype=dtype)  # token ids, masks: small valid values

    xs = [make(s) for s in shapes]
    return xs[0] if len(xs) == 1 else tuple(xs)


def _token_hint(model, dtype_name: str) -> str:
    """A hint for a model that reads token ids given the default float inputs."""
    import torch

    if dtype_name.startswith("float") or dtype_name == "bfloat16":
        embeddings = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
        if embeddings:
            return (f"; the model has an Embedding ({embeddings[0]!r}), which reads token ids: "
                    "try --input-dtype int64")
    return ""


@contextlib.contextmanager
def _torch_quiet():
    """Keep torch's own tracing chatter (graph dumps, symbolic-shape logs) off the terminal: our error says
    what went wrong. Warnings are shown once the call returns, one line each."""
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")
            yield
    finally:
        torch_log.setLevel(level)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def inspect(args: argparse.Namespace) -> int:
    import torch

    import tritonprune as tpr

    if args.model:
        if not args.input_shape:
            raise _fail("inspect", "give --input-shape for MODULE:FACTORY models (e.g. --input-shape 1,3,224,224)")
        model, shapes = _build(args.model), args.input_shape
    else:
        from .examples import small_resnet

        model, shapes = small_resnet(), args.input_shape or [(1, 1, 8, 8)]
        print("example model: tritonprune.examples:small_resnet (input 1 x 1 x 8 x 8)")
    model.eval()
    x = _example_inputs(shapes, getattr(torch, _DTYPES[args.input_dtype]))
    ignored = args.ignore or []
    try:
        with _torch_quiet():
            groups = tpr.find_groups(model, x, ignored_layers=ignored)
    except (tpr.TraceError, RuntimeError) as e:  # a forward that rejects the inputs fails in the trace
        raise _fail("inspect", f"could not trace {type(model).__name__} on {args.input_dtype} inputs of shape "
                    f"{shapes}: {e}{_token_hint(model, args.input_dtype)}") from e
    except ValueError as e:  # ignored layers that do not exist, bad inputs
        raise _fail("inspect", str(e)) from e
    print(group_table(groups))
    if args.ratio:
        plan = tpr.prune(model, x, ratio=args.ratio, groups=groups, dry_run=True)
        print()
        print(plan.summary())
    return 0


def bench(args: argparse.Namespace) -> int:
    import torch

    from . import benchmark

    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise _fail("bench", f"--device {args.device!r} is not a device; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise _fail("bench", f"--device {args.device!r}: the benchmark runs on cpu or cuda only")
    if args.json:  # checked now, not after the whole benchmark ran
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise _fail("bench", f"--json {args.json}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise _fail("bench", f"--json {args.json}: the folder {folder} is not writable")
        if os.path.isdir(args.json):
            raise _fail("bench", f"--json {args.json} is a folder; give a file name")
    torch.set_num_threads(args.threads)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _fail("bench", "--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    backends = args.backends.split(",") if args.backends else None
    for b in backends or ():
        if b not in ("torch", "triton", "reference"):
            raise _fail("bench", f"--backends: unknown backend {b!r}; choose from torch, triton, reference")
    if "triton" in (backends or ()):
        from ..kernels import _has_triton

        if dev.type != "cuda":
            raise _fail("bench", f"--backends triton runs the Triton kernels on CUDA tensors, and the device is "
                        f"{dev}; on a GPU machine add --device cuda, or leave triton out (--backends torch)")
        if not _has_triton():
            raise _fail("bench", "--backends triton needs triton: pip install 'tritonprune[gpu]'")
    print(f"regularize(): GroupNorm(reg={benchmark.REG}) on SmallResNet widths {args.sizes}, device {dev}, "
          f"{torch.get_num_threads()} threads", flush=True)
    with_tp = not args.no_torch_pruning
    if with_tp and importlib.util.find_spec("torch_pruning") is None:
        with_tp = False
        print("torch-pruning is not installed: its rows are left out (pip install torch-pruning==1.6.1 to "
              "compare; --no-torch-pruning silences this)", flush=True)
    if dev.type == "cpu":
        print(f"CPU accelerator (C loops of the torch backend): {benchmark.cpu_accelerator()}", flush=True)
    rows = benchmark.run(args.sizes, backends, args.device, torch_pruning=with_tp,
                         min_time=args.min_time, progress=None if args.quiet else lambda m: print(f"  {m}", flush=True))
    print()
    print(benchmark.table(rows))
    if args.json:
        write_json(args.json, benchmark.to_json(rows))
        print(f"wrote {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo  # torch and the training code, once the arguments are known to be good

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonprune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from . import demo_config

    p = sub.add_parser("demo", help="sparse training vs plain pruning on scikit-learn's digits (a few CPU minutes)")
    demo_config.add_arguments(p)
    p.set_defaults(fn=_demo)

    p = sub.add_parser("bench", help="time regularize() against Torch-Pruning and a naive per-group loop")
    p.add_argument("--sizes", type=_ints, default=[16, 32, 64],
                   help="SmallResNet widths, comma-separated (default 16,32,64; 128 and 256 are ResNet-18 sized)")
    p.add_argument("--backends", default=None, help="comma-separated: torch, triton (CUDA), reference (slow)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=at_least_one, default=1,
                   help="torch CPU threads (default 1, like the demo: on a busy machine several threads are "
                        "much slower and noisier; the count is printed)")
    p.add_argument("--min-time", type=_seconds, default=0.3, help="seconds of timing per method (default 0.3)")
    p.add_argument("--no-torch-pruning", action="store_true", help="leave Torch-Pruning out")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=bench)

    p = sub.add_parser("inspect", help="print the channel groups of a model (and a dry-run pruning plan)")
    p.add_argument("model", nargs="?",
                   help="MODULE:FACTORY or file.py:FACTORY returning an nn.Module (default: the built-in SmallResNet)")
    p.add_argument("--input-shape", type=_shape, action="append", default=None,
                   help="example input shape, e.g. 1,3,224,224; repeat for models with several inputs")
    p.add_argument("--input-dtype", choices=sorted(_DTYPES), default="float32",
                   help="dtype of the example inputs (int64 for token ids)")
    p.add_argument("--ignore", action="append", default=None, metavar="MODULE",
                   help="qualified name of a module to leave alone (repeatable)")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="show a dry-run plan at this ratio (0 to skip)")
    p.set_defaults(fn=inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
