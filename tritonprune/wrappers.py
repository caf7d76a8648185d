"""Look through the wrappers that training frameworks put around a model or an optimizer.

Plans, groups and the regularizer name the parameters of the plain model (`conv1.weight`, not
`module.conv1.weight` or `_orig_mod.conv1.weight`), and pruning must slice the state of the optimizer
that actually steps and hand new groups to the RegularizedOptimizer wherever it sits in the chain.
Frameworks are never imported here: wrappers are recognised by the attribute they keep the wrapped
object in, checked on the instance's own `__dict__` (Lightning's and Fabric's optimizer wrappers forward
every missing attribute to the wrapped optimizer, so `getattr` would skip a level).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

# (module class name, attribute holding the wrapped module); matched by name so nothing is imported
_MODEL_WRAPPERS = {
    "DistributedDataParallel": "module",  # torch DDP (also what accelerate.prepare returns on several ranks)
    "DataParallel": "module",
    "FullyShardedDataParallel": "module",  # FSDP1 (FSDP2's fully_shard keeps the module's own class)
    "OptimizedModule": "_orig_mod",  # torch.compile(model)
    "_FabricModule": "_original_module",  # lightning.fabric's fabric.setup(model)
    "DeepSpeedEngine": "module",
}


def unwrap_model(model: object) -> nn.Module:
    """The plain module inside DDP / DataParallel / FSDP1 / torch.compile / Fabric / DeepSpeed wrappers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = None
        for cls in type(model).__mro__:
            attr = _MODEL_WRAPPERS.get(cls.__name__)
            if attr is not None:
                inner = getattr(model, attr, None)  # a submodule, or a property (FSDP1's .module)
                break
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def optimizer_chain(optimizer: Any) -> list[Any]:
    """`optimizer` and every object it wraps, outermost first, following `.optimizer` / `._optimizer`
    (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer, Fabric's optimizer wrapper, the
    RegularizedOptimizer itself)."""
    chain = []
    obj = optimizer
    while obj is not None and all(obj is not c for c in chain):
        chain.append(obj)
        own = getattr(obj, "__dict__", {})
        obj = own.get("_optimizer", own.get("optimizer"))
    return chain


def is_regularized(optimizer: Any) -> bool:
    """True for a RegularizedOptimizer (or a wrapper posing as a subclass of one), by its class's
    `reset_groups`: pruning hands it the new groups through that method and nothing else, so the pruning
    half never imports the optimizer."""
    return callable(getattr(type(optimizer), "reset_groups", None))


def resolve_optimizer(optimizer: Any) -> Any:
    """The optimizer pruning must work on: the innermost RegularizedOptimizer in the chain (Lightning's and
    Fabric's wrappers pose as subclasses of what they wrap, so the last one is the real one), else the
    innermost torch optimizer. None stays None."""
    if optimizer is None:
        return None
    chain = optimizer_chain(optimizer)
    regularized = [o for o in chain if is_regularized(o)]
    if regularized:
        return regularized[-1]
    plain = [o for o in chain if isinstance(o, Optimizer) or hasattr(o, "param_groups")]
    if not plain:
        raise TypeError(
            f"optimizer: expected a torch optimizer (or a wrapper of one with .optimizer), got {type(optimizer).__name__}"
        )
    return plain[-1]


def check_optimizer_owns(optimizer: Any, model: nn.Module, who: str) -> None:
    """Refuse an optimizer none of whose parameters belongs to `model` (built over another model, or a copy
    of it): its state would silently not be sliced and a RegularizedOptimizer would keep stale groups."""
    if optimizer is None:
        return
    mine = {id(p) for p in model.parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if params and not any(id(p) in mine for p in params):
        raise ValueError(
            f"{who}: none of the optimizer's parameters belongs to this model (it was built over another model "
            "or a copy); nothing was changed. Pass the optimizer of this model instance, or optimizer=None"
        )
