"""Regularizer objects: defaults, validation, string shortcuts, and which slots they read and write."""

from __future__ import annotations

import pytest

from tritonprune.graph.group import (
    AFFINE,
    BATCHNORM,
    CONV,
    CONV_T,
    IN,
    LAYERNORM,
    LINEAR,
    OUT,
    PRELU,
    STAT,
    Slot,
)
from tritonprune.regularizing.regularizers import BNScale, GroupLasso, GroupNorm, resolve_regularizer


def slot(kind, role, **kw):
    return Slot("m.weight", "m", kind, role, 0, 0, 4, **kw)


def test_defaults():
    g = GroupNorm()
    assert (g.reg, g.alpha, g.bias, g.decoupled, g.refresh_every) == (1e-4, 4, False, False, 1)
    assert (BNScale().reg, BNScale().decoupled) == (1e-5, False)
    assert (GroupLasso().reg, GroupLasso().refresh_every) == (1e-5, 1)


@pytest.mark.parametrize("make, arg", [
    (lambda: GroupNorm(reg=-1), "reg"), (lambda: GroupNorm(alpha=-0.5), "alpha"),
    (lambda: GroupNorm(refresh_every=0), "refresh_every"), (lambda: GroupNorm(reg=float("nan")), "reg"),
    (lambda: BNScale(reg=-1e-5), "reg"), (lambda: GroupLasso(reg=-1), "reg"),
    (lambda: GroupLasso(refresh_every=1.5), "refresh_every"),
])
def test_validation_names_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_resolve():
    assert isinstance(resolve_regularizer("group_norm"), GroupNorm)
    assert isinstance(resolve_regularizer("bn_scale"), BNScale)
    assert isinstance(resolve_regularizer("group_lasso"), GroupLasso)
    r = GroupNorm(reg=3e-4)
    assert resolve_regularizer(r) is r
    with pytest.raises(ValueError, match="group_norm"):
        resolve_regularizer("l1")


def test_group_norm_slots_follow_torch_pruning():
    s = GroupNorm().select
    for kind in (CONV, CONV_T, LINEAR):
        assert s(slot(kind, OUT)) == (True, True)
        assert s(slot(kind, IN)) == (True, True)
        assert s(slot(kind, OUT, is_bias=True)) == (False, False)
    assert s(slot(BATCHNORM, AFFINE)) == (True, True)
    assert s(slot(BATCHNORM, AFFINE, is_bias=True)) == (False, False)
    assert s(slot(LAYERNORM, AFFINE)) == (True, False)  # counts, not updated
    assert s(slot(BATCHNORM, STAT, is_buffer=True)) == (False, False)
    assert s(slot(PRELU, AFFINE)) == (False, False)
    sb = GroupNorm(bias=True).select
    assert sb(slot(CONV, OUT, is_bias=True)) == (True, True)
    assert sb(slot(BATCHNORM, AFFINE, is_bias=True)) == (True, True)
    assert sb(slot(LAYERNORM, AFFINE, is_bias=True)) == (True, False)


def test_batchnorm_regularizer_slots():
    for r, expect in ((BNScale(), (False, True)), (GroupLasso(), (True, True))):
        assert r.needs_batchnorm
        assert r.select(slot(BATCHNORM, AFFINE)) == expect
        assert r.select(slot(BATCHNORM, AFFINE, is_bias=True)) == (False, False)
        assert r.select(slot(CONV, OUT)) == (False, False)
        assert r.select(slot(LAYERNORM, AFFINE)) == (False, False)
    assert not GroupNorm().needs_batchnorm


def test_decoupled_is_documented():
    for cls in (GroupNorm, BNScale, GroupLasso):
        assert "decoupled" in cls.__doc__ and "AdamW" in cls.__doc__
