"""Models whose other training mode cannot run a batch of one through BatchNorm prune from a batch-of-1
example (the tracer's other-mode forward keeps BatchNorm in eval mode), and the pruned model runs and
trains: torchvision Inception-v3 (an auxiliary classifier read only in training), timm LeViT, and timm
CoaT-Lite (its blocks share modules: the run check's copy once tripped on them)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tv import timm, torchvision

import tritonprune as tpr


def _inception():
    return torchvision().models.inception_v3(init_weights=False, aux_logits=True), (3, 299, 299), 0.45


def _levit():
    return timm().create_model("levit_128s"), (3, 224, 224), 0.45


def _coat():
    # its relative-position convs split heads unequally (kept, warned): 0.71 of the parameters stay
    return timm().create_model("coat_lite_tiny", img_size=64), (3, 64, 64), 0.75


@pytest.mark.parametrize("make", [_inception, _levit, _coat], ids=["inception_v3", "levit_128s", "coat_lite_tiny"])
def test_prunes_from_a_batch_of_one_and_trains(make):
    torch.manual_seed(0)
    model, shape, bound = make()
    model.eval()
    before = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tpr.prune(model, torch.randn(1, *shape), ratio=0.5)
    after = sum(p.numel() for p in model.parameters())
    assert after < bound * before
    model.train()
    out = model(torch.randn(2, *shape))
    outs = list(out) if isinstance(out, tuple) else [out]  # Inception in training: (logits, aux_logits)
    sum(o.float().sum() for o in outs).backward()  # the training-only branches run on the cut channels
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
