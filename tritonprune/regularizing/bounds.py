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

Coupled, the term is added into the gradient: once the term's bound reaches half an ulp of the dtype's
largest value (16 for float16, ~1e31 for float32) a finite gradient plus the term may round to inf, and
only then is max|grad| of that parameter read and `max|g| + bound` checked too.

Between two refreshes of the coefficients (`refresh_every` > 1) the sums are stale: where K_p <= 1
(coupled) or <= 2 (decoupled) the term cannot exceed |w| whatever w is; elsewhere, and for coupled
float16 parameters, max|w| of those parameters is read. BNScale's term is s_k * reg * sign(w): K_p
alone bounds it. Weights that turn inf/NaN between two refreshes are found at the next refresh.

Under FSDP2 the bounds are taken over whole parameters and the all-reduced sums, so every rank refuses
the same step (a refusal on one rank only would leave the others waiting in the next collective).
"""

from __future__ import annotations

import math

import torch

# n_c comes from float32 sums: a little headroom for their rounding
_MARGIN = 1.0 + 2.0**-10


def _dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _half_ulp_at_max(dtype: torch.dtype) -> float:
    """Below this, a finite value plus the term rounds to at most the largest finite value."""
    fi = torch.finfo(dtype)
    return 2.0 ** (math.frexp(fi.max)[1] - 1) * fi.eps / 2


def _acc_max(dtype: torch.dtype) -> float:
    return _dtype_max(torch.promote_types(dtype, torch.float32))


def _max_abs(ts: list[torch.Tensor]) -> list[float]:
    """max|t| of each tensor, with one host sync for all of them."""
    if not ts:
        return []
    ms = []
    for t in ts:
        m = t.detach().abs().amax() if t.numel() else t.new_zeros(())
        ms.append((m.full_tensor() if hasattr(m, "full_tensor") else m).float())  # a DTensor reduces over ranks
    return torch.stack(ms).tolist()


def capturing(device: torch.device) -> bool:
    """True inside CUDA-graph capture, where no host sync is allowed (the checks then rely on the warm-up step)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class TermBounds:
    """Per-slot maxima of the coefficients and norms over the groups' update slots, and the checks on them.

    Built from the groups themselves (whole parameters, global channel ranges), not from the buffers'
    rows: under FSDP2 every rank then reaches the same verdict from the same all-reduced sums.
    """

    def __init__(self, groups, select, named: dict, device: torch.device):
        self.groups = groups
        self.group_offsets = [0]
        for g in groups:
            self.group_offsets.append(self.group_offsets[-1] + g.size)
        starts, lengths = [], []
        self._update_of: dict[str, list[int]] = {}  # parameter name -> indices of its update slots
        for gi, g in enumerate(groups):
            for slot in g.slots:
                if slot.is_buffer or slot.name not in named or not select(slot)[1]:
                    continue
                self._update_of.setdefault(slot.name, []).append(len(starts))
                starts.append(self.group_offsets[gi] + slot.offset)
                lengths.append(slot.length)
        self.params = {name: named[name] for name in self._update_of}  # the parameters that get the term
        self.n_slots = len(starts)
        self._idx = torch.cat([torch.arange(c, c + n) for c, n in zip(starts, lengths)]
                              or [torch.zeros(0, dtype=torch.int64)]).to(device)
        self._sid = torch.repeat_interleave(torch.arange(self.n_slots), torch.tensor(lengths, dtype=torch.int64)).to(device)
        self.slot_coef: list[float] | None = None  # max coef over each slot's channels (host)
        self.slot_norm: list[float] | None = None  # max n_c over each slot's channels (host)
        self._checked_key: tuple | None = None

    # ------------------------------------------------------------------------------- measurements

    def measure(self, sums: torch.Tensor, coef: torch.Tensor) -> None:
        """Refuse non-finite sums (naming the group); keep per-slot maxima of coef and n. One host sync."""
        n_slots = self.n_slots
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
        c = int(torch.nonzero(~finite).flatten()[0])
        gi = max(i for i, off in enumerate(self.group_offsets[:-1]) if off <= c)
        group = self.groups[gi]
        names = sorted({s.name for s in group.slots if not s.is_buffer})[:4]
        raise ValueError(
            f"tritonprune: group #{gi} ({group.origin or 'channels of ' + ', '.join(names)}) has a sum of squares of "
            f"{float(sums[c])} at channel {c - self.group_offsets[gi]} (weights inf/NaN, or above ~1.8e19 where "
            "float32 squares overflow): the training has diverged; nothing was modified. Lower the learning rate "
            "or reg, or restore a checkpoint"
        )

    # ------------------------------------------------------------------------------------- checks

    def check_scaled(self, scales: dict[str, float] | None, decoupled: bool, fresh: bool) -> None:
        """Check coef * w terms; `scales`: lr by parameter name (None: 1 everywhere; a parameter
        missing from it is not shrunk), `fresh`: the sums are this step's."""
        key = (id(self.slot_coef), None if scales is None else tuple(sorted(scales.items())))
        if key == self._checked_key and not fresh:
            return
        limit_k = 2.0 if decoupled else 1.0
        reads = False  # some parameter's verdict needs a fresh read at every step until the next refresh
        todo: list[tuple[str, torch.Tensor, float, float | None]] = []
        for name, ks in self._update_of.items():
            p = self.params[name]
            s = 1.0 if scales is None else abs(scales.get(name, 0.0))
            K = sum(self.slot_coef[k] for k in ks) * s
            # coupled float16 gradients: g + term may round to inf once |term| >= half an ulp of the
            # largest value (16), so their weights are re-read between refreshes
            narrow = not decoupled and p.dtype == torch.float16
            reads = reads or not K <= limit_k or narrow
            if fresh:
                todo.append((name, p, K, max(self.slot_norm[k] for k in ks) * _MARGIN))
            elif (K <= limit_k and not narrow) or capturing(p.device):
                continue  # |term| <= |w| (decoupled: |w'| <= |w|) whatever w is
            else:
                todo.append((name, p, K, None))
        unread = [p for _, p, _, W in todo if W is None]
        read = iter(_max_abs(unread))
        todo = [(name, p, K, next(read) if W is None else W) for name, p, K, W in todo]
        for name, p, K, W in todo:
            one = max(self.slot_coef[k] for k in self._update_of[name]) * (
                1.0 if scales is None else abs(scales.get(name, 0.0)))
            if decoupled and not one <= 1.0 + 1e-6:
                raise ValueError(
                    f"tritonprune: decoupled shrink of {name}: lr * reg * gamma (one group's coefficient) reaches "
                    f"{one:.3g} > 1, which would flip the signs of its weights and grow them; nothing was "
                    "modified. Lower the lr, reg (or alpha)"
                )
            self._check(name, p.dtype, K * W, W * max(1.0, K - 1.0) if decoupled else K * W, decoupled)
        reads = self._check_grad_sums([(name, p, K * W) for name, p, K, W in todo], decoupled) or reads
        self._checked_key = None if reads else key

    def check_sign(self, reg: float, scales: dict[str, float] | None, decoupled: bool) -> None:
        """BNScale: |term| = lr * reg per slot, known on the host."""
        key = ("sign", reg, None if scales is None else tuple(sorted(scales.items())))
        if key == self._checked_key:
            return
        terms = []
        for name, ks in self._update_of.items():
            p = self.params[name]
            K = len(ks) * reg * (1.0 if scales is None else abs(scales.get(name, 0.0)))
            self._check(name, p.dtype, K, K, decoupled)
            terms.append((name, p, K))
        reads = self._check_grad_sums(terms, decoupled)
        self._checked_key = None if reads else key

    def _check(self, name: str, dtype: torch.dtype, term: float, result: float, decoupled: bool) -> None:
        """Refuse if the term (computed in the accumulator) or the value written leaves the dtype."""
        if not (term <= _acc_max(dtype) and result <= _dtype_max(dtype)):  # NaN fails
            self._refuse(name, dtype, term, decoupled)

    @staticmethod
    def _check_grad_sums(terms: list[tuple[str, torch.Tensor, float]], decoupled: bool) -> bool:
        """Coupled: refuse where grad + term can round to inf; True if some gradient had to be read."""
        if decoupled:
            return False
        # below half an ulp of the largest value, a finite gradient plus the term cannot round up to inf
        risky = [(name, p, t) for name, p, t in terms
                 if not t < _half_ulp_at_max(p.dtype) and p.grad is not None and not capturing(p.device)]
        for (name, p, t), g in zip(risky, _max_abs([p.grad for _, p, _ in risky])):
            if not g + t < _dtype_max(p.dtype) + _half_ulp_at_max(p.dtype):
                raise ValueError(
                    f"tritonprune: {name}.grad (max |g| = {g:.5g}) plus its regularization term (up to {t:.3g}) "
                    f"would overflow {str(p.dtype).replace('torch.', '')}; nothing was modified. Lower reg, scale "
                    "the loss down, or keep this parameter in float32"
                )
        return bool(risky)

    @staticmethod
    def _refuse(name: str, dtype: torch.dtype, bound: float, decoupled: bool) -> None:
        where = "weights (decoupled: w -= lr * term)" if decoupled else "gradient"
        raise ValueError(
            f"tritonprune: the regularization term of {name} can reach {bound:.3g}, beyond what its {where} can "
            f"hold in {str(dtype).replace('torch.', '')} (max {_dtype_max(dtype):.5g}); nothing was modified. "
            "Lower reg (or alpha, or the lr in decoupled mode), or keep this parameter in float32"
            + ("" if math.isfinite(bound) else " (the bound is not finite: check reg, alpha and the lr)")
        )
