"""Gradients after our regularization against Torch-Pruning 1.6.1's `regularize`.

GroupNormPruner with GroupMagnitudeImportance(p=2), BNScalePruner with BNScaleImportance and
group_lasso False/True; relative error < 1e-5 in float64 and < 1e-4 in float32. First on a hand-built
CNN with hand-built groups, then on the zoo models with find_groups. Where Torch-Pruning is wrong (NaN
gamma, crashes, grouped-conv in-channels, depthwise convs left out of importance) the expectation is
written out and checked against our backends instead.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn

tp = pytest.importorskip("torch_pruning")

import tp_oracle  # noqa: E402
import zoo  # noqa: E402

from tritonprune.graph.group import AFFINE, BATCHNORM, CONV, IN, LINEAR, OUT, Group, Slot  # noqa: E402
from tritonprune.regularizing.engine import Regularization  # noqa: E402
from tritonprune.regularizing.regularizers import BNScale, GroupLasso, GroupNorm  # noqa: E402

REG = 1e-2
RTOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def with_grads(m: nn.Module, x) -> nn.Module:
    """Gradients from one backward, scaled so the term is not lost in them; dropout off."""
    m.eval()
    m(*x).float().sum().backward()
    for p in m.parameters():
        if p.grad is not None:
            p.grad.mul_(1e-2)
    return m


def clone(m: nn.Module) -> nn.Module:
    c = copy.deepcopy(m)
    for p, q in zip(m.parameters(), c.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return c


def tp_regularize(m: nn.Module, x, kind: str, ignored_names: tuple[str, ...] | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ignored_names is None:
            ignored = tp_oracle.output_layers(tp_oracle.build_graph(m, x), m)
        else:
            ignored = [m.get_submodule(n) for n in ignored_names]
        args = tp_oracle._as_args(x)
        if kind == "group_norm":
            pr = tp.pruner.GroupNormPruner(m, args, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=REG, ignored_layers=ignored)
        else:
            pr = tp.pruner.BNScalePruner(m, args, importance=tp.importance.BNScaleImportance(), reg=REG,
                                         ignored_layers=ignored, group_lasso=(kind == "group_lasso"))
    pr.regularize(m)


OURS = {"group_norm": lambda: GroupNorm(REG), "bn_scale": lambda: BNScale(REG), "group_lasso": lambda: GroupLasso(REG)}


def compare(m: nn.Module, x, groups, kind: str, dtype: torch.dtype, backend: str = "torch",
            ignored_names: tuple[str, ...] | None = None) -> None:
    ours, theirs = clone(m), clone(m)
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    Regularization(ours, groups, OURS[kind](), backend=backend).apply_to_grads()
    tp_regularize(theirs, x, kind, ignored_names)
    tg = dict(theirs.named_parameters())
    touched = 0
    for n, p in ours.named_parameters():
        if p.grad is None:
            continue
        t = tg[n].grad
        assert rel_err(p.grad, t) < RTOL[dtype], n
        if dtype == torch.float64:  # the term alone, not only the sum
            d_ours, d_tp = p.grad - before[n], t - before[n]
            assert rel_err(d_ours, d_tp) < RTOL[dtype] or d_tp.abs().max() == d_ours.abs().max() == 0, n
        touched += int(not torch.equal(t, before[n]))
    assert touched > 0


# ------------------------------------------------------------------------------------ hand-built CNN


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(7)
        self.conv2 = nn.Conv2d(7, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.conv3 = nn.Conv2d(5, 3, 1)
        self.bn3 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        return self.fc(self.bn3(self.conv3(x)).flatten(1))


def small_cnn_groups() -> list[Group]:
    def s(name, kind, role, dim, n, **kw):
        return Slot(name, name.rsplit(".", 1)[0], kind, role, dim, 0, n, **kw)

    return [
        Group(7, (s("conv1.weight", CONV, OUT, 0, 7), s("conv1.bias", CONV, OUT, 0, 7, is_bias=True),
                  s("bn1.weight", BATCHNORM, AFFINE, 0, 7), s("bn1.bias", BATCHNORM, AFFINE, 0, 7, is_bias=True),
                  s("conv2.weight", CONV, IN, 1, 7))),
        Group(5, (s("conv2.weight", CONV, OUT, 0, 5), s("conv2.bias", CONV, OUT, 0, 5, is_bias=True),
                  s("bn2.weight", BATCHNORM, AFFINE, 0, 5), s("bn2.bias", BATCHNORM, AFFINE, 0, 5, is_bias=True),
                  s("conv3.weight", CONV, IN, 1, 5))),
        Group(3, (s("conv3.weight", CONV, OUT, 0, 3), s("conv3.bias", CONV, OUT, 0, 3, is_bias=True),
                  s("bn3.weight", BATCHNORM, AFFINE, 0, 3), s("fc.weight", LINEAR, IN, 1, 3, repeat=16))),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", list(OURS))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_small_cnn_hand_groups(kind, dtype, backend):
    torch.manual_seed(0)
    m = zoo.randomize_bn_(SmallCNN()).to(dtype)
    x = (torch.randn(2, 3, 4, 4, dtype=dtype),)
    compare(with_grads(m, x), x, small_cnn_groups(), kind, dtype, backend)


# ---------------------------------------------------------------------------------------- zoo models


@functools.cache
def zoo_groups(name: str):
    from tritonprune.graph import find_groups

    torch.manual_seed(0)
    m, x = zoo.ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(find_groups(m, x))


@functools.cache
def zoo_output_layers(name: str) -> tuple[str, ...]:
    m, x = zoo.ZOO[name]()
    names = {id(mod): n for n, mod in m.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(names[id(mod)] for mod in tp_oracle.output_layers(tp_oracle.build_graph(m, x), m))


def zoo_case(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    m, x = zoo.ZOO[name]()
    m = zoo.randomize_bn_(m).to(dtype)
    x = tuple(t.to(dtype) for t in x)
    return with_grads(m, x), x


def depthwise_modules(m: nn.Module) -> set[str]:
    return {n for n, c in m.named_modules()
            if isinstance(c, nn.modules.conv._ConvNd) and c.groups > 1 and c.groups == c.out_channels}


def without_depthwise(groups, m: nn.Module) -> list[Group]:
    """TP's regularize and importance skip depthwise convs (their handler is not prune_conv_out_channels)."""
    dw = depthwise_modules(m)
    return [Group(g.size, tuple(s for s in g.slots if s.module not in dw), g.blocks, g.origin) for g in groups]


