"""Pruning through the wrappers frameworks put around the model and the optimizer.

accelerate's AcceleratedOptimizer, Lightning Fabric's model and optimizer wrappers and torch.compile's
OptimizedModule: the plan must name the plain model's parameters, apply to a plain copy, and the
RegularizedOptimizer inside the chain must get the pruned groups so that the next step runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tritonprune as tpr
from tritonprune.wrappers import optimizer_chain, resolve_optimizer, unwrap_model


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


X = torch.randn(2, 3, 5, 5)


def _train_step(model, opt):
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()


def _regularized(model):
    return tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, X,
                                    regularizer=tpr.GroupNorm(reg=1e-2), backend="torch")


def _check_pruned(plain, plan, reg):
    assert plan.model_class == "torch.nn.modules.container.Sequential"
    assert set(plan.shapes) >= {"0.weight", "3.weight"}  # plain names, no wrapper prefix
    assert plain[0].out_channels == 4 and plain[3].out_channels == 3
    assert {s.name for g in reg.groups for s in g.slots} >= {"0.weight"}
    assert all(g.size in (4, 3) for g in reg.groups)  # the regularizer has the pruned groups
    fresh = _net()
    plan.apply(fresh)  # the plan applies to a plain model of the same class
    assert fresh[0].weight.shape == plain[0].weight.shape


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate")
    yield accelerate.Accelerator(cpu=True)
    accelerate.state.AcceleratorState._reset_state(True)  # the state is process-wide: leave none behind


def test_accelerated_optimizer_chain_is_resolved(accelerator):
    model = _net()
    reg = _regularized(model)
    pmodel, acc = accelerator.prepare(model, reg)
    plain = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(acc).__name__ == "AcceleratedOptimizer"
    assert optimizer_chain(acc)[:2] == [acc, reg] and resolve_optimizer(acc) is reg
    assert resolve_optimizer(plain) is plain.optimizer
    _train_step(pmodel, acc)
    plan = tpr.prune(pmodel, X, ratio=0.5, optimizer=acc)
    _check_pruned(model, plan, reg)
    momentum = reg.state[model[0].weight]["momentum_buffer"]
    assert momentum.shape == model[0].weight.shape  # the state was sliced along
    _train_step(pmodel, acc)  # the next step runs on the pruned groups
    assert reg._engine.calls >= 2


def test_accelerate_accumulation_applies_the_term_once_per_update():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        model = _net()
        reg = _regularized(model)
        pmodel, acc = accelerator.prepare(model, reg)
        calls = []
        orig = reg.regularize
        reg.regularize = lambda: (calls.append(1), orig())[1]
        for _ in range(4):
            with accelerator.accumulate(pmodel):
                accelerator.backward(pmodel(X).square().mean())
                acc.step()
                acc.zero_grad()
        assert len(calls) == 2
    finally:
        accelerate.state.AcceleratorState._reset_state(True)


def test_fabric_model_and_optimizer_are_unwrapped(tmp_path):
    from tv import torchvision

    torchvision()  # lightning imports torchvision through torchmetrics
    fabric_mod = pytest.importorskip("lightning.fabric")
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    model = _net()
    reg = _regularized(model)
    fmodel, fopt = fabric.setup(model, reg)
    assert unwrap_model(fmodel) is model and resolve_optimizer(fopt) is reg
    from lightning.pytorch.core.optimizer import LightningOptimizer

    assert resolve_optimizer(LightningOptimizer(reg)) is reg  # self.optimizers() in a LightningModule
    fopt.zero_grad()
    fabric.backward(fmodel(X).square().mean())
    fopt.step()
    plan = tpr.prune(fmodel, X, ratio=0.5, optimizer=fopt)
    _check_pruned(model, plan, reg)
    fopt.zero_grad()
    fabric.backward(fmodel(X).square().mean())
    fopt.step()
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())

    # fabric.save / fabric.load after pruning: the state dict carries the plan, a fresh model re-prunes;
    # both calls take what fabric.setup returned (the README's example) and look through it
    from tritonprune.integrations import carried_plan, carry_plan, reprune_before_load

    carry_plan(fmodel, plan)
    assert carried_plan(fmodel).removed == plan.removed
    fabric.save(tmp_path / "ckpt", {"model": fmodel})
    fresh = _net()
    ffresh = fabric.setup_module(fresh)
    reprune_before_load(ffresh)
    fabric.load(tmp_path / "ckpt", {"model": ffresh})
    assert fresh[0].out_channels == 4
    model.eval(), fresh.eval()
    assert torch.equal(fresh(X), model(X))


def test_torch_compile_module_is_unwrapped():
    model = _net()
    compiled = torch.compile(model, backend="eager")
    assert unwrap_model(compiled) is model
    reg = _regularized(compiled)
    groups = tpr.find_groups(compiled, X)
    assert all(not s.name.startswith("_orig_mod") for g in groups for s in g.slots)
    _train_step(compiled, reg)
    plan = tpr.prune(compiled, X, ratio=0.5, optimizer=reg)
    _check_pruned(model, plan, reg)
    _train_step(compiled, reg)


def test_nested_wrappers_and_bad_objects():
    model = _net()
    ddp_like = torch.compile(nn.DataParallel(model), backend="eager")  # DataParallel runs on CPU as a no-op
    assert unwrap_model(ddp_like) is model
    plan = tpr.prune(ddp_like, X, ratio=0.5, dry_run=True)
    plan.apply(copy.deepcopy(model))
    with pytest.raises(TypeError, match="expected a torch optimizer"):
        resolve_optimizer(object())
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        unwrap_model("model")


def test_accelerate_bf16_prepared_model_finds_groups_and_prunes():
    # mixed_precision="bf16" wraps the prepared model's forward in autocast: the groups must be those of
    # the plain model, and prune must work on what prepare returned
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    try:
        model = _net()
        want = len(tpr.find_groups(_net(), X))
        pmodel = accelerator.prepare(model)
        assert len(tpr.find_groups(pmodel, X)) == want > 0
        plan = tpr.prune(pmodel, X, ratio=0.5)
        assert model[0].out_channels == 4 and plan.removed
        assert pmodel(X).shape == (2, 3)
    finally:
        accelerate.state.AcceleratorState._reset_state(True)
