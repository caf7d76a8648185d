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

PLAN_FILE = "tritonprune_plan.json"


def inputs_like(example_inputs: Any, model: nn.Module) -> Any:
    """`example_inputs` on the device of `model`'s parameters, floating tensors cast to their dtype (a
    `bf16-true` / `.half()` model traced with float32 inputs fails in its first layer)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return example_inputs

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(param.device, param.dtype) if x.is_floating_point() else x.to(param.device)
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
