"""Bounds on the regularization term: refuse, before anything is written, a term the target cannot hold.

The engine calls `TermBounds` between computing the per-channel coefficients and handing them to a
backend. Nothing here reads a weight tensor in the common case: the bounds come from the per-channel
sums of squares the coefficients were computed from.

Why that is enough: every update slot of GroupNorm and GroupLasso is also an importance slot, so an
element of channel c satisfies |w| <= n_c = sqrt(sums[c]). An element of parameter p gets the term
`sum over the slots covering it of s_k * coef_c * w` (s_k: 1 coupled, the slot's lr decoupled), so

    |term| <= K_p * W_p,   K_p = sum over p's update slots k of s_k * max coef over k's channels,
                           W_p = max over p's update slots of max n_c over k's channels.

Checks (each failing one raises ValueError naming the group or the parameter; nothing is written):
- the sums are finite (weights inf/NaN, or above ~1.8e19 where float32 squares overflow);
- coupled: K_p * W_p <= the largest value of p's dtype (and of the float32 accumulator);
- decoupled: the new weight is w * (1 - s) with 0 <= s <= K_p, so |w'| <= W_p * max(1, K_p - 1).

Between two refreshes of the coefficients (`refresh_every` > 1) the sums are stale: where K_p <= 1
(coupled) or <= 2 (decoupled) the term cannot exceed |w| whatever w is; elsewhere max|w| of those
parameters is read. BNScale's term is s_k * reg * sign(w): K_p alone bounds it.

Not checked: a gradient already within |term| of its dtype's largest value (the sum may round to inf;
reading every gradient each step would cost as much as the regularization itself).
"""

from __future__ import annotations

import math

import torch

from .layout import FLAG_UPDATE, GroupBuffers

# n_c comes from float32 sums: a little headroom for their rounding
_MARGIN = 1.0 + 2.0**-10


def _dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _acc_max(dtype: torch.dtype) -> float:
    return _dtype_max(torch.promote_types(dtype, torch.float32))


