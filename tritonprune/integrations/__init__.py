"""Training-framework integrations. Each submodule imports its framework when it is imported itself:
`import tritonprune` never loads transformers, accelerate or lightning.

    tritonprune.integrations.hf          PruneCallback, sparse_trainer / SparseTrainingMixin, apply_checkpoint_plan
    tritonprune.integrations.lightning   PruneCallback (Trainer and LightningModule checkpoints)

Both share the helpers below: example inputs moved to the model's device and floating dtype, and the
plan file written next to a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PLAN_FILE = "tritonprune.json"  # = hf_checkpoint.FILE: one name for every saved plan


def inputs_like(example_inputs: Any, model: nn.Module) -> Any:
    """`example_inputs` on the device of `model`'s parameters, floating tensors cast to their dtype when
    they all share one (a `bf16-true` / `.half()` model traced with float32 inputs fails in its first
    layer; a model mixing dtypes gets its inputs' dtypes unchanged)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        return example_inputs
    device = params[0].device
    dtypes = {p.dtype for p in params}
    dtype = dtypes.pop() if len(dtypes) == 1 else None

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype) if x.is_floating_point() and dtype is not None else x.to(device)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(move(v) for v in x)
        return x

    return move(example_inputs)


def check_schedule(at_step: int | None, at_epoch: int | None = None, *, epochs: bool = False) -> None:
    """Exactly one of at_step / at_epoch, a non-negative int (at_epoch only where the framework has epochs)."""
    given = [(n, v) for n, v in (("at_step", at_step), ("at_epoch", at_epoch)) if v is not None]
    if len(given) != 1:
        what = "at_step=N or at_epoch=N" if epochs else "at_step=N"
        raise ValueError(f"PruneCallback: give {what} (when to prune), got {dict(given) or 'neither'}")
    name, value = given[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "at_epoch" else 1):
        raise ValueError(f"PruneCallback: {name} must be an int >= {0 if name == 'at_epoch' else 1}, got {value!r}")


# ------------------------------------------------------------------ the regularized groups after a resume
# An uninterrupted run regularizes, after pruning, the optimizer's groups remapped by the plan; a resumed
# run builds its RegularizedOptimizer on the re-pruned model, whose fresh trace may group its channels
# differently (or in another order, which changes float32 sums). Handing it the remapped groups makes
# the resume bitwise.

REMAPPABLE = "regularized_groups"  # plan.info key: the plan's groups were the RegularizedOptimizer's


def mark_remappable(plan: Any, optimizer: Any, prune_kwargs: dict[str, Any]) -> None:
    """Record in `plan.info` whether `tpr.prune` took the RegularizedOptimizer's groups (its own rule:
    no `groups=`, no `ignored_layers`)."""
    from ..regularizing.optimizer import RegularizedOptimizer
    from ..wrappers import resolve_optimizer

    plan.info[REMAPPABLE] = bool(
        prune_kwargs.get("groups") is None and not prune_kwargs.get("ignored_layers")
        and isinstance(resolve_optimizer(optimizer), RegularizedOptimizer)
    )


def restore_groups(optimizer: Any, plan: Any) -> bool:
    """Give the RegularizedOptimizer in `optimizer`'s chain the groups the run had after pruning by `plan`
    (when `mark_remappable` said they can be rebuilt); True if it did."""
    from ..regularizing.optimizer import RegularizedOptimizer
    from ..wrappers import resolve_optimizer

    reg = resolve_optimizer(optimizer)
    if not (isinstance(reg, RegularizedOptimizer) and plan.info.get(REMAPPABLE)):
        return False
    reg.reset_groups(plan.remap(plan.groups))
    return True


# ------------------------------------------------------------------ plans carried by state dicts
# A pruned module's state_dict() carries its plan (as JSON) in the state dict's metadata, next to the
# version numbers torch keeps there, so any checkpoint made of it (torch.save, Lightning, weights-only)
# tells a freshly built model how to re-prune itself before the weights load.

PLAN_KEY = "tritonprune_plan"


def carry_plan(module: nn.Module, plan: Any) -> None:
    """From now on `module.state_dict()` carries `plan` in its root metadata (`state_dict._metadata[""]`).
    Wrappers (what `fabric.setup` returns, DDP, torch.compile) are looked through, as `prune` does: the
    plain module carries it, and the wrappers' state dicts are the plain module's."""
    import json

    from ..wrappers import unwrap_model

    module = unwrap_model(module)
    if getattr(module, "_tritonprune_plan_json", None) is None:
        module.register_state_dict_post_hook(_add_plan_metadata)
    module._tritonprune_plan_json = json.dumps(plan.to_dict())


def carried_plan(module: nn.Module) -> Any:
    """The plan `module` was pruned by, as recorded by `carry_plan` (None if none)."""
    from ..wrappers import unwrap_model

    module = unwrap_model(module)
    return _plan_from_json(getattr(module, "_tritonprune_plan_json", None))


def plan_of_state_dict(state_dict: Any) -> Any:
    """The PrunePlan a state dict carries (see `carry_plan`), or None."""
    meta = getattr(state_dict, "_metadata", None) or {}
    return _plan_from_json(meta.get("", {}).get(PLAN_KEY))


def reprune_before_load(module: nn.Module) -> None:
    """From now on, `module.load_state_dict(sd)` with weights that carry a plan (see `carry_plan`) and
    have other shapes than the module re-prunes the module by that plan first. Wrappers are looked
    through (the plain module gets the hook)."""
    from ..wrappers import unwrap_model

    module = unwrap_model(module)
    if not getattr(module, "_tritonprune_reprune_hook", False):
        module.register_load_state_dict_pre_hook(_reprune_pre_hook)
        module._tritonprune_reprune_hook = True


# module-level hooks (no closures): a module holding them still pickles
def _add_plan_metadata(module, state_dict, prefix, local_metadata) -> None:
    if not prefix and getattr(module, "_tritonprune_plan_json", None) is not None:
        local_metadata[PLAN_KEY] = module._tritonprune_plan_json


def _reprune_pre_hook(module, state_dict, prefix, local_metadata, *args) -> None:
    if prefix:
        return
    plan = _plan_from_json(local_metadata.get(PLAN_KEY))
    if plan is None:
        return
    own = dict(module.state_dict(keep_vars=True))
    if all(own[n].shape == state_dict[n].shape for n in plan.shapes if n in own and n in state_dict):
        return  # the module has these shapes already
    plan.apply(module)
    carry_plan(module, plan)


def _plan_from_json(text: Any) -> Any:
    if text is None:
        return None
    import json

    from ..pruning.plan import PrunePlan

    return PrunePlan.from_dict(json.loads(text) if isinstance(text, str) else text)
