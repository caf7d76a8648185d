"""Numerics of the regularization engine: the torch backend against the reference loop on hand-built
groups (odd sizes, 1-channel and equal-norm groups, grouped-conv blocks, Linear after flatten,
concatenation offsets, channels_last, non-contiguous grads, four dtypes), plus the GroupBuffers table,
decoupled mode, gamma caching, rebuilds and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from tritonprune.graph import geometry
from tritonprune.graph.group import AFFINE, BATCHNORM, CONV, IN, LAYERNORM, LINEAR, OUT, STAT, Group, Slot
from tritonprune.kernels import cpu_native, get_backend, torch_impl
from tritonprune.kernels.layout import (
    CHAN,
    DTYPE,
    FLAGS,
    G_PTR,
    GROUP,
    NUMEL,
    STRIDE_A,
    STRIDE_C,
    W_PTR,
    GroupBuffers,
)
from tritonprune.regularizing.engine import Regularization
from tritonprune.regularizing.regularizers import BNScale, GroupLasso, GroupNorm

HW = 4


class HandNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 9, 3, padding=1, groups=3)  # in-columns in 3 blocks of 2
        self.bn2 = nn.BatchNorm2d(9)
        self.conv3 = nn.Conv2d(9, 5, 1)
        self.fc = nn.Linear(5 * HW * HW, 7)  # reads the flattened 5 x 4 x 4 map: repeat 16
        self.ln = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)
        self.one = nn.Conv2d(3, 1, 1)  # a one-channel group
        self.one_bn = nn.BatchNorm2d(1)
        self.eq = nn.Conv2d(3, 4, 1, bias=False)  # a group with equal channel norms
        self.a = nn.Conv2d(3, 4, 1)  # concatenated with b, read by c
        self.b = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(7 + 1 + 4, 2, 1)


def S(name, kind, role, dim, offset, length, **kw):
    return Slot(name, name.rsplit(".", 1)[0], kind, role, dim, offset, length, **kw)


def hand_groups() -> list[Group]:
    return [
        Group(6, (
            S("conv1.weight", CONV, OUT, 0, 0, 6), S("conv1.bias", CONV, OUT, 0, 0, 6, is_bias=True),
            S("bn1.weight", BATCHNORM, AFFINE, 0, 0, 6), S("bn1.bias", BATCHNORM, AFFINE, 0, 0, 6, is_bias=True),
            S("bn1.running_mean", BATCHNORM, STAT, 0, 0, 6, is_buffer=True),
            S("conv2.weight", CONV, IN, 1, 0, 6, blocks=3),
        )),
        Group(9, (
            S("conv2.weight", CONV, OUT, 0, 0, 9), S("conv2.bias", CONV, OUT, 0, 0, 9, is_bias=True),
            S("bn2.weight", BATCHNORM, AFFINE, 0, 0, 9), S("conv3.weight", CONV, IN, 1, 0, 9),
        )),
        Group(5, (S("conv3.weight", CONV, OUT, 0, 0, 5), S("fc.weight", LINEAR, IN, 1, 0, 5, repeat=HW * HW))),
        Group(7, (
            S("fc.weight", LINEAR, OUT, 0, 0, 7), S("fc.bias", LINEAR, OUT, 0, 0, 7, is_bias=True),
            S("ln.weight", LAYERNORM, AFFINE, 0, 0, 7), S("ln.bias", LAYERNORM, AFFINE, 0, 0, 7, is_bias=True),
            S("fc2.weight", LINEAR, IN, 1, 0, 7),
        )),
        Group(1, (S("one.weight", CONV, OUT, 0, 0, 1), S("one_bn.weight", BATCHNORM, AFFINE, 0, 0, 1),
                  S("c.weight", CONV, IN, 1, 0, 1, start=7))),
        Group(4, (S("eq.weight", CONV, OUT, 0, 0, 4), S("c.weight", CONV, IN, 1, 0, 4, start=8))),
        # concatenation: a at offset 0, b at offset 4, c reading all 7 columns
        Group(7, (S("a.weight", CONV, OUT, 0, 0, 4), S("b.weight", CONV, OUT, 0, 4, 3),
                  S("b.bias", CONV, OUT, 0, 4, 3, is_bias=True), S("c.weight", CONV, IN, 1, 0, 7))),
    ]


def make(dtype=torch.float32, channels_last=False, seed=0):
    torch.manual_seed(seed)
    m = HandNet()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                mod.weight.uniform_(-1.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
        m.eq.weight.fill_(0.5)
        m.c.weight[:, 8:12].fill_(0.3)
    m = m.to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    for p in m.parameters():  # same logical values whatever the memory format
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, dtype=dtype) * 0.01)
    return m


def grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.fixture(params=["matrix-native", "matrix-torch", "matrix-chunked", "slots"])
def torch_path(request, monkeypatch):
    """The torch backend's per-parameter path (with the C loops of cpu_native; on torch ops over whole
    matrices; on torch ops over row chunks of 7 elements: most weights split into several chunks, some
    chunks of one row) and its per-slot path, each checked alike."""
    if request.param == "matrix-native":
        if cpu_native.library() is None:
            pytest.skip(f"no CPU accelerator: {cpu_native.why_unavailable()}")
    else:
        monkeypatch.setattr(torch_impl, "NATIVE", False)
    if request.param == "matrix-chunked":
        monkeypatch.setattr(torch_impl, "CHUNK_ELEMS", 7)
    elif request.param == "slots":
        monkeypatch.setattr(torch_impl, "MATRIX_PATH", False)
    return request.param


REGS = [GroupNorm(0.1), GroupNorm(0.1, alpha=2.5, bias=True), BNScale(0.1), GroupLasso(0.1)]
TOL = {  # (atol, rtol) of torch against reference
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-7, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def clone(m):
    """deepcopy does not copy .grad; clone() keeps a dense gradient's strides."""
    c = copy.deepcopy(m)
    for p, q in zip(m.parameters(), c.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return c


def run(m, reg, backend):
    m = clone(m)
    Regularization(m, hand_groups(), reg, backend=backend).apply_to_grads()
    return m


def assert_close_dicts(a, b, atol, rtol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda s, k=k: f"{k}: {s}")


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("reg", REGS, ids=repr)
def test_torch_matches_reference(reg, dtype, torch_path):
    m = make(dtype)
    before = grads(m)
    ref, tor = grads(run(m, reg, "reference")), grads(run(m, reg, "torch"))
    assert_close_dicts(tor, ref, *TOL[dtype])
    assert any(not torch.equal(ref[k], before[k]) for k in ref)  # the term is there


@pytest.mark.parametrize("reg", REGS[:2] + REGS[3:], ids=repr)
def test_channels_last_weights(reg, torch_path):
    m = make(channels_last=True)
    assert not m.conv1.weight.is_contiguous()
    ref = grads(run(make(), reg, "reference"))
    tor = grads(run(m, reg, "torch"))
    assert_close_dicts(tor, ref, 1e-6, 1e-5)


def _noncontiguous_grads(m):
    """Grads with other strides than the parameters: transposed (dense) and strided (not dense)."""
    for i, p in enumerate(m.parameters()):
        g = p.grad.detach().clone()
        if g.dim() >= 2 and i % 2 == 0:
            t = torch.empty(g.shape[::-1], dtype=g.dtype).copy_(g.permute(*reversed(range(g.dim()))))
            p.grad = t.permute(*reversed(range(g.dim())))
        else:
            t = torch.zeros(2 * g.numel(), dtype=g.dtype)
            t[::2] = g.reshape(-1)
            p.grad = t[::2].view(g.shape) if g.dim() == 1 else t[::2].reshape(g.shape)
    return m


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_noncontiguous_grads(backend, torch_path):
    m = make()
    ref = grads(run(m, GroupNorm(0.1), "reference"))
    m2 = _noncontiguous_grads(make())
    assert not m2.conv1.weight.grad.is_contiguous()
    Regularization(m2, hand_groups(), GroupNorm(0.1), backend=backend).apply_to_grads()
    assert_close_dicts(grads(m2), ref, 1e-6, 1e-5)


def test_torch_backend_uses_dense_grad_of_other_layout_in_place(torch_path):
    """A dense .grad with other strides than its parameter is regularized in place by the torch backend."""
    m = make()
    ref = grads(run(m, GroupNorm(0.1), "reference"))
    bufs = GroupBuffers.build(m, hand_groups(), GroupNorm(0.1).select)
    w = m.conv1.weight
    g = w.grad.detach().clone().to(memory_format=torch.channels_last)
    w.grad = g
    be = get_backend("torch")
    be.add_scaled_(bufs, be.group_norm_coef(bufs, be.channel_sq_sums(bufs), 0.1, 4.0))
    assert w.grad is g
    torch.testing.assert_close(w.grad, ref["conv1.weight"], atol=1e-6, rtol=1e-5)


def test_equal_norms_and_one_channel_give_gamma_one():
    m = make()
    before = grads(m)
    out = run(m, GroupNorm(0.1), "torch")
    # eq: all 4 channels have equal norm; one: a single channel -> gamma 1 -> grad += reg * w
    for name in ("eq.weight", "one.weight", "one_bn.weight"):
        p = out.get_parameter(name)
        torch.testing.assert_close(p.grad - before[name], 0.1 * p.detach(), atol=1e-7, rtol=1e-6)
    assert all(torch.isfinite(g).all() for g in grads(out).values())


def test_buffers_and_unselected_slots_untouched():
    m = make()
    rm = m.bn1.running_mean.clone()
    before = grads(m)
    out = run(m, GroupNorm(0.1), "torch")
    assert torch.equal(out.bn1.running_mean, rm)
    after = grads(out)
    for name in ("conv1.bias", "bn1.bias", "ln.weight", "ln.bias", "fc.bias", "fc2.bias", "c.bias"):
        assert torch.equal(after[name], before[name]), name  # biases off, LayerNorm only counts
    out_bn = run(m, BNScale(0.1), "torch")
    changed = {k for k, v in grads(out_bn).items() if not torch.equal(v, before[k])}
    assert changed == {"bn1.weight", "bn2.weight", "one_bn.weight"}


def test_grad_none_is_skipped(torch_path):
    m = make()
    m.conv3.weight.grad = None
    ref = run(m, GroupNorm(0.1), "reference")
    out = run(m, GroupNorm(0.1), "torch")
    assert out.conv3.weight.grad is None
    assert_close_dicts(grads(out), grads(ref), 1e-6, 1e-5)
    # conv3 still counts in the importance of its groups: same gamma as with a grad
    full = grads(run(make(), GroupNorm(0.1), "torch"))
    torch.testing.assert_close(out.fc.weight.grad, full["fc.weight"])


# ---------------------------------------------------------------------------------------- decoupled


@pytest.mark.parametrize("reg", [GroupNorm(0.1, decoupled=True), BNScale(0.1, decoupled=True),
                                 GroupLasso(0.1, decoupled=True)], ids=repr)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_decoupled_is_lr_times_the_coupled_term(reg, backend, torch_path):
    m = make()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    coupled = run(m, type(reg)(**{k: v for k, v in vars(reg).items() if k != "decoupled"}), "reference")
    term = grads(coupled)  # grads were zero: exactly the term, computed from the weights before
    m2 = clone(m)
    lr = {id(p): (0.5 if n.startswith("conv") else 0.25) for n, p in m2.named_parameters()}
    Regularization(m2, hand_groups(), reg, backend=backend).apply_decoupled(lr)
    for (n, p), p0 in zip(m2.named_parameters(), m.parameters()):
        expect = p0.detach() - (0.5 if n.startswith("conv") else 0.25) * term[n]
        torch.testing.assert_close(p.detach(), expect, atol=1e-7, rtol=1e-6, msg=n)
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_decoupled_skips_missing_lr_and_missing_grad():
    m = make()
    m.fc.weight.grad = None
    w_fc, w_c1 = m.fc.weight.detach().clone(), m.conv1.weight.detach().clone()
    lr = {id(p): 0.1 for n, p in m.named_parameters() if n != "conv1.weight"}
    Regularization(m, hand_groups(), GroupNorm(0.1, decoupled=True)).apply_decoupled(lr)
    assert torch.equal(m.fc.weight.detach(), w_fc)
    assert torch.equal(m.conv1.weight.detach(), w_c1)
    assert not torch.equal(m.conv2.weight.detach(), make().conv2.weight.detach())


# ------------------------------------------------------------------------------------ engine state


def test_refresh_every_keeps_gamma():
    m = make()
    eng = Regularization(m, hand_groups(), GroupNorm(0.1, refresh_every=2), backend="torch")

    def delta_over_w():
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        eng.apply_to_grads()
        return m.conv2.weight.grad / m.conv2.weight.detach()

    r1 = delta_over_w()
    with torch.no_grad():
        m.conv2.weight[0] *= 3.0  # changes the norms of group 1
    r2 = delta_over_w()
    r3 = delta_over_w()
    torch.testing.assert_close(r2, r1)  # second call: gamma kept
    assert not torch.allclose(r3, r1)  # third call: recomputed
    assert eng.calls == 3


def test_rebuilds_when_a_parameter_is_replaced():
    m = make()
    eng = Regularization(m, hand_groups(), GroupNorm(0.1), backend="torch")
    eng.apply_to_grads()
    first = eng.buffers
    m.conv3.weight = nn.Parameter(m.conv3.weight.detach() * 2)
    m.conv3.weight.grad = torch.zeros_like(m.conv3.weight)
    assert first.is_stale(m)
    eng.apply_to_grads()
    assert eng.buffers is not first
    assert m.conv3.weight.grad.abs().sum() > 0


def test_shape_change_without_new_groups_is_a_clear_error():
    m = make()
    eng = Regularization(m, hand_groups(), GroupNorm(0.1))
    eng.apply_to_grads()
    m.conv3 = nn.Conv2d(9, 3, 1)  # "pruned" to 3 out-channels, groups not updated
    with pytest.raises(ValueError, match="set_groups"):
        eng.apply_to_grads()


def test_unknown_parameter_is_a_clear_error():
    bad = hand_groups() + [Group(2, (S("nope.weight", CONV, OUT, 0, 0, 2),))]
    with pytest.raises(ValueError, match="nope.weight"):
        Regularization(make(), bad, GroupNorm(0.1)).apply_to_grads()


@pytest.mark.parametrize("reg", [BNScale(), GroupLasso(), "bn_scale", "group_lasso"], ids=str)
def test_batchnorm_regularizers_need_batchnorm(reg):
    no_bn = [g for g in hand_groups() if not any(s.kind == BATCHNORM for s in g.slots)]
    with pytest.raises(ValueError, match="BatchNorm"):
        Regularization(make(), no_bn, reg)


def test_set_groups_rebuilds():
    m = make()
    eng = Regularization(m, hand_groups(), GroupNorm(0.1))
    eng.apply_to_grads()
    first = eng.buffers
    eng.set_groups(hand_groups()[:2])
    assert eng.buffers is not first and eng.buffers.n_groups == 2


def test_host_syncs_in_a_steady_torch_step(monkeypatch, torch_path):
    """One host sync per coefficient refresh (the overflow check reads per-slot maxima); none on a
    step that reuses the coefficients (refresh_every; coefficients <= 1 need no weight read) nor
    anywhere in the backend."""
    m = make()
    eng = Regularization(m, hand_groups(), GroupNorm(0.01, refresh_every=2), backend="torch")
    eng.apply_to_grads()  # builds, refreshes
    syncs = []

    def counted(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            syncs.append(name)
            return orig(self, *a, **k)
        return f

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    eng.apply_to_grads()  # cached coefficients
    assert syncs == []
    for p in m.parameters():  # zero_grad(set_to_none=True): new grad tensors
        p.grad = torch.randn_like(p)
    eng.apply_to_grads()  # refresh
    assert syncs == ["tolist"]


# ------------------------------------------------------------------------------------ GroupBuffers


def test_table_layout():
    m = make(channels_last=True)
    groups = hand_groups()
    bufs = GroupBuffers.build(m, groups, GroupNorm(0.1).select)
    t = bufs.table
    assert t.shape == (bufs.n_slots, 16) and t.dtype == torch.int64
    assert bufs.group_offsets.tolist() == [0, 6, 15, 20, 27, 28, 32, 39]
    assert bufs.channel_group.tolist()[:7] == [0] * 6 + [1]
    names = [s.name for _, s, _ in bufs.entries]
    assert "bn1.running_mean" not in names and "conv1.bias" not in names  # buffers, unselected biases
    k = names.index("conv2.weight")  # first occurrence: blocked in-columns of group 0
    _, slot, p = bufs.entries[k]
    geo = geometry.slot_geometry(p, slot)
    assert (geo.G, geo.C) == (3, 2) and bufs.geometries[k] == geo
    assert t[k, W_PTR] == p.data_ptr() + geo.offset * p.element_size()
    assert t[k, G_PTR] == p.grad.data_ptr() + geo.offset * p.element_size()
    assert (t[k, STRIDE_A], t[k, STRIDE_C], t[k, NUMEL]) == (geo.stride_a, geo.stride_c, geo.numel)
    assert (t[k, CHAN], t[k, GROUP], t[k, DTYPE], t[k, FLAGS]) == (0, 0, 0, 3)
    kb = names.index("b.weight")
    assert t[kb, CHAN] == 32 + 4
    kl = names.index("ln.weight")
    assert t[kl, FLAGS] == 1  # LayerNorm: importance only
    assert bufs.n_importance_slots_bn[:6].tolist() == [1.0] * 6 and bufs.acc.dtype == torch.float32


def test_refresh_pointers():
    m = make()
    bufs = GroupBuffers.build(m, hand_groups(), GroupNorm(0.1).select)
    assert bufs.refresh_pointers() is False
    old = m.fc.weight.grad  # kept alive: the allocator cannot hand its address to the new grad
    m.fc.weight.grad = torch.randn_like(m.fc.weight).t().contiguous().t()  # other strides
    g_values = m.fc.weight.grad.clone()
    assert bufs.refresh_pointers() is True
    g = m.fc.weight.grad
    assert g.stride() == m.fc.weight.stride() and torch.equal(g, g_values) and old is not None
    k = [s.name for _, s, _ in bufs.entries].index("fc.weight")
    assert bufs.table[k, G_PTR] == g.data_ptr() + bufs.geometries[k].offset * g.element_size()
    m.fc.weight.grad = None
    assert bufs.refresh_pointers() is True and bufs.table[k, G_PTR] == 0
    assert not bufs.is_stale(m)


# ------------------------------------------------------------------------------ torch backend paths


def run_groups(m, groups, backend):
    m = clone(m)
    Regularization(m, groups, GroupNorm(0.1), backend=backend).apply_to_grads()
    return m


def _plan_of(m, groups=None):
    eng = Regularization(m, groups or hand_groups(), GroupNorm(0.1), backend="torch")
    eng.apply_to_grads()
    return eng, eng.buffers.cache["torch"]


def test_every_hand_parameter_takes_the_matrix_path():
    """Blocks, repeat, start offsets, concatenation pieces and channels_last all fit the per-parameter form."""
    for channels_last in (False, True):
        _, plan = _plan_of(make(channels_last=channels_last))
        assert plan.matrix.rejected == [] and plan.slot_path.empty
        shapes = sorted(tuple(u.p.shape) for u in plan.matrix.mats)
        assert (9, 2, 3, 3) in shapes and (7, 80) in shapes  # grouped conv2, fc reading the flattened map


class TwoColumnDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.randn(3, 4, 5))
        self.bn = nn.BatchNorm1d(4)


def test_unusual_slots_fall_back_to_the_slot_path():
    """A tensor with slots on two non-leading dims has no [rows, columns] form: the per-slot path takes it,
    and the result still matches the reference."""
    m = TwoColumnDims()
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    groups = [
        Group(4, (S("t", LINEAR, IN, 1, 0, 4), S("bn.weight", BATCHNORM, AFFINE, 0, 0, 4))),
        Group(5, (S("t", LINEAR, IN, 2, 0, 5),)),
    ]
    ref = run_groups(m, groups, "reference")
    eng = Regularization(tor := clone(m), groups, GroupNorm(0.1), backend="torch")
    eng.apply_to_grads()
    plan = eng.buffers.cache["torch"]
    assert [p is tor.t for p in plan.matrix.rejected] == [True]
    assert len(plan.matrix.vecs) == 1  # bn.weight still batched
    assert_close_dicts(grads(tor), grads(ref), 1e-5, 1e-5)


def test_param_target_reads_weights_before_the_call(torch_path):
    """A weight in two update slots (rows of one group, columns of another) shrinks by both terms, both
    computed from the weight before the call."""
    m = make()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    term = grads(run(m, GroupNorm(0.1), "reference"))
    m2 = clone(m)
    Regularization(m2, hand_groups(), GroupNorm(0.1, decoupled=True), backend="torch").apply_decoupled(
        {id(p): 0.5 for p in m2.parameters()})  # lr * reg * gamma <= 0.5 * 0.1 * 16: no sign flip (issue 21)
    for (n, p), p0 in zip(m2.named_parameters(), m.parameters()):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.5 * term[n], atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1], msg=lambda s, n=n: f"{n}: {s}")


def test_torch_backend_keeps_no_gradient_alive():
    """Views of .grad are not cached: zero_grad(set_to_none=True) frees the gradients before the next backward."""
    import weakref

    m = make()
    eng = Regularization(m, hand_groups(), GroupNorm(0.1), backend="torch")
    eng.apply_to_grads()
    refs = [weakref.ref(p.grad) for p in m.parameters()]
    for p in m.parameters():
        p.grad = None
    import gc

    gc.collect()
    assert all(r() is None for r in refs)


def test_is_stale_sees_replaced_modules_and_parameters():
    m = make()
    bufs = GroupBuffers.build(m, hand_groups(), GroupNorm(0.1).select)
    assert not bufs.is_stale(m)
    assert bufs.is_stale(make())  # another model object (the slow check): same names, other parameters
    m.conv3 = nn.Conv2d(9, 5, 1)  # a replaced module (same shapes)
    assert bufs.is_stale(m)
    m2 = make()
    bufs2 = GroupBuffers.build(m2, hand_groups(), GroupNorm(0.1).select)
    with torch.no_grad():
        m2.fc.weight.data = m2.fc.weight.data.t().contiguous().t()  # same parameter object, new strides
    assert bufs2.is_stale(m2)


