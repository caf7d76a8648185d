"""Hugging Face `transformers.Trainer`: sparse training, pruning at a step, resuming after pruning.

    from transformers import Trainer, TrainingArguments
    from tritonprune.integrations.hf import PruneCallback, sparse_trainer

    SparseTrainer = sparse_trainer(Trainer)          # create_optimizer wraps the optimizer
    trainer = SparseTrainer(model=model, args=args, train_dataset=ds,
                            example_inputs=example, regularizer=tpr.GroupNorm(reg=5e-4),
                            callbacks=[PruneCallback(example, ratio=0.5, at_step=1000)])
    trainer.train()                                  # later: trainer.train(resume_from_checkpoint=True)

`optimizer_cls_and_kwargs=(tpr.RegularizedOptimizer, ...)` cannot work: the wrapper needs the model and
the optimizer it wraps. The Trainer calls `optimizer.step()` once per real optimizer step (after
gradient accumulation; accelerate's GradScaler skips the whole step on overflow), so the term is
applied exactly once per update.

Resuming after pruning: the Trainer loads the checkpoint's weights into `trainer.model` before any
callback event, so `PruneCallback` registers a load_state_dict pre-hook on the model (at `on_init_end`)
that, when the weights have fewer channels than the model, re-prunes the model by the plan saved in that
checkpoint. Without the callback, call `apply_checkpoint_plan(trainer.model, checkpoint_dir)` before
`trainer.train(resume_from_checkpoint=checkpoint_dir)`. Checkpoints and `trainer.save_model()` output
carry the plans in `tritonprune.json`, the file `tpr.save_pretrained` writes: `tpr.from_pretrained`
reloads any of them.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..pruning.history import applied_plans
from ..pruning.plan import PrunePlan
from ..pruning.pruner import prune
from ..regularizing.optimizer import RegularizedOptimizer
from ..wrappers import optimizer_chain, unwrap_model
from . import PLAN_FILE, REMAPPABLE, check_schedule, inputs_like, mark_remappable, restore_groups
from .hf_checkpoint import read_plan_file, save_with_plans, write_plan_file

__all__ = ["PruneCallback", "SparseTrainingMixin", "sparse_trainer", "apply_checkpoint_plan", "PLAN_FILE"]


def _expected_numels(plan: PrunePlan) -> dict[str, int]:
    from ..pruning.plan import _numel_after  # the plan's own arithmetic for the tensors it cuts

    return _numel_after(plan.shapes, plan._meta_cuts())


def _plans_fit(plans: list[PrunePlan], model: nn.Module, state_dict: dict[str, Any]) -> bool:
    """Whether `plans` apply to `model` now and turn it into the shapes of `state_dict`."""
    try:
        plans[0].check(model)
    except ValueError:
        return False
    numels = _expected_numels(plans[-1])
    return all(state_dict[n].numel() == k for n, k in numels.items() if n in state_dict)


def apply_checkpoint_plan(model: nn.Module, checkpoint_dir: str, optimizer: Any = None) -> PrunePlan | None:
    """Prune `model` by the plans saved in `checkpoint_dir/tritonprune.json` (a Trainer checkpoint or
    `save_model` output after `PruneCallback` pruned, or `tpr.save_pretrained` output), if there are any
    and the model is not pruned yet; return the last plan applied, or None. Call it before loading the
    checkpoint's weights into a freshly built model."""
    meta = read_plan_file(checkpoint_dir)
    if meta is None:
        return None
    plans = meta["plans"]
    model = unwrap_model(model)
    try:
        plans[0].check(model)
    except ValueError:
        if _is_pruned_by(plans[-1], model):
            return None  # already pruned by these plans
        raise
    for plan in plans:
        plan.apply(model, optimizer=optimizer)
    return plans[-1]


def _is_pruned_by(plan: PrunePlan, model: nn.Module) -> bool:
    tensors = dict(model.state_dict(keep_vars=True))
    return all(n in tensors and tensors[n].numel() == k for n, k in _expected_numels(plan).items())


def _checkpoint_dirs(output_dir: str) -> list[str]:
    """checkpoint-N folders of output_dir holding a plan, newest first."""
    dirs = glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*", PLAN_FILE))

    def step(path: str) -> int:
        m = re.search(r"checkpoint-(\d+)$", os.path.dirname(path))
        return int(m.group(1)) if m else -1

    return [os.path.dirname(p) for p in sorted(dirs, key=step, reverse=True)]


