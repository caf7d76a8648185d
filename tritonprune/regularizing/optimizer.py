"""RegularizedOptimizer: wraps any torch optimizer and adds the sparsity term at every step.

This module is the wrapper contract only (sharing state with the inner optimizer, closures, hooks,
checkpoints, pickling). The mathematics lives in `tritonprune.engine` and `tritonprune.regularizers`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..graph.fingerprint import fingerprint
from ..graph.group import Group
from ..graph.trace import unwrap
from .engine import Regularization, check_backend_name
from .regularizers import resolve_regularizer
from .strength import check_strength

# key of the wrapper's own entry in state_dict() (cached coefficients of refresh_every > 1)
STATE_KEY = "tritonprune"

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class RegularizedOptimizer(Optimizer):
    """Wrap a ``torch.optim`` optimizer so that every ``step()`` applies a channel-sparsity regularizer.

    Adding it to a training loop is a one-line change; the loop itself stays the same::

        import tritonprune as tpr

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = tpr.RegularizedOptimizer(opt, model, example_inputs, regularizer=tpr.GroupNorm(reg=5e-4))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)   # on the wrapper or not
        for x, y in loader:
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()          # regularize the gradients, then the inner step
            opt.zero_grad()
        sched.step()

    The wrapper *is* the inner optimizer as far as the rest of PyTorch is concerned: ``param_groups``
    is the inner optimizer's list and ``state`` its state, so LR schedulers, ``torch.amp.GradScaler``
    (``scaler.step(opt)`` unscales first, and skips the whole step, regularization included, on
    overflow), ``state_dict``/``load_state_dict`` checkpoints, ``zero_grad`` and step hooks keep
    working. Gradient accumulation is fine: the term is added once per ``step()``, not per backward.
    Parameters whose ``.grad`` is None (frozen or unused) are left untouched.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        model: the model whose channels are regularized.
        example_inputs: what ``torch.export`` takes (a tensor, a tuple of positional arguments or a
            dict of keyword arguments); used to find the channel groups. Not needed if ``groups`` is given.
        regularizer: a regularizer instance (``tpr.GroupNorm``, ``tpr.BNScale``, ``tpr.GroupLasso``) or
            one of the strings ``"group_norm"``, ``"bn_scale"``, ``"group_lasso"``.
        groups: precomputed groups (``tpr.find_groups(...)``); found from ``example_inputs`` if None.
        ignored_layers: modules to leave alone when finding groups.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"reference"``.

    Coupled or decoupled mode (``regularizer.decoupled``):

    * Coupled (default, what DepGraph and Network Slimming do): ``step()`` adds the term to ``.grad``
      and then runs the inner step, so the optimizer sees ``grad + term``. With SGD (momentum or not)
      this is the classic penalty. Adaptive optimizers (Adam, AdamW, RMSprop, Adagrad) divide each
      coordinate by a running gradient scale, which rescales the term too: weights with small
      gradients get shrunk much harder than ``reg`` suggests, and large ones barely at all — the same
      reason Adam's L2 ``weight_decay`` differs from AdamW's.
    * Decoupled (``decoupled=True``): the inner step runs on the raw gradients, then each regularized
      weight is shrunk in place by ``w -= lr * term``, with ``lr`` of the weight's param group (so LR
      schedules apply), like AdamW's weight decay. Use it with adaptive optimizers, or whenever the
      sparsity pressure should follow ``reg * lr`` exactly; keep the coupled mode to reproduce
      Torch-Pruning / the papers with SGD.

    ``regularize()`` adds the (coupled) term to the current gradients without stepping; ``step()``
    calls it for you. After pruning, hand the new groups over with ``reset_groups(groups)``.

    Notes: a closure passed to ``step`` is run here, once, under ``torch.enable_grad()``, and never
    passed on (the inner optimizer would recompute the gradients and lose the term); for that reason
    LBFGS, which needs its closure, cannot be wrapped. Gradient clipping done before ``step()`` does
    not clip the term, which is added inside ``step()``. Only parameters this optimizer steps get the
    term; every grouped parameter of ``model`` still counts in the importance. Pickling or
    deep-copying the wrapper copies the model and inner optimizer together and rebuilds the engine
    with its cached ``refresh_every`` coefficients. Parameters that do not require grad are never
    touched, even with a zero ``.grad`` kept by ``zero_grad(set_to_none=False)`` (they still count in
    the importance); freezing or unfreezing one mid-training takes effect at the next step. Public
    attributes the wrapper lacks are looked up on the inner optimizer (``opt.train()`` / ``opt.eval()``
    of schedule-free optimizers). Global optimizer hooks
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``) fire for both the wrapper and the
    inner optimizer.
    """

    # GradScaler must unscale the gradients before our step(): never let it hand us scaled gradients
    # with a found_inf flag, even when the inner optimizer (fused Adam, ...) supports that.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        example_inputs: Any = None,
        *,
        regularizer: Any,
        groups: Iterable[Any] | None = None,
        ignored_layers: Iterable[nn.Module] = (),
        backend: str = "auto",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"RegularizedOptimizer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "RegularizedOptimizer: LBFGS re-evaluates its closure inside step(), which would drop the "
                "regularization term; use a first-order optimizer (SGD, Adam, ...)"
            )
        if isinstance(optimizer, RegularizedOptimizer):
            raise TypeError(
                "RegularizedOptimizer: the optimizer is already regularized; wrap the inner one once"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"RegularizedOptimizer: model must be an nn.Module, got {type(model).__name__}")
        _check_owns_model_params(optimizer, model)
        if any(g.get("maximize", False) for g in optimizer.param_groups) and not getattr(
                resolve_regularizer(regularizer), "decoupled", False):
            raise ValueError(_MAXIMIZE)
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ValueError(
                "RegularizedOptimizer: the model has parameters on the meta device (no data to regularize); "
                "materialize it first (model.to_empty(device=...) and load the weights), then build the optimizer"
            )
        backend = check_backend_name(backend, "RegularizedOptimizer")
        regularizer = resolve_regularizer(regularizer)

        ignored_layers = tuple(ignored_layers)
        if groups is None:
            if example_inputs is None:
                raise ValueError(
                    "RegularizedOptimizer: pass example_inputs (to trace the model and find its channel "
                    "groups) or groups=tpr.find_groups(model, example_inputs)"
                )
            from ..graph.sharded import find_groups  # traces FSDP2-sharded models on a meta copy

            groups = find_groups(model, example_inputs, ignored_layers=ignored_layers)
        elif ignored_layers:
            raise ValueError(
                "RegularizedOptimizer: ignored_layers only applies when groups are found here; with "
                "groups=..., pass ignored_layers to tpr.find_groups instead"
            )

        # Optimizer.__init__ is not called: it would copy the param groups. Set up what it owns instead.
        self._optimizer = optimizer
        self.model = model
        self.regularizer = resolve_regularizer(regularizer)
        self.backend = backend
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        groups = list(groups)
        bad = next((i for i, g in enumerate(groups) if not isinstance(g, Group)), None)
        if bad is not None:
            raise TypeError(f"RegularizedOptimizer: groups[{bad}] is a {type(groups[bad]).__name__}, not a "
                            "tritonprune Group; pass tpr.find_groups(model, example_inputs)")
        self._engine = Regularization(model, groups, self.regularizer, backend=backend,
                                      params=self._own_params)
        # what the groups describe: prune() refuses to reuse them once the model's structure changed
        self.groups_fingerprint = fingerprint(unwrap(model))
        check_strength(self.regularizer, optimizer)
        if not self._engine.groups:
            warnings.warn(
                f"RegularizedOptimizer: the model ({type(model).__name__}) has no channel groups to regularize "
                "(every channel reaches an output, is ignored, or no layer has a rule); step() only runs the "
                "inner optimizer",
                stacklevel=2,
            )

    # -------------------------------------------------------------- shared with the inner optimizer
    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # A property, not a copy: load_state_dict replaces the inner list, and we must follow it.
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self._optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._optimizer.defaults = value

    # ------------------------------------------------------------------------- regularization
    @property
    def groups(self) -> list[Any]:
        """The channel groups being regularized."""
        return self._engine.groups

    def reset_groups(self, groups: Iterable[Any]) -> None:
        """Regularize these groups from now on (after pruning changed the model's channels)."""
        groups = list(groups)
        bad = next((i for i, g in enumerate(groups) if not isinstance(g, Group)), None)
        if bad is not None:
            raise TypeError(f"reset_groups: groups[{bad}] is a {type(groups[bad]).__name__}, not a tritonprune "
                            "Group; pass tpr.find_groups(model, example_inputs)")
        self._engine.set_groups(groups)
        self.groups_fingerprint = fingerprint(unwrap(self.model))

    def regularize(self) -> None:
        """Add the regularization term to the current ``.grad`` of the grouped parameters, in place.

        ``step()`` calls this itself (coupled mode); call it by hand only to inspect the gradients.
        Parameters whose ``.grad`` is None are skipped.
        """
        with torch.no_grad():
            self._engine.apply_to_grads()

    def _lr_of_param(self) -> dict[int, float]:
        # Only parameters this optimizer steps and that got a gradient are shrunk, each with its lr.
        lr_of_param: dict[int, float] = {}
        for group in self.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is not None and p.requires_grad:
                    lr_of_param[id(p)] = lr
        return lr_of_param

    def _shrink_decoupled(self) -> None:
        with torch.no_grad():
            self._engine.apply_decoupled(self._lr_of_param())

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Regularize, then run the inner optimizer's step (decoupled mode: step, then shrink).

        A closure is evaluated here, once, under ``torch.enable_grad()``; its loss is returned.
        Everything that can be checked is checked before anything is written: a coupled step that
        raises leaves the gradients untouched and does not step; a decoupled step validates the groups,
        backend and gradients before the inner step (only a term that would overflow the weights the
        inner step just produced is found after it, and then nothing is shrunk).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self.regularizer, "decoupled", False):
            self._engine.check_decoupled(self._lr_of_param())
            self._optimizer.step()
            try:
                self._shrink_decoupled()
            except ValueError as e:  # only what the inner step itself produced (inf weights) gets here
                raise ValueError(str(e).replace(
                    "nothing was modified", "the inner optimizer's step was taken (it produced these weights), "
                    "the shrink was not")) from None
        else:
            _refuse_maximize(self._optimizer)
            self.regularize()
            self._optimizer.step()
        return loss

    # ----------------------------------------------------------------------- forwarded methods
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._optimizer.add_param_group(param_group)
        self._engine.set_params(self._own_params)

    def _own_params(self) -> list[torch.Tensor]:
        # the term goes only onto parameters this optimizer steps (all of them still count in gamma)
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (hooks registered on the wrapper run around it).

        With ``refresh_every > 1`` it also holds, under ``"tritonprune"``, the cached coefficients and
        their age, so a resumed run continues bitwise; a plain optimizer loading it ignores the entry.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._optimizer.state_dict()
        if getattr(self.regularizer, "refresh_every", 1) > 1:
            state_dict[STATE_KEY] = self._engine.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer (hooks registered on the wrapper run around it)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        ours = state_dict.get(STATE_KEY)
        _check_state_shapes(self._optimizer, state_dict, self.model)  # before anything is loaded
        if ours is not None:
            self._engine.check_state_dict(ours)  # before the inner optimizer loads anything
            state_dict = {k: v for k, v in state_dict.items() if k != STATE_KEY}
        self._optimizer.load_state_dict(state_dict)
        if ours is not None:
            self._engine.load_state_dict(ours)
        else:  # a checkpoint without cached coefficients: recompute them at the next step
            self._engine.load_state_dict({})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: forward public attributes and methods of the inner
        # optimizer (train()/eval() of schedule-free optimizers, ...). Private and dunder names are not
        # forwarded, so pickling, copying and torch's own bookkeeping see this object only.
        if name.startswith("_") or "_optimizer" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(self.__dict__["_optimizer"], name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r} (nor has the wrapped "
                f"{type(self.__dict__['_optimizer']).__name__})"
            ) from None

    def __repr__(self) -> str:
        inner = repr(self._optimizer).replace("\n", "\n  ")
        return (
            f"{type(self).__name__}(\n  regularizer={self.regularizer!r},\n"
            f"  groups={len(self.groups)}, backend={self.backend!r},\n  optimizer={inner}\n)"
        )

    # ------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # Like torch's Optimizer, hooks are not pickled (they are often lambdas), nor is the step
        # wrapper an LR scheduler sets on the instance. The engine is rebuilt from what it was made of.
        return {
            "_optimizer": self._optimizer,
            "model": self.model,
            "regularizer": self.regularizer,
            "backend": self.backend,
            "groups": list(self.groups),
            "groups_fingerprint": self.__dict__.get("groups_fingerprint"),
            "engine_state": self._engine.state_dict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        groups = state.pop("groups")
        engine_state = state.pop("engine_state", {})
        self.__dict__.update(state)
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._engine = Regularization(self.model, groups, self.regularizer, backend=self.backend,
                                      params=self._own_params)
        if self.__dict__.get("groups_fingerprint") is None:
            self.groups_fingerprint = fingerprint(unwrap(self.model))
        if engine_state.get("coef") is not None:
            self._engine.load_state_dict(engine_state)


_MAXIMIZE = (
    "RegularizedOptimizer: the inner optimizer has maximize=True; it would ascend the regularization term "
    "added to .grad and grow the weights instead of shrinking them. Use decoupled=True in the regularizer "
    "(it shrinks the weights itself, whatever direction the inner step takes), or minimize the negated loss"
)


def _refuse_maximize(optimizer: Optimizer) -> None:
    """Coupled mode: refuse (before anything is written) a param group that maximizes (set after construction
    or by load_state_dict)."""
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError(_MAXIMIZE + "; nothing was modified")


def _follows(v: torch.Tensor, p: torch.Tensor) -> bool:
    """A state tensor that fits parameter `p`: p's shape, or p's shape with dims reduced to 1 (Adafactor's
    factored row_var / col_var). Tensors of another rank (scalars, quantized optimizers' block scales) do
    not claim to follow p's dims and are left to the optimizer."""
    return v.dim() != p.dim() or all(a == b or a == 1 for a, b in zip(v.shape, p.shape))


def _check_state_shapes(optimizer: Optimizer, state_dict: Any, model: nn.Module) -> None:
    """Refuse optimizer state whose tensors do not fit the parameters they would be loaded for (saved before
    pruning, or for another model): the next step would fail inside torch after the term was written."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        return  # torch's own load_state_dict says what is wrong
    names = {id(p): n for n, p in model.named_parameters()}
    by_index = {}
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
        if isinstance(saved, dict) and isinstance(saved.get("params"), list):
            by_index.update(zip(saved["params"], group["params"]))
    state = state_dict.get("state")
    for index, entry in (state.items() if isinstance(state, dict) else ()):
        p = by_index.get(index)
        if p is None or not isinstance(entry, dict):
            continue
        for key, v in entry.items():
            if isinstance(v, torch.Tensor) and not _follows(v, p):
                raise ValueError(
                    f"RegularizedOptimizer.load_state_dict: state {key!r} of {names.get(id(p), f'parameter {index}')} "
                    f"has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}: the checkpoint was saved before "
                    "pruning or for another model; nothing was loaded"
                )


def _check_owns_model_params(optimizer: Optimizer, model: nn.Module) -> None:
    model_params = {id(p) for p in model.parameters()}
    if not any(id(p) in model_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            "RegularizedOptimizer: none of the optimizer's parameters belongs to the model; build the "
            "optimizer from model.parameters() of the same model instance"
        )
