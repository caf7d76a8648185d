"""Backends: the same five operations on GroupBuffers, in three implementations of one design.

The three backends share the per-parameter matrix form: a parameter is seen as `[G, R, J]` in its
physical layout (out-rows outermost, `G` > 1 for grouped-conv in-columns), each of its slots a map from
rows or from columns to flat channels, so one read of w gives both its row and column sums of squares
and one pass updates it with `t += (c_row[r] + c_col[g, j]) * f(w)`; `matrix_form.py` derives that
form once for both and describes it. `reference` states the mathematics slot by slot as the oracle;
`torch` runs the matrix form with torch ops (and C loops on the CPU);
`triton` runs it as GPU kernels (`triton_impl.py`, planned in `triton_plan.py`), which are compiled for
sm_80/sm_90 and costed without a GPU by `static_report.py`.

Each backend is a module with

    channel_sq_sums(bufs) -> float32 [n_channels]
        per flat channel, the sum of w**2 over the importance slots (bit0 of FLAGS);
    group_norm_coef(bufs, sums, reg, alpha) -> float32 [n_channels]
        reg * gamma, gamma = 2 ** (alpha * (n_max - n) / (n_max - n_min)) per group with n = sqrt(sums);
        gamma = 1 where the group is flat: one channel, or a spread n_max - n_min that is not finite or
        not above FLAT_SPREAD_RTOL * n_max (equal norms in exact arithmetic differ by float32 rounding
        residue that depends on the summation order: every backend treats such a group as flat);
    group_lasso_coef(bufs, sums_bn, reg) -> float32 [n_channels]
        reg / sqrt(sums_bn / n_importance_slots_bn + 1e-9) (0 on channels without a BatchNorm slot);
    add_scaled_(bufs, coef, *, target="grad" | "param", slot_scale=None)
        target += slot_scale[slot] * coef[c] * w on the update slots (bit1 of FLAGS);
    add_sign_(bufs, reg, *, target="grad" | "param", slot_scale=None)
        target += slot_scale[slot] * reg * sign(w) on the update slots.

Common rules: accumulate in float32 (or the parameter's dtype if wider), store in the target's dtype;
`slot_scale` is a float32 tensor [n_slots] (None means 1); slots whose parameter has no .grad are
skipped whatever the target (frozen or unused parameters); with target="param", w is read as it was
before the call, as if every slot were updated at once (a weight can be in two slots: out-rows of one
group, in-columns of another).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "torch", "triton")

# A group's norms count as equal (gamma 1) when their spread is at most this fraction of the largest:
# 2**-16 is about 128 float32 ulps, far above the residue of summing equal channels in another order
# and far below any spread that training produces.
FLAT_SPREAD_RTOL = 2.0**-16
_MODULES = {"reference": ".reference", "torch": ".torch_impl", "triton": ".triton_impl"}


def get_backend(name: str = "auto", device: torch.device | str | None = None) -> ModuleType:
    """The backend module for `name` ("auto", "reference", "torch" or "triton") on `device`."""
    dev = torch.device(device) if device is not None else None
    if name == "auto":
        # Triton for CUDA tensors when it imports; the vectorised torch path everywhere else
        name = "triton" if dev is not None and dev.type == "cuda" and _has_triton() else "torch"
    if name not in _MODULES:
        raise ValueError(f"tritonprune.kernels: unknown backend {name!r}; choose 'auto' or one of {BACKENDS}")
    try:
        module = importlib.import_module(_MODULES[name], __name__)
    except ImportError as e:
        raise ValueError(f"tritonprune.kernels: backend {name!r} is not available here ({e}); use backend='torch'") from e
    if name == "triton" and not module.HAS_TRITON:
        raise ValueError(
            "tritonprune.kernels: backend 'triton' needs the triton package, which is not installed: "
            "pip install 'tritonprune[gpu]' (or use backend='torch' / 'auto')"
        )
    if name == "triton" and dev is not None:
        module.check_available(dev)  # CPU tensors need TRITON_INTERPRET=1
    return module


def _has_triton() -> bool:
    try:
        return importlib.import_module(".triton_impl", __name__).HAS_TRITON
    except ImportError:
        return False
