"""The sparsity regularizers: their hyperparameters, validation, and which Slots they read and write.

The mathematics lives in the backends (kernels/); a regularizer only says which slots count in the
per-channel importance and which receive the update, following Torch-Pruning 1.6.1:

- importance (GroupNorm): weights of Conv/ConvTranspose/Linear out-rows and in-columns and the affine
  weights of BatchNorm and LayerNorm (their biases too with `bias=True`);
- update (GroupNorm): Conv/ConvTranspose/Linear out-rows and in-columns and BatchNorm weights (biases with
  `bias=True`); LayerNorm counts in importance but is not updated, as in Torch-Pruning;
- BNScale and GroupLasso read and write BatchNorm affine weights only.

Two ways to apply the term:
- coupled (default, what Torch-Pruning does): `grad += term` before the optimizer step. Right for SGD;
  an adaptive optimizer (Adam, RMSprop, Adagrad) divides the gradient by its running scale, so the term's
  strength then depends on the gradient statistics.
- decoupled (`decoupled=True`): after the inner step, `w -= lr * term` with each param group's lr, like
  AdamW's weight decay. Use it with adaptive optimizers.
"""

from __future__ import annotations

import math
import numbers

from ..graph.group import BATCHNORM, CONV, CONV_T, IN, LAYERNORM, LINEAR, OUT, Slot

_WEIGHTED = (CONV, CONV_T, LINEAR)

# Every coefficient is computed and stored in float32: the largest one must stay finite there, with
# headroom for the rounding of exp2 and rsqrt.
COEF_MAX = 2.0**126
# gamma spans [1, 2**alpha]: Torch-Pruning uses 4; beyond 64 one channel's term would be 1.8e19 times
# another's, which no training wants (and reg * 2**alpha soon leaves float32)
ALPHA_MAX = 64.0
# GroupLasso's coefficient reg / sqrt(q + 1e-9) is at most reg / sqrt(1e-9)
_LASSO_GAIN = 1e-9**-0.5


