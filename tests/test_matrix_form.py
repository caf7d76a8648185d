"""The shared matrix form (`kernels/matrix_form.py`): its maps on hand-checked layouts, its refusals, and
that the torch and Triton planners both take exactly that form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tritonprune.graph.group import AFFINE, BATCHNORM, CONV, IN, LINEAR, OUT, Group, Slot
from tritonprune.kernels import torch_impl, triton_plan
from tritonprune.kernels.layout import GroupBuffers
from tritonprune.kernels.matrix_form import Unsupported, matrix_form


def S(name, kind, role, dim, offset, length, **kw):
    return Slot(name, "", kind, role, dim, offset, length, **kw)


class Bag(nn.Module):
    def __init__(self, **tensors):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t))


def _slots_of(bufs, name):
    """(p, [(k, slot, chan, flags)]) of parameter `name`, as both planners collect them."""
    ks = [k for k, (_, slot, _) in enumerate(bufs.entries) if slot.name == name]
    return bufs.entries[ks[0]][2], [(k, bufs.entries[k][1], bufs.chans[k], bufs.flags[k]) for k in ks]


def _both(select=lambda s: (True, True)):
    """A channels_last conv in two groups (rows 7, columns 3 channels at 10..12), a grouped conv (G = 2
    over 6 channels), a BatchNorm weight."""
    m = Bag(c=torch.randn(7, 3, 2, 2).contiguous(memory_format=torch.channels_last),
            g=torch.randn(4, 3, 1, 2), bn=torch.randn(7))
    groups = [
        Group(7, (S("c", CONV, OUT, 0, 0, 7), S("bn", BATCHNORM, AFFINE, 0, 0, 7))),
        Group(3, (S("c", CONV, IN, 1, 0, 3),)),
        Group(6, (S("g", CONV, IN, 1, 0, 6, blocks=2),), blocks=2),
    ]
    return m, GroupBuffers.build(m, groups, select)


def test_channels_last_conv_columns_follow_memory_order():
    m, bufs = _both()
    p, slots = _slots_of(bufs, "c")
    f = matrix_form(p, slots, bufs)
    assert (f.order, f.n_rows, f.R, f.J, f.G, f.col_dim) == ([0, 2, 3, 1], 7, 7, 12, 1, 1)
    assert not f.identity
    assert f.rows.imp.tolist() == list(range(7))
    # channels_last: the in-channel is innermost, so column j reads in-channel j % 3 (channels 7..9)
    assert f.cols.imp.tolist() == [7 + j % 3 for j in range(12)]
    assert f.cols.sid.tolist() == [slots[1][0]] * 12


def test_grouped_conv_gives_each_conv_group_its_channels():
    m, bufs = _both()
    p, slots = _slots_of(bufs, "g")
    f = matrix_form(p, slots, bufs)
    assert (f.n_rows, f.R, f.J, f.G, f.rows) == (4, 2, 6, 2, None)
    chan = slots[0][2]
    # contiguous [4, 3, 1, 2]: column j is in-channel j // 2; conv group g owns channels chan + 3g + c
    assert f.cols.imp.tolist() == [chan + 3 * g + j // 2 for g in range(2) for j in range(6)]


def test_one_dim_parameter_is_rows_and_only_update_flags_fill_upd():
    m, bufs = _both(select=lambda s: (s.kind != BATCHNORM, True))
    p, slots = _slots_of(bufs, "bn")
    f = matrix_form(p, slots, bufs)
    assert (f.n_rows, f.J, f.G, f.cols) == (7, 1, 1, None)
    assert f.rows.imp.tolist() == [-1] * 7 and f.rows.upd.tolist() == list(range(7))


def test_both_planners_take_the_shared_form():
    m, bufs = _both()
    for name in ("c", "g", "bn"):
        p, slots = _slots_of(bufs, name)
        f = matrix_form(p, slots, bufs)
        present = [x for x in (f.rows, f.cols) if x is not None]
        t = torch_impl._Matrix(p, slots, bufs)
        assert torch.equal(t.map_imp, torch.cat([x.imp for x in present]))
        assert (t.O, t.R, t.J, t.G, t.order) == (f.n_rows, f.R, f.J, f.G, f.order)
        u = triton_plan.make_unit(p, slots, bufs)
        if p.dim() == 1:  # Triton lays a vector on its side: one row, the map on the columns
            assert (u.n_out, u.J) == (1, f.n_rows) and torch.equal(u.cols[0], f.rows.imp)
            continue
        assert (u.n_out, u.R, u.J, u.G) == (f.n_rows, f.R, f.J, f.G)
        for side, got in ((f.rows, u.rows), (f.cols, u.cols)):
            want = side.imp if side is not None else torch.full_like(got[0], -1)
            assert torch.equal(got[0], want)


def _refused(tensors: dict, groups: list, name: str, p=None):
    m = Bag(**tensors)
    bufs = GroupBuffers.build(m, groups, lambda s: (True, True))
    q, slots = _slots_of(bufs, name)
    p = q if p is None else p
    with pytest.raises(Unsupported):
        matrix_form(p, slots, bufs)
    with pytest.raises(Unsupported):
        torch_impl._Matrix(p, slots, bufs)
    with pytest.raises(Unsupported):
        triton_plan.make_unit(p, slots, bufs)


def test_refusals():
    # slots on two non-leading dims
    _refused({"t": torch.randn(3, 4, 5)},
             [Group(4, (S("t", LINEAR, IN, 1, 0, 4),)), Group(5, (S("t", LINEAR, IN, 2, 0, 5),))], "t")
    # two slots of one dim covering the same rows
    _refused({"w": torch.randn(4, 3)},
             [Group(4, (S("w", LINEAR, OUT, 0, 0, 4),)), Group(2, (S("w", LINEAR, OUT, 0, 0, 2, start=1),))], "w")
    # rows not outermost in memory (a transposed Linear weight)
    _refused({"w": torch.randn(5, 3).t()}, [Group(3, (S("w", LINEAR, OUT, 0, 0, 3),))], "w")
    # no dense layout (the parameter changed after the buffers were built)
    _refused({"w": torch.randn(4, 3)}, [Group(4, (S("w", LINEAR, OUT, 0, 0, 4),))], "w",
             p=nn.Parameter(torch.randn(4, 6)[:, ::2]))
