"""Regularization: applies one regularizer to a model's groups through a backend. Knows nothing of optimizers.

The optimizer wrapper calls `apply_to_grads()` before the inner step (coupled mode) or
`apply_decoupled(lr_of_param)` after it (decoupled mode). The flattened buffers are built lazily, rebuilt
by themselves when a parameter is replaced or reshaped (after pruning), and the per-channel
coefficients are kept for `regularizer.refresh_every` calls (`state_dict()` / `load_state_dict()` carry
them across a checkpoint).

Every call validates before it writes: the groups against the model's current shapes, the gradients'
layout, and (`tritonprune.bounds`) that the terms fit their targets' dtypes; a call that raises has
changed nothing. Parameters that do not require grad are never updated (checked at every call).

DistributedDataParallel / DataParallel wrappers are looked through (slot names are those of the inner
module). A model whose grouped parameters are FSDP2 DTensors is handled by
`tritonprune.distributed.ShardedLayout`: buffers over the local shards, and the per-channel sums
all-reduced between `channel_sq_sums` and the coefficients (one collective per refresh). Plain models
never import it and pay nothing for it.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..graph.group import BATCHNORM, Group, Slot
from ..graph.trace import unwrap
from ..kernels import BACKENDS, get_backend
from ..kernels.layout import GroupBuffers
from .bounds import TermBounds, capturing
from .regularizers import BNScale, GroupLasso, GroupNorm, GrowingReg, Regularizer, resolve_regularizer
from .targeted import growing_coef

Params = Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] | None

STATE_VERSION = 1


def check_backend_name(backend: object, who: str = "tritonprune") -> str:
    """'auto' or one of BACKENDS, imported once here so a missing triton is reported now, not at a step."""
    if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
        raise ValueError(f"{who}: unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    if backend != "auto":
        get_backend(backend)  # ImportError -> ValueError naming the backend
    return backend


def _is_sharded(model: nn.Module) -> bool:
    # DTensor parameters can only exist once torch.distributed.tensor was imported: no import, no cost
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(p, mod.DTensor) for p in model.parameters())


def _not_compiled(fn: Callable) -> Callable:
    """`torch.compiler.disable(fn)`, without importing torch._dynamo when the engine is imported (a
    second of `import tritonprune`). The marker makes Dynamo break its graph here and call the wrapper
    eagerly; only a process that loaded Dynamo (so may be compiling) pays for the disabled call, made once."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    wrapper._torchdynamo_disable = True  # what torch.compiler.disable sets; read by Dynamo's tracer
    return wrapper


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
        self.backend_name = check_backend_name(backend)
        self.calls = 0
        self._bufs: GroupBuffers | None = None
        self._bounds: TermBounds | None = None
        self._backend = None
        self._coef: torch.Tensor | None = None
        self._coef_age = 0
        self._scale_key: tuple | None = None
        self._scale: torch.Tensor | None = None
        self._watch: list[torch.Tensor] = []  # parameters that may be updated: their requires_grad is watched
        self._watch_key: tuple[bool, ...] = ()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.sharded = None
        if _is_sharded(self.model):
            from .sharded import ShardedLayout

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
        # the shapes the groups describe: a layer replaced by a wider one later is caught at the next build
        named = dict(self.model.named_parameters())
        self._shapes = {s.name: tuple(named[s.name].shape) for g in groups for s in g.slots
                        if not s.is_buffer and s.name in named}
        self._invalidate()

    def set_params(self, params: Params) -> None:
        """Restrict the update to other parameters (see the class docstring); rebuilt on the next call."""
        self._params = params
        self._invalidate()

    def _invalidate(self) -> None:
        self._bufs = None
        self._bounds = None
        self._coef = None
        self._scale_key = None

    def _select(self) -> Callable[[Slot], tuple[bool, bool]]:
        """The regularizer's choice, the update restricted to `params` that require grad (frozen ones
        keep counting in the importance). Sets the watched parameters."""
        select = self.regularizer.select
        named = dict(self.model.named_parameters())
        if self._params is None:
            candidates = named
        else:
            params = self._params() if callable(self._params) else self._params
            ids = {id(p) for p in params}
            candidates = {n: p for n, p in named.items() if id(p) in ids}
        allowed = {n for n, p in candidates.items() if p.requires_grad}
        self._watch = list(candidates.values())
        self._watch_key = tuple(p.requires_grad for p in self._watch)

        def restricted(slot: Slot) -> tuple[bool, bool]:
            imp, upd = select(slot)
            return imp, upd and slot.name in allowed

        return restricted

    def _check_shapes(self) -> None:
        named = dict(self.model.named_parameters())
        for name, shape in self._shapes.items():
            p = named.get(name)
            if p is not None and tuple(p.shape) != shape:
                raise ValueError(
                    f"tritonprune: {name} now has shape {tuple(p.shape)}, but the groups were found with "
                    f"{shape} (was the layer replaced or pruned by hand?); regularizing them would cover only "
                    "part of its channels. Rebuild the optimizer, or pass new groups with set_groups() / "
                    "RegularizedOptimizer.reset_groups(tpr.find_groups(model, example_inputs)); "
                    "tritonprune.prune() does this for you"
                )
        for p in named.values():
            if p.device.type == "meta":
                raise ValueError(
                    "tritonprune: the model has parameters on the meta device (no data to regularize); "
                    "materialize it first (model.to_empty(device=...) and load the weights), then build the optimizer"
                )

    @property
    def buffers(self) -> GroupBuffers:
        """The current GroupBuffers, rebuilt first where the model changed (validated; see `prepare`)."""
        if self._bufs is None or self._stale():
            self._check_shapes()
            self._check_grads((name, p) for name, p in self.model.named_parameters())  # build reads grads
            select = self._select()
            try:
                if self.sharded is not None:
                    bufs = self.sharded.build(self.groups, select)
                else:
                    bufs = GroupBuffers.build(self.model, self.groups, select)
            except ValueError as e:
                if self._bufs is None:  # first build for these groups: the message says it all
                    raise
                raise ValueError(
                    f"{e}. The model no longer matches the groups (was it pruned?): pass the new groups with "
                    "set_groups(), or let tritonprune.prune() update the optimizer"
                ) from None
            backend = get_backend(self.backend_name, bufs.device)
            self._bufs, self._backend = bufs, backend
            self._bounds = TermBounds(self.groups, select, dict(self.model.named_parameters()), bufs.device)
            self._coef = None
            self._scale_key = None
        if self.sharded is not None:
            self.sharded.attach_grads(self._bufs)  # local views of the shards' .grad on the proxies
        self._check_grads((slot.name, p) for _, slot, p in self._bufs.entries)
        if getattr(self._backend, "USES_POINTER_TABLE", True):
            self._bufs.refresh_pointers()  # only the Triton kernels read the table's addresses
        return self._bufs

    def _stale(self) -> bool:
        if tuple(p.requires_grad for p in self._watch) != self._watch_key:
            return True  # a parameter was frozen or unfrozen: it must (not) be updated from now on
        if self.sharded is not None:
            return self.sharded.is_stale(self._bufs)
        return self._bufs.is_stale(self.model)

    @staticmethod
    def _check_grads(named: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, p in named:
            g = p.grad
            if g is not None and g.layout != torch.strided:
                raise ValueError(
                    f"tritonprune: {name}.grad is a {g.layout} tensor; the regularizer needs dense gradients "
                    "(nn.Embedding(sparse=True) and sparse optimizers are not supported: use sparse=False)"
                )

    def prepare(self) -> GroupBuffers:
        """Validate everything a step needs (groups against the model, backend, buffers, gradients)
        without writing anything; the optimizer calls it before a decoupled inner step."""
        return self.buffers

    def check_decoupled(self, lr_of_param: Mapping[int, float]) -> None:
        """What a decoupled shrink `w *= 1 - lr * coef` needs, checked before the inner step so that a
        refusal leaves everything as it was: every lr finite and >= 0; GroupNorm's `lr * reg * gamma` at
        most 1 (gamma reaches 2**alpha on the weakest channel of any group, and a factor above 1 would flip
        the weights' signs and grow them); the weights to shrink finite."""
        self.prepare()
        r, bounds = self.regularizer, self._bounds
        used = []
        for name, p in bounds.params.items():
            lr = lr_of_param.get(id(p))
            if lr is None:
                continue
            if not (math.isfinite(lr) and lr >= 0):
                raise ValueError(f"tritonprune: the learning rate of {name} is {lr!r}; a decoupled shrink needs a "
                                 "finite lr >= 0. Nothing was modified")
            if isinstance(r, GroupNorm) and lr > 0:
                gamma = 2.0 ** r.alpha
                factor = lr * r.reg * gamma
                if not factor <= 1.0:
                    raise ValueError(
                        f"tritonprune: decoupled shrink of {name}: lr ({lr:g}) * reg ({r.reg:g}) * gamma (up to "
                        f"2**alpha = {gamma:g}) = {factor:.3g} > 1 would flip the signs of its weights and grow "
                        "them; nothing was modified. Lower the lr, reg or alpha"
                    )
            used.append((name, p))
        if self.sharded is not None:
            return  # FSDP2: every rank must reach the same verdict; the sums check after the step does
        if not used:
            return
        # one sum per weight (the cheapest full read: no temporary; one host sync): inf/NaN anywhere makes it
        # non-finite. It can also overflow for weights beyond ~1e34, which the sums of squares refuse anyway.
        totals = torch.stack([p.detach().sum(dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                              for _, p in used]).tolist()
        for (name, _), total in zip(used, totals):
            if not math.isfinite(total):
                raise ValueError(f"tritonprune: {name} holds inf/NaN weights (or beyond ~1e34); the training has "
                                 "diverged, nothing was modified. Lower the learning rate or restore a checkpoint")

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """What a resumed run needs to continue bitwise: the cached coefficients and their age."""
        return {"version": STATE_VERSION, "calls": self.calls, "coef_age": self._coef_age,
                "n_channels": sum(g.size for g in self.groups),
                "coef": None if self._coef is None else self._coef.detach().clone()}

    def check_state_dict(self, state: Mapping) -> None:
        """Raise ValueError if `state` (from `state_dict()`) does not fit these groups; changes nothing."""
        if not isinstance(state, Mapping):
            raise ValueError(f"tritonprune: the checkpoint's regularizer entry must be a dict, got {type(state).__name__}")
        for key in ("calls", "coef_age"):
            v = state.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"tritonprune: the checkpoint's regularizer entry has {key}={v!r}; expected an "
                                 "int >= 0 (a corrupt or hand-edited checkpoint)")
        n = sum(g.size for g in self.groups)
        coef = state.get("coef")
        if coef is not None and (not isinstance(coef, torch.Tensor) or tuple(coef.shape) != (n,)):
            raise ValueError(
                f"tritonprune: the checkpoint's cached coefficients have shape {tuple(getattr(coef, 'shape', ()))}, "
                f"the groups {n} channels: it was saved for another model (or before pruning)"
            )
        if coef is not None and (not coef.dtype.is_floating_point or not bool(torch.isfinite(coef).all())
                                 or bool((coef < 0).any())):
            raise ValueError(
                "tritonprune: the checkpoint's cached coefficients are not all finite and >= 0 (a corrupt or "
                "hand-edited checkpoint); nothing was loaded. Drop the 'tritonprune' entry to recompute them"
            )

    def load_state_dict(self, state: Mapping) -> None:
        self.check_state_dict(state)
        coef = state.get("coef")
        bufs = self.prepare() if coef is not None else None
        self.calls = int(state.get("calls", 0))
        self._coef_age = int(state.get("coef_age", 0))
        self._coef = None if coef is None else coef.to(device=bufs.device, dtype=torch.float32).clone()
        if self._bounds is not None:
            self._bounds.slot_coef = None  # re-measured from the restored coefficients at the next step

    # ------------------------------------------------------------------------------------------ apply

    # torch.compile: a compiled training step breaks its graph only around the regularization (the
    # engine reads addresses and caches plans on the host, nothing Dynamo should trace)
    @_not_compiled
    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """grad += term on every update slot; parameters whose .grad is None are skipped."""
        bufs = self.buffers
        self._apply(bufs, "grad", None)
        if self.sharded is not None:
            self.sharded.write_back(bufs)

    @_not_compiled
    @torch.no_grad()
    def apply_decoupled(self, lr_of_param: Mapping[int, float]) -> None:
        """w -= lr * term, with lr looked up by id(param); the term is computed from w before the shrink.

        Parameters missing from `lr_of_param` or without a .grad are left alone.
        """
        bufs = self.buffers
        if isinstance(self.regularizer, GrowingReg):  # its coefficients are shrink fractions per step: lr-free
            lr_of_param = {k: (1.0 if v > 0 else 0.0) for k, v in lr_of_param.items()}
        lr_by_name = {name: float(lr_of_param.get(id(p), 0.0)) for name, p in self._bounds.params.items()}
        if self.sharded is not None:
            lr_of_param = self.sharded.local_lr(lr_of_param)
        self._apply(bufs, "param", self._slot_scale(bufs, lr_of_param), lr_by_name)

    def _slot_scale(self, bufs: GroupBuffers, lr_of_param: Mapping[int, float]) -> torch.Tensor:
        key = tuple(float(lr_of_param.get(id(p), 0.0)) for _, _, p in bufs.entries)
        if key != self._scale_key:  # rebuilt only when some lr changed (schedulers)
            self._scale = torch.tensor([-lr for lr in key], dtype=torch.float32).to(bufs.device, non_blocking=True)
            self._scale_key = key
        return self._scale

    def _apply(self, bufs: GroupBuffers, target: str, slot_scale: torch.Tensor | None,
               scales: dict[str, float] | None = None) -> None:
        """Compute (or reuse) the coefficients, check the terms fit their targets, then write.

        Every check runs before the first write: a step that raises leaves grads and weights as they were.
        """
        r, be = self.regularizer, self._backend
        if bufs.n_slots == 0 and self.sharded is None:  # a rank with no local rows still joins the all-reduce
            self.calls += 1
            return
        decoupled = target == "param"
        check = not capturing(bufs.device)  # no host sync inside CUDA-graph capture: the warm-up step checked
        if isinstance(r, BNScale):
            if check:
                self._bounds.check_sign(r.reg, scales, decoupled)
            be.add_sign_(bufs, r.reg, target=target, slot_scale=slot_scale)
            self.calls += 1
            return
        fresh = self._coef is None or self._coef_age >= r.refresh_every
        coef = self._coef
        if fresh:
            sums = be.channel_sq_sums(bufs)
            if self.sharded is not None:
                sums = self.sharded.reduce_sums(sums)  # the one collective of a step
            if isinstance(r, GroupNorm):
                coef = be.group_norm_coef(bufs, sums, r.reg, r.alpha)
            elif isinstance(r, GroupLasso):
                coef = be.group_lasso_coef(bufs, sums, r.reg)
            elif isinstance(r, GrowingReg):
                offsets = bufs.group_offsets.tolist()
                coef = growing_coef(r, self.groups, offsets, sums, self._coef, self._shapes)
            else:
                raise TypeError(f"tritonprune: no backend path for regularizer {r!r}")
            if check:
                self._bounds.measure(sums, coef)
        measured = fresh
        if check and not fresh and self._bounds.slot_coef is None:  # coefficients restored from a checkpoint
            sums = be.channel_sq_sums(bufs)
            if self.sharded is not None:
                sums = self.sharded.reduce_sums(sums)  # every rank takes this branch at the same step
            self._bounds.measure(sums, coef)
            measured = True
        if check:
            self._bounds.check_scaled(scales, decoupled, measured)
        be.add_scaled_(bufs, coef, target=target, slot_scale=slot_scale)
        # committed only once written: a refused step leaves the cache and the counters as they were
        if fresh:
            self._coef, self._coef_age = coef, 0
        self._coef_age += 1
        self.calls += 1
