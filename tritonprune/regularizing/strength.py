"""How hard a regularizer can pull, as a fraction of a weight per step, and a warning when that is
too little to separate any channel.

With plain SGD (coupled) and in decoupled mode with any optimizer, a weight under coefficient c shrinks
by `lr * c` per step (SGD momentum m multiplies that by up to 1/(1-m)); GroupNorm's largest coefficient
is `reg * 2**alpha` (the weakest channel of a group). So the same `lr * reg` means the same everywhere:
an AdamW run at lr 1e-3 needs a reg ~100x that of an SGD run at lr 0.1 for the same pull. GrowingReg in
decoupled mode is given in these units directly (its coefficient is the shrink per step, lr-free).
Coupled with an adaptive optimizer (Adam, RMSprop, Adagrad) the term is divided by the gradient's running
scale, so no per-step figure exists: use decoupled=True there.
"""

from __future__ import annotations

import warnings

from torch.optim import Optimizer

from .regularizers import BNScale, GroupLasso, GroupNorm, GrowingReg, Regularizer

HORIZON = 2000  # steps: a penalty that cannot shrink the weakest channel by 10% in this many is a no-op
MIN_SHRINK = 0.1
_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam")


def max_shrink_per_step(regularizer: Regularizer, lr: float) -> float | None:
    """The largest fraction of a weight the term removes per step at this lr (None: not a fixed
    fraction, e.g. BNScale's L1 step or GroupLasso's 1/norm coefficient)."""
    if isinstance(regularizer, GrowingReg):
        return regularizer.reg_max if regularizer.decoupled else lr * regularizer.reg_max
    if isinstance(regularizer, GroupNorm):
        return lr * regularizer.reg * 2.0**regularizer.alpha
    if isinstance(regularizer, (BNScale, GroupLasso)):
        return None
    return None


def check_strength(regularizer: Regularizer, optimizer: Optimizer) -> None:
    """Warn when the penalty cannot move the weights at the optimizer's largest lr."""
    adaptive = type(optimizer).__name__ in _ADAPTIVE
    if adaptive and not regularizer.decoupled:
        return  # rescaled by the optimizer: no per-step figure (the docstrings say to use decoupled=True)
    lrs = [float(g.get("lr", 0.0)) for g in optimizer.param_groups]
    lr = max(lrs) if lrs else 0.0
    s = max_shrink_per_step(regularizer, lr)
    if s is None or lr <= 0 or s * HORIZON >= MIN_SHRINK:
        return
    need = MIN_SHRINK / HORIZON / (s / regularizer.reg) if regularizer.reg > 0 else float("inf")
    warnings.warn(
        f"tritonprune: {regularizer!r} with lr {lr:g} shrinks a weight by at most {s:.2g} per step, "
        f"{s * HORIZON:.1%} over {HORIZON} steps: too weak to separate channels. The pull per step is "
        f"lr * reg * 2**alpha (decoupled, or coupled SGD): raise reg to >= {need:.2g} for this lr "
        "(see tritonprune/regularizing/strength.py), or use tpr.GrowingReg, whose decoupled strength is lr-free",
        stacklevel=3,
    )