def capturing(device: torch.device) -> bool:
    """True inside CUDA-graph capture, where no host sync is allowed (the checks then rely on the warm-up step)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class TermBounds:
    """Per-slot maxima of the coefficients and norms of one GroupBuffers, and the checks on them."""

    def __init__(self, bufs: GroupBuffers, groups):
        self.bufs = bufs
        self.groups = groups
        lengths = [geo.G * geo.C for geo in bufs.geometries]
        dev = bufs.device
        chans = bufs.chans
        self._idx = torch.cat([torch.arange(c, c + n) for c, n in zip(chans, lengths)] or [torch.zeros(0, dtype=torch.int64)]).to(dev)
        self._sid = torch.repeat_interleave(torch.arange(bufs.n_slots), torch.tensor(lengths, dtype=torch.int64)).to(dev)
        # update slots by parameter, in table order
        self._update_of: dict[int, list[int]] = {}
        for k, ((_, _, p), flags) in enumerate(zip(bufs.entries, bufs.flags)):
            if flags & FLAG_UPDATE:
                self._update_of.setdefault(id(p), []).append(k)
        self._param = {id(p): (slot.name, p) for _, slot, p in bufs.entries}
        self.slot_coef: list[float] | None = None  # max coef over each slot's channels (host)
        self.slot_norm: list[float] | None = None  # max n_c over each slot's channels (host)
        self._checked_key: tuple | None = None

    # ------------------------------------------------------------------------------- measurements

    def measure(self, sums: torch.Tensor, coef: torch.Tensor) -> None:
        """Refuse non-finite sums (naming the group); keep per-slot maxima of coef and n. One host sync."""
        n_slots = self.bufs.n_slots
        sums = sums.to(torch.float32)
        finite = torch.isfinite(sums)
        n = sums.clamp(min=0).sqrt()
        vals = torch.stack([coef.to(torch.float32).index_select(0, self._idx), n.index_select(0, self._idx)], 1)
        maxima = torch.zeros(n_slots, 2, dtype=torch.float32, device=vals.device)
        maxima.scatter_reduce_(0, self._sid.view(-1, 1).expand(-1, 2), vals, "amax")
        flat = torch.cat([(~finite).any().to(torch.float32).view(1), maxima.flatten()]).tolist()  # the sync
        if flat[0]:
            self._raise_non_finite(sums, finite)
        self.slot_coef = flat[1::2]
        self.slot_norm = flat[2::2]
        self._checked_key = None

    def _raise_non_finite(self, sums: torch.Tensor, finite: torch.Tensor) -> None:
        bad = torch.nonzero(~finite).flatten().cpu()
        gi = int(self.bufs.channel_group.cpu()[bad[0]])
        group = self.groups[gi]
        first = int(bad[0]) - int(self.bufs.group_offsets.cpu()[gi])
        names = sorted({s.name for s in group.slots if not s.is_buffer})[:4]
        value = float(sums[bad[0]])
        raise ValueError(
            f"tritonprune: group #{gi} ({group.origin or 'channels of ' + ', '.join(names)}) has a sum of squares of "
            f"{value} at channel {first} (weights inf/NaN, or above ~1.8e19 where float32 squares overflow): the "
            "training has diverged; nothing was modified. Lower the learning rate or reg, or restore a checkpoint"
        )

    # ------------------------------------------------------------------------------------- checks

    def check_scaled(self, scales: list[float] | None, decoupled: bool, fresh: bool) -> None:
        """Check coef * w terms; `scales` per slot (None: 1 everywhere), `fresh`: sums of this step."""
        key = (id(self.slot_coef), None if scales is None else tuple(scales))
        if key == self._checked_key and not fresh:
            return
        limit_k = 2.0 if decoupled else 1.0
        reads_w = False  # some parameter's bound needs max|w| at every step until the next refresh
        for pid, ks in self._update_of.items():
            name, p = self._param[pid]
            K = sum(self.slot_coef[k] * (1.0 if scales is None else abs(scales[k])) for k in ks)
            reads_w = reads_w or not K <= limit_k
            if fresh:
                W = max(self.slot_norm[k] for k in ks) * _MARGIN
            elif K <= limit_k:
                continue  # |term| <= |w| (decoupled: |w'| <= |w|) whatever w is
            else:
                if capturing(p.device):
                    continue
                W = float(p.detach().abs().amax()) if p.numel() else 0.0
            self._check(name, p.dtype, K, W, decoupled)
        self._checked_key = None if reads_w else key

    def check_sign(self, reg: float, scales: list[float] | None, decoupled: bool) -> None:
        """BNScale: |term| = s_k * reg, known on the host."""
        key = ("sign", reg, None if scales is None else tuple(scales))
        if key == self._checked_key:
            return
        for pid, ks in self._update_of.items():
            name, p = self._param[pid]
            K = sum(reg * (1.0 if scales is None else abs(scales[k])) for k in ks)
            if not K <= min(_dtype_max(p.dtype), _acc_max(p.dtype)):
                self._refuse(name, p.dtype, K, decoupled)
        self._checked_key = key

    def _check(self, name: str, dtype: torch.dtype, K: float, W: float, decoupled: bool) -> None:
        term = K * W
        result = W * max(1.0, K - 1.0) if decoupled else term
        if not (term <= _acc_max(dtype) and result <= _dtype_max(dtype)):  # NaN fails
            self._refuse(name, dtype, term, decoupled)

    @staticmethod
    def _refuse(name: str, dtype: torch.dtype, bound: float, decoupled: bool) -> None:
        where = "weights (decoupled: w -= lr * term)" if decoupled else "gradient"
        raise ValueError(
            f"tritonprune: the regularization term of {name} can reach {bound:.3g}, beyond what its {where} can "
            f"hold in {str(dtype).replace('torch.', '')} (max {_dtype_max(dtype):.5g}); nothing was modified. "
            "Lower reg (or alpha, or the lr in decoupled mode), or keep this parameter in float32"
            + ("" if math.isfinite(bound) else " (the bound is not finite: check reg, alpha and the lr)")
        )
