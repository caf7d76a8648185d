"""The demo's settings and its command-line arguments, without torch: `tritonprune demo` checks its
arguments (argparse usage errors, exit 2) before the seconds torch takes to import."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# regularizer -> (default strength, importance that pruning uses after it)
# (growing_reg: its --reg is GrowingReg's delta, the growth of the per-step shrink every 10 steps)
REGULARIZERS = {"group_norm": (5e-3, "l2"), "bn_scale": (2e-3, "bn_scale"), "group_lasso": (2e-3, "bn_scale"),
                "growing_reg": (2e-3, "l2")}


@dataclass
class DemoConfig:
    epochs: int = 20            # dense and sparse training, each
    finetune_epochs: int = 4    # after pruning, both pruned models
    ratio: float = 0.5          # fraction of every group's channels removed
    regularizer: str = "group_norm"
    reg: float | None = None    # None: the regularizer's default (REGULARIZERS)
    lr: float = 0.1
    finetune_lr: float = 0.005   # gentle: the sparse-trained model needs little repair
    weight_decay: float = 5e-4
    batch_size: int = 64
    width: int = 16             # SmallResNet width: channels 16 / 32 / 64 per stage
    device: str = "cpu"
    seed: int = 0
    out: str = "tritonprune_demo"
    latency_runs: int = 30
    train_limit: int | None = None  # keep only this many training images (quick runs)
    progress: bool = True

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """A tiny run for tests: a few hundred images, a narrow model, two epochs."""
        base = dict(epochs=3, finetune_epochs=1, width=8, latency_runs=5, train_limit=300, lr=0.1)
        base.update(kw)
        return cls(**base)


def number(cast: Callable[[str], Any], ok: Callable[[Any], bool], unparsed: str, bad: str) -> Callable[[str], Any]:
    """An argparse type: `cast(text)`, refused (a usage error, exit 2) with `unparsed` where the text does
    not parse and with `bad` where `ok(value)` is false; both messages end with the text given."""

    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{unparsed}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{bad}, got {text!r}")
        return v

    return parse


at_least_one = number(int, lambda v: v >= 1, "expected an int >= 1", "must be >= 1")
_open_fraction = number(float, lambda v: 0 < v < 1, "expected a number in (0, 1)", "must be in (0, 1)")
_strength = number(float, lambda v: v >= 0 and math.isfinite(v), "expected a finite number >= 0",
                   "must be a finite number >= 0")
_learning_rate = number(float, lambda v: v > 0 and math.isfinite(v), "expected a positive number",
                        "must be a finite number > 0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--epochs", type=at_least_one, default=d.epochs,
                   help=f"dense and sparse training epochs (default {d.epochs})")
    p.add_argument("--finetune-epochs", type=at_least_one, default=d.finetune_epochs,
                   help=f"fine-tune epochs after pruning (default {d.finetune_epochs})")
    p.add_argument("--ratio", type=_open_fraction, default=d.ratio,
                   help="fraction of each group's channels to remove (0.5)")
    p.add_argument("--regularizer", choices=sorted(REGULARIZERS), default=d.regularizer)
    p.add_argument("--reg", type=_strength, default=None,
                   help="regularizer strength (default: " + ", ".join(f"{k} {v[0]:g}" for k, v in REGULARIZERS.items()) + ")")
    p.add_argument("--lr", type=_learning_rate, default=d.lr, help=f"training learning rate (default {d.lr})")
    p.add_argument("--finetune-lr", type=_learning_rate, default=d.finetune_lr,
                   help=f"fine-tune learning rate, both pruned models (default {d.finetune_lr})")
    p.add_argument("--width", type=at_least_one, default=d.width, help=f"SmallResNet base width (default {d.width})")
    p.add_argument("--device", default=d.device, help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help=f"output folder for demo.png and results.json (default {d.out})")
    p.add_argument("--threads", type=at_least_one, default=1,
                   help="torch CPU threads (default 1: small convolutions gain little from more, and a busy "
                        "machine makes several threads much slower)")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
