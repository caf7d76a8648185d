"""Regularization: applies one regularizer to a model's groups through a backend. Knows nothing of optimizers.

The optimizer wrapper calls `apply_to_grads()` before the inner step (coupled mode) or
`apply_decoupled(lr_of_param)` after it (decoupled mode). The flattened buffers are built lazily, rebuilt
by themselves when a parameter is replaced or reshaped (after pruning), and the per-channel
coefficients are kept for `regularizer.refresh_every` calls.

DistributedDataParallel / DataParallel wrappers are looked through (slot names are those of the inner
module). A model whose grouped parameters are FSDP2 DTensors is handled by
`tritonprune.distributed.ShardedLayout`: buffers over the local shards, and the per-channel sums
all-reduced between `channel_sq_sums` and the coefficients (one collective per refresh). Plain models
never import it and pay nothing for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .graph.group import BATCHNORM, Group, Slot
from .graph.trace import unwrap
from .kernels import get_backend
from .layout import GroupBuffers
from .regularizers import BNScale, GroupLasso, GroupNorm, Regularizer, resolve_regularizer

Params = Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] | None


def _is_sharded(model: nn.Module) -> bool:
    # DTensor parameters can only exist once torch.distributed.tensor was imported: no import, no cost
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(p, mod.DTensor) for p in model.parameters())


class Regularization:
    """`Regularization(model, groups, regularizer, backend="auto", params=None)`.

    `params` restricts the *update* to these parameters (an iterable of tensors, or a callable returning
    one, called again at every rebuild of the buffers, e.g. after pruning replaced the parameters);
    every grouped parameter still counts in the channel importance. None: every grouped parameter with
    a .grad is updated.

    Attributes: `groups`, `regularizer`, `calls` (applications so far), `buffers` (the current
    GroupBuffers, built on first use), `sharded` (the ShardedLayout of an FSDP2 model, else None).
    """

    def __init__(self, model: nn.Module, groups: Sequence[Group], regularizer: Regularizer | str,
                 backend: str = "auto", params: Params = None):
        self.model = unwrap(model)
        self._params = params
        self.regularizer = resolve_regularizer(regularizer)
        self.backend_name = backend
        self.calls = 0
        self._bufs: GroupBuffers | None = None
        self._backend = None
        self._coef: torch.Tensor | None = None
        self._coef_age = 0
        self._scale_key: tuple | None = None
        self._scale: torch.Tensor | None = None
        self.sharded = None
        if _is_sharded(self.model):
            from .distributed import ShardedLayout

            self.sharded = ShardedLayout(self.model)
        self.set_groups(groups)

    # ------------------------------------------------------------------------------------------ setup

    def set_groups(self, groups: Sequence[Group]) -> None:
        """Use new groups (after pruning); buffers and cached coefficients are rebuilt on the next call."""
        groups = list(groups)
        if self.regularizer.needs_batchnorm and not any(
            s.kind == BATCHNORM and not s.is_buffer for g in groups for s in g.slots
        ):
            raise ValueError(
                f"tritonprune: {type(self.regularizer).__name__} regularizes BatchNorm weights, but none of the "
                f"{len(groups)} groups has a BatchNorm layer; use GroupNorm(...) for this model"
            )
        self.groups = groups
        self._invalidate()

    def set_params(self, params: Params) -> None:
        """Restrict the update to other parameters (see the class docstring); rebuilt on the next call."""
        self._params = params
        self._invalidate()

    def _invalidate(self) -> None:
        self._bufs = None
        self._coef = None
        self._scale_key = None

    def _select(self) -> Callable[[Slot], tuple[bool, bool]]:
        select = self.regularizer.select
        if self._params is None:
            return select
        params = self._params() if callable(self._params) else self._params
        ids = {id(p) for p in params}
        allowed = {n for n, p in self.model.named_parameters() if id(p) in ids}

        def restricted(slot: Slot) -> tuple[bool, bool]:
            imp, upd = select(slot)
            return imp, upd and slot.name in allowed

        return restricted

    def _stale(self) -> bool:
        if self.sharded is not None:
            return self.sharded.is_stale(self._bufs)
        return self._bufs.is_stale(self.model)

    @property
    def buffers(self) -> GroupBuffers:
        if self._bufs is None or self._stale():
            try:
                if self.sharded is not None:
                    self._bufs = self.sharded.build(self.groups, self._select())
                else:
                    self._bufs = GroupBuffers.build(self.model, self.groups, self._select())
            except ValueError as e:
                if self._bufs is None:  # first build for these groups: the message says it all
                    raise
                raise ValueError(
                    f"{e}. The model no longer matches the groups (was it pruned?): pass the new groups with "
                    "set_groups(), or let tritonprune.prune() update the optimizer"
                ) from None
            self._backend = get_backend(self.backend_name, self._bufs.device)
            self._coef = None
            self._scale_key = None
        if self.sharded is not None:
            self.sharded.attach_grads(self._bufs)  # local views of the shards' .grad on the proxies
        if getattr(self._backend, "USES_POINTER_TABLE", True):
            self._bufs.refresh_pointers()  # only the Triton kernels read the table's addresses
        return self._bufs

    # ------------------------------------------------------------------------------------------ apply

    # torch.compile: a compiled training step breaks its graph only around the regularization (the
    # engine reads addresses and caches plans on the host, nothing Dynamo should trace)
    @torch.compiler.disable
    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """grad += term on every update slot; parameters whose .grad is None are skipped."""
        bufs = self.buffers
        self._apply(bufs, "grad", None)
        if self.sharded is not None:
            self.sharded.write_back(bufs)

    @torch.compiler.disable
    @torch.no_grad()
    def apply_decoupled(self, lr_of_param: Mapping[int, float]) -> None:
        """w -= lr * term, with lr looked up by id(param); the term is computed from w before the shrink.

        Parameters missing from `lr_of_param` or without a .grad are left alone.
        """
        bufs = self.buffers
        if self.sharded is not None:
            lr_of_param = self.sharded.local_lr(lr_of_param)
        self._apply(bufs, "param", self._slot_scale(bufs, lr_of_param))

    def _slot_scale(self, bufs: GroupBuffers, lr_of_param: Mapping[int, float]) -> torch.Tensor:
        key = tuple(float(lr_of_param.get(id(p), 0.0)) for _, _, p in bufs.entries)
        if key != self._scale_key:  # rebuilt only when some lr changed (schedulers)
            self._scale = torch.tensor([-lr for lr in key], dtype=torch.float32).to(bufs.device, non_blocking=True)
            self._scale_key = key
        return self._scale

    def _apply(self, bufs: GroupBuffers, target: str, slot_scale: torch.Tensor | None) -> None:
        r, be = self.regularizer, self._backend
        self.calls += 1
        if bufs.n_slots == 0 and self.sharded is None:  # a rank with no local rows still joins the all-reduce
            return
        if isinstance(r, BNScale):
            be.add_sign_(bufs, r.reg, target=target, slot_scale=slot_scale)
            return
        if self._coef is None or self._coef_age >= r.refresh_every:
            sums = be.channel_sq_sums(bufs)
            if self.sharded is not None:
                sums = self.sharded.reduce_sums(sums)  # the one collective of a step
            if isinstance(r, GroupNorm):
                self._coef = be.group_norm_coef(bufs, sums, r.reg, r.alpha)
            elif isinstance(r, GroupLasso):
                self._coef = be.group_lasso_coef(bufs, sums, r.reg)
            else:
                raise TypeError(f"tritonprune: no backend path for regularizer {r!r}")
            self._coef_age = 0
        self._coef_age += 1
        be.add_scaled_(bufs, self._coef, target=target, slot_scale=slot_scale)
