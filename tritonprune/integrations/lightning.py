"""PyTorch Lightning: prune at a step or an epoch, and resume from checkpoints taken after pruning.

    import lightning.pytorch as pl
    from tritonprune.integrations.lightning import PruneCallback

    class Module(pl.LightningModule):
        def configure_optimizers(self):
            opt = tpr.RegularizedOptimizer(torch.optim.SGD(self.parameters(), lr=0.1), self, EXAMPLE,
                                           regularizer=tpr.GroupNorm(reg=5e-4))
            # build the scheduler on the wrapper: Lightning rejects one built on the inner optimizer
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 10)}

    trainer = pl.Trainer(callbacks=[PruneCallback(EXAMPLE, ratio=0.5, at_epoch=5)])
    trainer.fit(Module())                    # later: trainer.fit(Module(), ckpt_path="last")

Lightning loads a checkpoint's weights before any callback's `on_load_checkpoint`, so the plan travels
in the state dict itself (its metadata, see `tritonprune.integrations.carry_plan`) as well as under
`checkpoint["tritonprune_plan"]`, and the callback registers (at `setup`) a load_state_dict pre-hook that
re-prunes the freshly built module by it. `configure_optimizers` runs after that, on the pruned module.
Without the callback (inference: `Module.load_from_checkpoint` cannot do it), call
`apply_checkpoint_plan(module, checkpoint)` before `module.load_state_dict(checkpoint["state_dict"])`.

Fabric needs no callback: `tpr.prune(fabric_model, x, optimizer=fabric_optimizer)` looks through
Fabric's wrappers, and `fabric.save` / `fabric.load` of `model.state_dict()` carry the plan the same way
once `carry_plan(model, plan)` and `reprune_before_load(model)` were called.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

try:
    from lightning.pytorch import Callback
except ImportError:  # the older standalone package
    from pytorch_lightning import Callback

from ..pruning.plan import PrunePlan
from ..pruning.pruner import prune
from . import (
    PLAN_KEY,
    carried_plan,
    carry_plan,
    check_schedule,
    inputs_like,
    mark_remappable,
    plan_of_state_dict,
    reprune_before_load,
    restore_groups,
)

__all__ = ["PruneCallback", "apply_checkpoint_plan", "carry_plan", "reprune_before_load", "PLAN_KEY"]


def apply_checkpoint_plan(module: nn.Module, checkpoint: Any) -> PrunePlan | None:
    """Prune `module` by the plan of a Lightning checkpoint (a path or the loaded dict) if it has one and
    `module` is not pruned yet; return the plan applied, or None."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    plan = plan_of_state_dict(checkpoint.get("state_dict"))
    if plan is None and PLAN_KEY in checkpoint:
        plan = PrunePlan.from_dict(checkpoint[PLAN_KEY])
    if plan is None:
        return None
    try:
        plan.check(module)
    except ValueError:
        sd = checkpoint.get("state_dict", {})
        own = module.state_dict()
        if all(own[n].shape == sd[n].shape for n in plan.shapes if n in own and n in sd):
            return None  # already pruned by it
        raise
    plan.apply(module)
    carry_plan(module, plan)
    return plan


class PruneCallback(Callback):
    """Prune the LightningModule and its optimizer once; training goes on.

    `PruneCallback(example_inputs, ratio=0.5, at_step=N)` prunes right after optimizer step N
    (`trainer.global_step == N`); `at_epoch=N` prunes at the start of epoch N (0 = before training).
    Other keyword arguments go to `tpr.prune`. `example_inputs` are moved to the module's device and
    floating dtype (so `precision="bf16-true"` works). One optimizer (a `RegularizedOptimizer` or any
    torch optimizer) or none is supported. The plan is `.plan`; checkpoints taken after pruning carry it
    and resume (see the module docstring).
    """

    def __init__(self, example_inputs: Any, ratio: float | None = 0.5, at_step: int | None = None,
                 at_epoch: int | None = None, **prune_kwargs: Any) -> None:
        check_schedule(at_step, at_epoch, epochs=True)
        if prune_kwargs.get("dry_run"):
            raise ValueError("PruneCallback: dry_run=True would prune nothing; call tpr.prune yourself for a plan")
        self.example_inputs = example_inputs
        self.ratio = ratio
        self.at_step = at_step
        self.at_epoch = at_epoch
        self.prune_kwargs = prune_kwargs
        self.plan: PrunePlan | None = None
        self._resumed = False  # the module was re-pruned from a checkpoint in this run

    def setup(self, trainer, pl_module, stage) -> None:
        reprune_before_load(pl_module)

    def _prune(self, trainer, pl_module) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            raise ValueError(
                f"PruneCallback: the module has {len(optimizers)} optimizers, and pruning slices the state of one; "
                "with several, prune in your own hook with tpr.prune(module, x, optimizer=the one to carry on)"
            )
        optimizer = optimizers[0] if optimizers else None
        self.plan = prune(pl_module, inputs_like(self.example_inputs, pl_module), ratio=self.ratio,
                          optimizer=optimizer, **self.prune_kwargs)
        mark_remappable(self.plan, optimizer, self.prune_kwargs)
        carry_plan(pl_module, self.plan)

    def on_fit_start(self, trainer, pl_module) -> None:
        # configure_optimizers ran on the re-pruned module: give it the groups of the uninterrupted run
        if self._resumed and len(trainer.optimizers) == 1:
            restore_groups(trainer.optimizers[0], self.plan)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.at_epoch is not None and self.plan is None and trainer.current_epoch == self.at_epoch:
            self._prune(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the first batch end that sees step N is the one whose optimizer step was step N (accumulation)
        if self.at_step is not None and self.plan is None and trainer.global_step == self.at_step:
            self._prune(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.plan is not None:
            checkpoint[PLAN_KEY] = self.plan.to_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # the weights are loaded already (the pre-hook re-pruned the module): remember the plan
        if self.plan is None:
            self.plan = carried_plan(pl_module)
            self._resumed = self.plan is not None
            if self.plan is None and PLAN_KEY in checkpoint:
                self.plan = PrunePlan.from_dict(checkpoint[PLAN_KEY])
        if self.plan is None and self._due_before(checkpoint):
            when = f"step {self.at_step}" if self.at_step is not None else f"epoch {self.at_epoch}"
            warnings.warn(
                f"tritonprune PruneCallback: resuming from a checkpoint taken at epoch {checkpoint.get('epoch')}, "
                f"step {checkpoint.get('global_step')}, after the callback's {when}, but the checkpoint carries "
                "no pruning plan (saved by a run without this callback, or before it pruned): this run goes on "
                "unpruned and will not prune; resume from a checkpoint saved after pruning",
                stacklevel=2,
            )

    def _due_before(self, checkpoint: dict) -> bool:
        """Whether the run that saved `checkpoint` should have pruned already."""
        if self.at_step is not None:
            return int(checkpoint.get("global_step", 0)) >= self.at_step
        return int(checkpoint.get("epoch", -1)) >= self.at_epoch