_OK = zoo.ZOO_TP_COMPATIBLE - tp_oracle.TP_WRONG_SLOTS
KINDS_OF = {  # which of TP's regularizers run (and agree on the groups) per zoo model
    name: [k for k, bad in (("group_norm", tp_oracle.TP_GROUPNORM_REG_FAILS),
                             # BNScale: TP regularizes every BatchNorm of the model, ours those in groups
                             ("bn_scale", {"prelu_instancenorm_groupnorm"}),
                             ("group_lasso", tp_oracle.TP_GROUP_LASSO_FAILS)) if name not in bad]
    for name in sorted(_OK)
}


@pytest.mark.parametrize("name", sorted(KINDS_OF))
def test_zoo_models(name):
    """One test per model, so each model is exported once per worker."""
    assert KINDS_OF[name]
    for kind in KINDS_OF[name]:
        for dtype in (torch.float64, torch.float32) if kind == "group_norm" else (torch.float64,):
            m, x = zoo_case(name, dtype)
            groups = zoo_groups(name)
            if kind == "group_norm":
                groups = without_depthwise(groups, m)
            compare(m, x, groups, kind, dtype, ignored_names=zoo_output_layers(name))


# ------------------------------------------------------------------------ where Torch-Pruning is wrong


def test_depthwise_counts_and_is_updated():
    """Ours counts and updates depthwise conv rows (DESIGN: every conv out-row); TP leaves them out."""
    m, x = zoo_case("mobilenet_v2", torch.float64)
    dw = depthwise_modules(m)
    assert dw
    ours, ref = clone(m), clone(m)
    Regularization(ours, zoo_groups("mobilenet_v2"), GroupNorm(REG), backend="torch").apply_to_grads()
    Regularization(ref, zoo_groups("mobilenet_v2"), GroupNorm(REG), backend="reference").apply_to_grads()
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-6, n
    name = sorted(dw)[0] + ".weight"
    assert not torch.equal(ours.get_parameter(name).grad, m.get_parameter(name).grad)


def test_equal_channels_gamma_one_where_tp_writes_nan():
    torch.manual_seed(0)
    m = SmallCNN().double()
    with torch.no_grad():
        for mod in (m.conv1, m.bn1):
            mod.weight.fill_(0.5)
        m.conv2.weight.fill_(0.25)  # all 7 channels of group 0 have the same norm
    x = (torch.randn(2, 3, 4, 4, dtype=torch.float64),)
    m = with_grads(m, x)
    theirs, ours = clone(m), clone(m)
    tp_regularize(theirs, x, "group_norm")
    assert torch.isnan(theirs.conv1.weight.grad).all()  # TP: 0/0 gamma
    Regularization(ours, small_cnn_groups(), GroupNorm(REG)).apply_to_grads()
    for name in ("conv1.weight", "bn1.weight"):  # expectation: gamma = 1, grad += reg * w
        p = ours.get_parameter(name)
        torch.testing.assert_close(p.grad, m.get_parameter(name).grad + REG * p.detach())
    # conv2.weight: its in-columns get reg * 1 * w, its out-rows reg * gamma_group1 * w on top
    in_term = REG * m.conv2.weight.detach()
    out_term = ours.conv2.weight.grad - m.conv2.weight.grad - in_term
    assert torch.isfinite(out_term).all() and out_term.abs().sum() > 0


