"""`tritonprune inspect` (and, as they land, `demo` and `bench`)."""

from __future__ import annotations

import argparse
import importlib
import sys

import torch


def _load_factory(spec: str):
    if ":" not in spec:
        raise SystemExit(f"tritonprune inspect: expected MODULE:FACTORY, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"tritonprune inspect: cannot import {mod_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise SystemExit(f"tritonprune inspect: {mod_name!r} has no attribute {attr!r}")
    return factory


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape: expected comma-separated ints, got {text!r}") from None


def group_table(groups) -> str:
    lines = [f"{'#':>4} {'origin':<40} {'size':>6} {'blocks':>6} {'slots':>6}  tensors"]
    for g in groups:
        names = ", ".join(dict.fromkeys(s.name for s in g.slots if not s.is_buffer))
        if len(names) > 70:
            names = names[:67] + "..."
        lines.append(f"{g.index:>4} {g.origin[:40]:<40} {g.size:>6} {g.blocks:>6} {len(g.slots):>6}  {names}")
    lines.append(f"{len(groups)} groups, {sum(g.size for g in groups)} prunable channels")
    return "\n".join(lines)


def inspect(args: argparse.Namespace) -> int:
    import tritonprune as tpr

    if args.model:
        model = _load_factory(args.model)()
        shape = args.input_shape
        if shape is None:
            raise SystemExit("tritonprune inspect: give --input-shape for MODULE:FACTORY models (e.g. 1,3,224,224)")
    else:
        from .examples import small_resnet

        model, shape = small_resnet(), args.input_shape or (1, 1, 8, 8)
        print("example model: tritonprune.examples:small_resnet (input 1 x 8 x 8)")
    model.eval()
    x = torch.randn(*shape)
    groups = tpr.find_groups(model, x)
    print(group_table(groups))
    if args.ratio:
        plan = tpr.prune(model, x, ratio=args.ratio, groups=groups, dry_run=True)
        print()
        print(plan.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the channel groups of a model")
    p.add_argument("model", nargs="?", help="MODULE:FACTORY returning an nn.Module (default: a built-in ResNet)")
    p.add_argument("--input-shape", type=_shape, default=None, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--ratio", type=float, default=0.5, help="show a dry-run plan at this ratio (0 to skip)")
    p.set_defaults(fn=inspect)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