class SavesPlans:
    """Set as `model.save_pretrained` (an instance attribute) by `PruneCallback` once the model is pruned:
    the Trainer saves checkpoints and `trainer.save_model()` output through `model.save_pretrained`, and
    no callback event follows `save_model`, so the plan file is written here. It saves as
    `tpr.save_pretrained` does: the class's own `save_pretrained`, with the config that rebuilds the
    pruned model, plus `tritonprune.json`. A copy or a pickle of the model keeps it, pointing at the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        model = self.model
        own = functools.partial(type(model).save_pretrained, model)
        save_with_plans(model, save_directory, applied_plans(model),
                        lambda path, **kw: own(path, *args, **kw), **kwargs)


def _save_plans_with_model(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)) and getattr(model, "config", None) is not None:
        model.__dict__["save_pretrained"] = SavesPlans(model)


class PruneCallback(TrainerCallback):
    """Prune the Trainer's model and optimizer after optimizer step `at_step`; training goes on.

    `PruneCallback(example_inputs, ratio=0.5, at_step=N, **prune_kwargs)`: the arguments of
    `tpr.prune` (`importance`, `global_pruning`, `round_to`, `ignored_layers`, `layer_ratios`, ...).
    `example_inputs` are moved to the model's device and floating dtype. The plan is kept in `.plan`;
    every checkpoint saved after pruning and every `trainer.save_model()` output holds `tritonprune.json`
    (what `tpr.save_pretrained` writes: `tpr.from_pretrained` reloads all of them), and resuming from
    such a checkpoint re-prunes the freshly built model before its weights load (see the module docstring).
    """

    def __init__(self, example_inputs: Any, ratio: float | None = 0.5, at_step: int | None = None,
                 **prune_kwargs: Any) -> None:
        check_schedule(at_step)
        if prune_kwargs.get("dry_run"):
            raise ValueError("PruneCallback: dry_run=True would prune nothing; call tpr.prune yourself for a plan")
        self.example_inputs = example_inputs
        self.ratio = ratio
        self.at_step = at_step
        self.prune_kwargs = prune_kwargs
        self.plan: PrunePlan | None = None
        self._output_dir: str | None = None
        self._resumed = False  # the model was re-pruned from a checkpoint in this run

    # ------------------------------------------------------------------------------ resume
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._output_dir = args.output_dir
        if model is not None:
            unwrap_model(model).register_load_state_dict_pre_hook(self._before_load)

    def _before_load(self, module: nn.Module, state_dict, prefix, *args) -> None:
        if prefix or self.plan is not None:
            return
        own = module.state_dict(keep_vars=True)
        if not any(n in own and t.numel() < own[n].numel() for n, t in state_dict.items()):
            return  # not weights of a pruned copy (load_state_dict reports any other mismatch itself)
        for folder in _checkpoint_dirs(self._output_dir or "."):
            plans = read_plan_file(folder)["plans"]
            if _plans_fit(plans, module, state_dict):
                for plan in plans:
                    plan.apply(module)
                self.plan, self._resumed = plans[-1], True
                _save_plans_with_model(module)
                return
        raise ValueError(
            "tritonprune PruneCallback: the checkpoint's weights have fewer channels than the model, and no "
            f"{PLAN_FILE} under {self._output_dir!r}/checkpoint-* turns the model into them; call "
            "tritonprune.integrations.hf.apply_checkpoint_plan(trainer.model, checkpoint_dir) before "
            "trainer.train(resume_from_checkpoint=checkpoint_dir)"
        )

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self._resumed and optimizer is not None:
            restore_groups(optimizer, self.plan)  # the groups of the uninterrupted run: a bitwise resume

    # ------------------------------------------------------------------------------ pruning
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.at_step or self.plan is not None:
            return
        plain = unwrap_model(model)
        self.plan = prune(plain, inputs_like(self.example_inputs, plain), ratio=self.ratio,
                          optimizer=optimizer, **self.prune_kwargs)
        mark_remappable(self.plan, optimizer, self.prune_kwargs)
        _save_plans_with_model(plain)

    def on_save(self, args, state, control, model=None, **kwargs):
        # a PreTrainedModel wrote tritonprune.json through SavesPlans already; a plain torch module
        # (saved by the Trainer as bare weights) gets its plans here
        if self.plan is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, PLAN_FILE)):
            plain = unwrap_model(model) if model is not None else None
            write_plan_file(folder, (applied_plans(plain) if plain is not None else []) or [self.plan])


class SparseTrainingMixin:
    """Mix into a `transformers.Trainer` subclass: `create_optimizer` wraps the optimizer it made (or
    the one passed in `optimizers=`) in a `tpr.RegularizedOptimizer`.

    Extra keyword arguments of the Trainer: `example_inputs` (to find the groups), `regularizer`
    (`tpr.GroupNorm(...)`, ...), and `sparse_kwargs` (more `RegularizedOptimizer` arguments:
    `ignored_layers`, `backend`, `groups`). `sparse_trainer(Trainer)` builds the class for you.
    """

    def __init__(self, *args: Any, example_inputs: Any = None, regularizer: Any = None,
                 sparse_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if regularizer is None or (example_inputs is None and "groups" not in (sparse_kwargs or {})):
            raise TypeError(
                f"{type(self).__name__}: pass example_inputs=... and regularizer=tpr.GroupNorm(...) "
                "(the RegularizedOptimizer traces the model with the example inputs)"
            )
        self.tpr_example_inputs = example_inputs
        self.tpr_regularizer = regularizer
        self.tpr_sparse_kwargs = dict(sparse_kwargs or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        if any(isinstance(o, RegularizedOptimizer) for o in optimizer_chain(optimizer)):
            return optimizer  # a second train() call: accelerate already wraps our optimizer
        model = unwrap_model(self.model)
        kwargs = dict(self.tpr_sparse_kwargs)
        resumed = [cb.plan for cb in self.callback_handler.callbacks
                   if isinstance(cb, PruneCallback) and cb._resumed and cb.plan.info.get(REMAPPABLE)]
        if resumed and "groups" not in kwargs and not kwargs.get("ignored_layers"):
            kwargs["groups"] = resumed[0].remap(resumed[0].groups)  # re-pruned from a checkpoint: no new trace
        self.optimizer = RegularizedOptimizer(
            optimizer, model, inputs_like(self.tpr_example_inputs, model), regularizer=self.tpr_regularizer, **kwargs,
        )
        return self.optimizer


def sparse_trainer(trainer_cls: type | None = None) -> type:
    """A subclass of `trainer_cls` (default `transformers.Trainer`) that trains with a RegularizedOptimizer:
    `sparse_trainer(Trainer)(model=..., args=..., example_inputs=x, regularizer=tpr.GroupNorm(reg=5e-4))`."""
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    return type(f"Sparse{trainer_cls.__name__}", (SparseTrainingMixin, trainer_cls), {})
