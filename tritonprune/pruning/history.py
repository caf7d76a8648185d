"""What pruning did to a model: the plans applied to it, in order, and its config before the first.

`PrunePlan.apply` records here; `tritonprune.save_pretrained` reads it to write a checkpoint that rebuilds
the pruned model. Kept in the model's own `__dict__`, so a Transaction restores it with the model.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

PLANS = "_tritonprune_plans"
ORIGINAL_CONFIG = "_tritonprune_original_config"


def config_snapshot(model: nn.Module) -> dict[str, Any] | None:
    """The model's HF config as a dict (before pruning changes it), or None for a model without one."""
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None and hasattr(config, "to_dict") else None


def record_plan(model: nn.Module, plan: Any, config_before: dict[str, Any] | None) -> None:
    """Called by PrunePlan.apply: remember the plan (and the config of the unpruned model, once)."""
    # a new list, not an append: a Transaction restores the module's attributes by reference
    model.__dict__[PLANS] = [*model.__dict__.get(PLANS, []), plan]
    model.__dict__.setdefault(ORIGINAL_CONFIG, config_before)


def applied_plans(model: nn.Module) -> list:
    return list(model.__dict__.get(PLANS, []))


def replace_since(model: nn.Module, start: int, plan: Any) -> None:
    """The plans recorded from position `start` on (one call's rounds) replaced by `plan`, their composition
    on the model as it was, which carries the call's info (what a checkpoint must say about it)."""
    plans = model.__dict__.get(PLANS, [])
    if len(plans) > start:
        model.__dict__[PLANS] = [*plans[:start], plan]