def _check_number(cls: str, name: str, value: object, *, hi: float = math.inf) -> float:
    """A real number (not a bool, string, tensor or container), finite, in [0, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (pass a Python number, e.g. t.item())" if hasattr(value, "item") else ""
        raise TypeError(f"tritonprune.{cls}: {name} must be a real number, got {type(value).__name__} {value!r}{hint}")
    value = float(value)
    if not (0.0 <= value <= hi):  # NaN fails too
        bound = "" if math.isinf(hi) else f" and <= {hi:g}"
        raise ValueError(f"tritonprune.{cls}: {name} must be a finite number >= 0{bound}, got {value!r}")
    return value


def _check_nonneg(cls: str, name: str, value: object) -> float:
    return _check_number(cls, name, value, hi=COEF_MAX)


def _check_bool(cls: str, name: str, value: object) -> bool:
    # bool('False') and bool('no') are True: only real bools are accepted
    if not isinstance(value, bool):
        raise TypeError(f"tritonprune.{cls}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _check_refresh(cls: str, refresh_every: object) -> int:
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, numbers.Real):
        raise TypeError(f"tritonprune.{cls}: refresh_every must be an integer >= 1, got "
                        f"{type(refresh_every).__name__} {refresh_every!r}")
    if not (math.isfinite(refresh_every) and int(refresh_every) == refresh_every and refresh_every >= 1):
        raise ValueError(f"tritonprune.{cls}: refresh_every must be an integer >= 1, got {refresh_every!r}")
    return int(refresh_every)


def _check_coef_max(cls: str, largest: float, what: str) -> None:
    if not largest <= COEF_MAX:
        raise ValueError(
            f"tritonprune.{cls}: the largest coefficient, {what} = {largest:.3g}, exceeds {COEF_MAX:.3g} and would "
            "overflow float32 (inf in the gradients); lower reg or alpha"
        )


def _is_bn_weight(slot: Slot) -> bool:
    return slot.kind == BATCHNORM and not slot.is_bias and not slot.is_buffer


class Regularizer:
    """Base class: `select(slot) -> (counts_in_importance, receives_update)`."""

    name = "regularizer"
    needs_batchnorm = False
    reg: float
    decoupled: bool
    refresh_every: int = 1

    def select(self, slot: Slot) -> tuple[bool, bool]:  # pragma: no cover - abstract
        raise NotImplementedError


class GroupNorm(Regularizer):
    """DepGraph's group-norm regularizer: `grad += reg * gamma_c * w` on every coupled slice of channel c.

    `n_c` is the L2 norm of channel c over all importance slots of its group and
    `gamma_c = 2 ** (alpha * (n_max - n_c) / (n_max - n_min))`, in [1, 2**alpha]: weak channels are pushed
    harder. gamma is 1 where a group has one channel or equal norms (a spread at most
    `kernels.FLAT_SPREAD_RTOL` times n_max, so float32 rounding of equal norms counts as equal).

    Args:
        reg: strength (>= 0).
        alpha: exponent range, in [0, 64]; Torch-Pruning's `alpha=4`. `reg * 2**alpha` (the largest
            coefficient) must stay below 2**126, finite in float32.
        bias: also count and update biases (of Conv/Linear out-rows and norms).
        decoupled: apply `w -= lr * reg * gamma * w` after the inner optimizer step, with each param
            group's lr, like AdamW's weight decay, instead of adding to the gradient. Use it with adaptive
            optimizers (Adam, RMSprop, Adagrad), which rescale a term added to the gradient; keep the
            default (coupled, as in Torch-Pruning) for SGD.
        refresh_every: recompute gamma every N applications (1: every step, as DepGraph does).
    """

    name = "group_norm"

    def __init__(self, reg: float = 1e-4, alpha: float = 4, bias: bool = False, decoupled: bool = False,
                 refresh_every: int = 1):
        self.reg = _check_nonneg("GroupNorm", "reg", reg)
        self.alpha = _check_number("GroupNorm", "alpha", alpha, hi=ALPHA_MAX)
        _check_coef_max("GroupNorm", self.reg * 2.0**self.alpha, "reg * 2**alpha")
        self.bias = _check_bool("GroupNorm", "bias", bias)
        self.decoupled = _check_bool("GroupNorm", "decoupled", decoupled)
        self.refresh_every = _check_refresh("GroupNorm", refresh_every)

    def select(self, slot: Slot) -> tuple[bool, bool]:
        if slot.is_buffer or (slot.is_bias and not self.bias):
            return False, False
        if slot.kind in _WEIGHTED and slot.role in (OUT, IN):
            return True, True
        if slot.kind == BATCHNORM:
            return True, True
        if slot.kind == LAYERNORM:
            return True, False
        return False, False

    def __repr__(self) -> str:
        return (f"GroupNorm(reg={self.reg}, alpha={self.alpha}, bias={self.bias}, decoupled={self.decoupled}, "
                f"refresh_every={self.refresh_every})")


class BNScale(Regularizer):
    """Network Slimming: `grad += reg * sign(w)` on every BatchNorm affine weight of the groups (L1 on gamma).

    Args:
        reg: strength (>= 0).
        decoupled: apply `w -= lr * reg * sign(w)` after the inner step, with each param group's lr, like
            AdamW's weight decay; use it with adaptive optimizers, which rescale a term added to the
            gradient. The default (coupled) matches Torch-Pruning.

    Needs BatchNorm layers in the groups; on a model without them it raises ValueError.
    """

    name = "bn_scale"
    needs_batchnorm = True

    def __init__(self, reg: float = 1e-5, decoupled: bool = False):
        self.reg = _check_nonneg("BNScale", "reg", reg)
        self.decoupled = _check_bool("BNScale", "decoupled", decoupled)

    def select(self, slot: Slot) -> tuple[bool, bool]:
        return (False, True) if _is_bn_weight(slot) else (False, False)

    def __repr__(self) -> str:
        return f"BNScale(reg={self.reg}, decoupled={self.decoupled})"


class GroupLasso(Regularizer):
    """Group lasso on BatchNorm weights: `grad += reg / sqrt(q_c + 1e-9) * w` with
    `q_c = mean over the group's BatchNorm slots of w_c^2` (Torch-Pruning's `BNScalePruner(group_lasso=True)`).

    Groups without BatchNorm are skipped; if no group has one, it raises ValueError.

    Args:
        reg: strength (>= 0).
        decoupled: apply `w -= lr * term` after the inner step with each param group's lr, like AdamW's
            weight decay; use it with adaptive optimizers, which rescale a term added to the gradient.
        refresh_every: recompute the per-channel coefficients every N applications.
    """

    name = "group_lasso"
    needs_batchnorm = True

    def __init__(self, reg: float = 1e-5, decoupled: bool = False, refresh_every: int = 1):
        self.reg = _check_nonneg("GroupLasso", "reg", reg)
        _check_coef_max("GroupLasso", self.reg * _LASSO_GAIN, "reg / sqrt(1e-9)")
        self.decoupled = _check_bool("GroupLasso", "decoupled", decoupled)
        self.refresh_every = _check_refresh("GroupLasso", refresh_every)

    def select(self, slot: Slot) -> tuple[bool, bool]:
        return (True, True) if _is_bn_weight(slot) else (False, False)

    def __repr__(self) -> str:
        return f"GroupLasso(reg={self.reg}, decoupled={self.decoupled}, refresh_every={self.refresh_every})"




def resolve_regularizer(x: Regularizer | str) -> Regularizer:
    """An instance passes through; "group_norm", "bn_scale" or "group_lasso" give one with default settings."""
    if isinstance(x, Regularizer):
        return x
    if isinstance(x, str) and x in _BY_NAME:
        return _BY_NAME[x]()
    raise ValueError(
        f"tritonprune: unknown regularizer {x!r}; pass GroupNorm(...), BNScale(...), GroupLasso(...) "
        f"or one of {sorted(_BY_NAME)}"
    )


class GrowingReg(Regularizer):
    """Targeted sparse training (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021):
    `grad += c_ch * w` only on the channels chosen for removal, `c_ch` growing by `delta` every
    `interval` applications up to `reg_max`; the kept channels get no term at all.

    Every `interval` applications the channels to remove are chosen again from the current group norms,
    by the same rules as `tpr.prune` (tritonprune/graph/allocation.py: `ratio`, `allocation`,
    `kind_ratios`, whole heads): a channel that stays chosen keeps growing, one that leaves the choice
    drops to 0. Once the chosen channels are ~0, `tpr.prune(model, x, ratio, allocation=...,
    kind_ratios=..., optimizer=opt)` with the default L2 importance removes exactly them (their norms are
    the smallest of each group), so the prune is nearly lossless.

    Strength (the same for any optimizer and lr): in decoupled mode (the default) `c` is the fraction a
    chosen weight shrinks per step, `w *= 1 - c` after the inner step, whatever the optimizer and its lr
    (SGD, Adam, AdamW alike; a parameter group with lr 0 is not shrunk). It grows by `delta` every
    `interval` steps to `reg_max` (<= 0.5, since a weight in two chosen channels gets twice the term): a
    chosen channel's norm falls roughly as exp(-delta * n**2 / (2 * interval)) after n steps, so the
    defaults drive it to ~1e-3 of its size in ~400 steps. Keep the sparse phase longer than that.
    Coupled (`decoupled=False`, Torch-Pruning's form) adds `c * w` to the gradient instead: `c` then
    depends on the lr (plain SGD shrinks by `lr * c`) and an adaptive optimizer rescales it.

    Args:
        ratio: fraction of each group's channels to remove (or of each kind's, with "isomorphic").
        delta: coefficient increment per interval (> 0).
        interval: applications between two increments (and re-choices).
        reg_max: the coefficient's cap (decoupled: in (0, 0.5]).
        allocation: "uniform" (per group) or "isomorphic" (ranked within structurally identical groups).
        kind_ratios: {"residual" | "heads" | "mlp" | "conv": ratio} for "isomorphic"; others at `ratio`.
        bias: also shrink the biases of the chosen channels.
        decoupled: `w -= lr * c * w` after the inner step, as AdamW's weight decay.
    """

    name = "growing_reg"
    refresh_every = 1

    def __init__(self, ratio: float = 0.5, delta: float = 1e-3, interval: int = 10, reg_max: float = 0.5,
                 allocation: str = "uniform", kind_ratios: dict | None = None, bias: bool = False,
                 decoupled: bool = True):
        self.ratio = _check_number("GrowingReg", "ratio", ratio, hi=1.0)
        if self.ratio >= 1.0:
            raise ValueError(f"tritonprune.GrowingReg: ratio must be in [0, 1), got {ratio!r}")
        self.delta = _check_nonneg("GrowingReg", "delta", delta)
        self.interval = _check_refresh("GrowingReg", interval)
        self.refresh_every = self.interval  # the engine recomputes (grows, re-chooses) every interval calls
        self.reg_max = _check_nonneg("GrowingReg", "reg_max", reg_max)
        if allocation not in ("uniform", "isomorphic"):
            raise ValueError(f"tritonprune.GrowingReg: allocation must be 'uniform' or 'isomorphic', got {allocation!r}")
        self.allocation = allocation
        from ..graph.allocation import LABELS

        self.kind_ratios = {}
        for k, v in dict(kind_ratios or {}).items():
            if k not in LABELS:
                raise ValueError(f"tritonprune.GrowingReg: kind_ratios key {k!r} is not one of {LABELS}")
            self.kind_ratios[k] = _check_number("GrowingReg", f"kind_ratios[{k!r}]", v, hi=1.0)
        if self.kind_ratios and allocation != "isomorphic":
            raise ValueError("tritonprune.GrowingReg: kind_ratios needs allocation='isomorphic'")
        self.bias = _check_bool("GrowingReg", "bias", bias)
        self.decoupled = _check_bool("GrowingReg", "decoupled", decoupled)
        if self.delta == 0 or self.reg_max == 0:
            raise ValueError("tritonprune.GrowingReg: delta and reg_max must be > 0 (a zero penalty never prunes)")
        if self.decoupled and self.reg_max > 0.5:
            raise ValueError(
                f"tritonprune.GrowingReg: reg_max={reg_max!r} in decoupled mode is a shrink fraction per step; "
                "above 0.5 a weight in two chosen channels (shrunk by both) would flip sign: use <= 0.5"
            )
        self.reg = self.reg_max  # the largest coefficient (what the bounds and reports read)

    def select(self, slot: Slot) -> tuple[bool, bool]:
        if slot.is_buffer or (slot.is_bias and not self.bias):
            return False, False
        if slot.kind in _WEIGHTED and slot.role in (OUT, IN):
            return True, True
        if slot.kind in (BATCHNORM, LAYERNORM):
            return True, True  # a chosen channel's norm scale goes to 0 too: its removal is then exact
        return False, False

    def __repr__(self) -> str:
        kr = f", kind_ratios={self.kind_ratios}" if self.kind_ratios else ""
        return (f"GrowingReg(ratio={self.ratio}, delta={self.delta}, interval={self.interval}, "
                f"reg_max={self.reg_max}, allocation={self.allocation!r}{kr}, bias={self.bias}, "
                f"decoupled={self.decoupled})")


_BY_NAME = {"group_norm": GroupNorm, "bn_scale": BNScale, "group_lasso": GroupLasso, "growing_reg": GrowingReg}