def test_group_lasso_without_batchnorm():
    name = "prelu_instancenorm_groupnorm"
    m, x = zoo_case(name, torch.float64)
    with pytest.raises(TypeError):  # TP: None + 1e-9 on a group without BatchNorm
        tp_regularize(clone(m), x, "group_lasso", zoo_output_layers(name))
    groups = zoo_groups(name)
    assert not any(s.kind == BATCHNORM for g in groups for s in g.slots)
    with pytest.raises(ValueError, match="BatchNorm"):
        Regularization(m, groups, GroupLasso(REG))


def test_group_lasso_skips_groups_without_batchnorm():
    """se_block: TP crashes on the groups without BatchNorm; ours skips them and, on the others, applies
    grad += reg / sqrt(mean_bn(w^2) + 1e-9) * w, written out here per BatchNorm slot."""
    name = "se_block"
    m, _ = zoo_case(name, torch.float64)
    groups = zoo_groups(name)
    ours = clone(m)
    Regularization(ours, groups, GroupLasso(REG), backend="torch").apply_to_grads()
    expect = {n: p.grad.clone() for n, p in m.named_parameters()}
    for g in groups:
        bn = [s for s in g.slots if s.kind == BATCHNORM and not s.is_bias and not s.is_buffer]
        q = torch.zeros(g.size, dtype=torch.float64)
        cnt = torch.zeros(g.size, dtype=torch.float64)
        for s in bn:
            w = m.get_parameter(s.name).detach()[s.start : s.start + s.length]
            q[s.offset : s.offset + s.length] += w**2
            cnt[s.offset : s.offset + s.length] += 1
        for s in bn:
            w = m.get_parameter(s.name).detach()[s.start : s.start + s.length]
            sl = slice(s.offset, s.offset + s.length)
            expect[s.name][s.start : s.start + s.length] += REG / torch.sqrt(q[sl] / cnt[sl] + 1e-9) * w
    assert any(not any(s.kind == BATCHNORM for s in g.slots) for g in groups)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expect[n], rtol=1e-6, atol=1e-12, msg=n)


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 9, 3, padding=1, groups=3, bias=False)  # 3 conv groups of 2 in-channels
        self.bn2 = nn.BatchNorm2d(9)
        self.fc = nn.Linear(9, 4)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        return self.fc(self.bn2(self.conv2(x)).mean((2, 3)))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grouped_conv_in_channels(backend):
    """TP truncates gamma to the first conv group and then raises IndexError; expectation, written out:
    channel c = 2j + p of group 0 owns conv1 row c, bn1[c] and column p of conv2's rows 3j..3j+2;
    n_c^2 sums all of them; grad += reg * gamma_c * w on each."""
    torch.manual_seed(0)
    m = zoo.randomize_bn_(GroupedNet()).double()
    x = (torch.randn(2, 3, 5, 5, dtype=torch.float64),)
    m = with_grads(m, x)
    with pytest.raises(IndexError):
        tp_regularize(clone(m), x, "group_norm")

    g0 = Group(6, (
        Slot("conv1.weight", "conv1", CONV, OUT, 0, 0, 6), Slot("bn1.weight", "bn1", BATCHNORM, AFFINE, 0, 0, 6),
        Slot("conv2.weight", "conv2", CONV, IN, 1, 0, 6, blocks=3),
    ), blocks=3)
    ours = clone(m)
    Regularization(ours, [g0], GroupNorm(REG, alpha=4), backend=backend).apply_to_grads()

    w1, b1, w2 = (m.get_parameter(n).detach() for n in ("conv1.weight", "bn1.weight", "conv2.weight"))
    n2 = torch.zeros(6, dtype=torch.float64)
    for c in range(6):
        j, p = divmod(c, 2)
        n2[c] = (w1[c] ** 2).sum() + b1[c] ** 2 + (w2[3 * j : 3 * j + 3, p] ** 2).sum()
    n = n2.sqrt()
    gamma = 2.0 ** (4 * (n.max() - n) / (n.max() - n.min()))
    e1, eb, e2 = m.conv1.weight.grad.clone(), m.bn1.weight.grad.clone(), m.conv2.weight.grad.clone()
    for c in range(6):
        j, p = divmod(c, 2)
        e1[c] += REG * gamma[c] * w1[c]
        eb[c] += REG * gamma[c] * b1[c]
        e2[3 * j : 3 * j + 3, p] += REG * gamma[c] * w2[3 * j : 3 * j + 3, p]
    for name, e in (("conv1.weight", e1), ("bn1.weight", eb), ("conv2.weight", e2)):
        assert rel_err(ours.get_parameter(name).grad - m.get_parameter(name).grad,
                       e - m.get_parameter(name).grad) < 1e-5, name
