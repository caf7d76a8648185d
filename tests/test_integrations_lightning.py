"""A tiny Lightning fit on CPU: sparse training, pruning at a step or an epoch, and a resume from a
checkpoint taken after pruning that ends bitwise where the uninterrupted fit ended."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tv import torchvision

import tritonprune as tpr

torchvision()  # lightning imports torchvision through torchmetrics (tests/tv.py's stand-in)
pl = pytest.importorskip("lightning.pytorch")
tl = pytest.importorskip("tritonprune.integrations.lightning")

EXAMPLE = torch.randn(2, 6)


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)
        self.steps = 0

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = tpr.RegularizedOptimizer(torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9), self, EXAMPLE,
                                       regularizer=tpr.GroupNorm(reg=1e-2), backend="torch")
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)}


def _loader():
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)


def _trainer(tmp_path, callback, epochs=3):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accumulate_grad_batches=2, callbacks=[callback, ckpt])


def test_fit_prunes_at_step_and_resumes_bitwise(tmp_path):
    module = Module()
    cb = tl.PruneCallback(EXAMPLE, ratio=0.5, at_step=3)
    calls = []
    orig = tpr.RegularizedOptimizer.regularize
    tpr.RegularizedOptimizer.regularize = lambda self: (calls.append(1), orig(self))[1]
    try:
        _trainer(tmp_path, cb).fit(module, _loader())
    finally:
        tpr.RegularizedOptimizer.regularize = orig
    assert len(calls) == 12  # 3 epochs x 8 batches / 2 accumulated: the term once per optimizer step
    assert module.fc1.out_features == 8 and module.fc2.out_features == 6
    final = {k: v.clone() for k, v in module.state_dict().items()}
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    assert ckpt[tl.PLAN_KEY]["groups"] and ckpt["state_dict"]["fc1.weight"].shape == (8, 6)

    # a fresh module is unpruned: the callback re-prunes it before Lightning loads the weights
    module2 = Module()
    cb2 = tl.PruneCallback(EXAMPLE, ratio=0.5, at_step=3)
    _trainer(tmp_path / "resumed", cb2).fit(module2, _loader(), ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert cb2.plan is not None and cb2.plan.removed == cb.plan.removed
    assert cb2.plan.info["regularized_groups"] and module2.trainer.optimizers[0].groups == cb.plan.remap(cb.plan.groups)
    for k, v in module2.state_dict().items():
        assert torch.equal(v, final[k]), k

    # inference: a plain module and the checkpoint, without a Trainer
    module3 = Module()
    assert tl.apply_checkpoint_plan(module3, tmp_path / "epoch=2.ckpt") is not None
    module3.load_state_dict(torch.load(tmp_path / "epoch=2.ckpt", weights_only=True)["state_dict"])
    assert torch.equal(module3(EXAMPLE), module(EXAMPLE))


def test_fit_prunes_at_epoch(tmp_path):
    module = Module()
    cb = tl.PruneCallback(EXAMPLE, ratio=0.5, at_epoch=1)
    _trainer(tmp_path, cb, epochs=2).fit(module, _loader())
    assert module.fc1.out_features == 8
    assert torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["state_dict"]["fc1.weight"].shape == (16, 6)
    assert tl.PLAN_KEY in torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    with pytest.raises(ValueError, match="at_step=N or at_epoch=N"):
        tl.PruneCallback(EXAMPLE, at_step=2, at_epoch=1)


def test_resume_without_the_expected_plan_warns(tmp_path):
    # a checkpoint taken after the pruning epoch by a run without the callback: the resumed run would go
    # on unpruned without a word
    _trainer(tmp_path, pl.Callback(), epochs=2).fit(Module(), _loader())
    cb = tl.PruneCallback(EXAMPLE, ratio=0.5, at_epoch=1)
    with pytest.warns(UserWarning, match="carries no pruning plan"):
        _trainer(tmp_path / "resumed", cb, epochs=3).fit(Module(), _loader(), ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert cb.plan is None


def test_readme_resume_with_save_last(tmp_path):
    # the README's example: ModelCheckpoint(save_last=True) writes last.ckpt, and ckpt_path="last" resumes
    # from it (under the default ModelCheckpoint there is no last.ckpt, and Lightning trains from scratch)
    def trainer(epochs):
        return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp_path),
                          callbacks=[tl.PruneCallback(EXAMPLE, ratio=0.5, at_epoch=1),
                                     pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)])
    trainer(2).fit(Module(), _loader())
    assert (tmp_path / "last.ckpt").exists()
    module = Module()
    t = trainer(3)
    t.fit(module, _loader(), ckpt_path="last")
    assert module.fc1.out_features == 8 and t.global_step == 24
