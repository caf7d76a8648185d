"""The per-parameter matrix form that the torch backend (with its C loops) and the Triton backend both run.

A conv/linear weight usually sits in several slots: its out-rows in one group, its in-columns in another.
Rather than visit it once per slot, the backends visit it once per PARAMETER, seen as a dense matrix

    M = [G, R, J]    (O = G * R rows, J columns)

in its PHYSICAL layout (contiguous or channels_last alike): dim 0 (the out-rows) is outermost, the J
columns are the other dims flattened in memory order (`order[1:]`), and G > 1 only for a grouped conv's
in-columns, whose blocked slots give conv group g its own channels over the same J columns. Each slot
becomes a map from rows (slots on dim 0) or from columns (slots on the one other dim `col_dim`) to flat
channels, so one read of w gives both the row and the column sums of squares, and one pass updates it:

    t[g*R + r, j] += (c_row[g*R + r] + c_col[g*J + j]) * f(w).

A map is three int64 tensors (importance channel, update channel, slot id), -1 where no slot of that
kind covers an index: `rows` has O entries, `cols` G*J (column j of group g at g*J + j, the column
channel of the physical position spread over the dims it does not index). A 1-D parameter (norm weight,
bias) is O = N rows of one column, all its slots row slots (the Triton planner turns it on its side: one
row of N columns).

`matrix_form` raises `Unsupported` where no such form exists: a 0-d or empty parameter, slots on two
non-leading dims, blocked slots other than on the column dim (or unequal block counts, or an unblocked
column slot beside blocked ones), O not a multiple of G, no dense non-overlapping layout, dim 0 not
outermost, two slots of one dim covering the same index. Such parameters take each backend's per-slot
path. The execution (chunks and C tables of `torch_impl.py`, work tables of `triton_plan.py`) is each
backend's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..graph.geometry import physical_order
from .layout import FLAG_IMPORTANCE, FLAG_UPDATE


class Unsupported(Exception):
    """This parameter's slots fit no matrix form: it takes the backend's per-slot path."""


class ChannelMap(NamedTuple):
    """Flat channel per row (or column) of M: int64 tensors, -1 where no slot of that kind covers it."""

    imp: torch.Tensor  # importance channel
    upd: torch.Tensor  # update channel
    sid: torch.Tensor  # slot id


@dataclass
class MatrixForm:
    """`p` as `M = [G, R, J]` in physical layout, with its row and column channel maps (see the module)."""

    p: torch.nn.Parameter
    order: list  # p's dims from outermost to innermost, 0 first: M is p.permute(order) flattened
    n_rows: int  # O = G * R
    R: int  # rows per conv group
    J: int  # columns
    G: int  # conv groups of the column slots (1 unless blocked)
    col_dim: int | None  # the dim of the column slots; None when there are none
    rows: ChannelMap | None  # [O] maps, None when no slot is on dim 0
    cols: ChannelMap | None  # [G*J] maps, None when no slot is on another dim

    @property
    def identity(self) -> bool:
        """The physical order is the logical one: M is a plain view of p."""
        return list(self.order) == list(range(self.p.dim()))


def _index_map(size: int, slots, bufs, lead: int) -> ChannelMap:
    """Channel maps `[lead, size]` of one dim of a parameter from its slots on that dim."""
    imp = torch.full((lead, size), -1, dtype=torch.int64)
    upd = torch.full((lead, size), -1, dtype=torch.int64)
    sid = torch.full((lead, size), -1, dtype=torch.int64)
    cover = torch.zeros((lead, size), dtype=torch.bool)
    for k, slot, chan, flags in slots:
        per = bufs.geometries[k].C  # channels per block (== slot.length when not blocked)
        pos = slot.start + torch.arange(per * slot.repeat)
        ch = chan + torch.arange(per).repeat_interleave(slot.repeat)
        if slot.blocks > 1:  # block g owns channels chan + g*per + c
            ch = ch + per * torch.arange(lead)[:, None]
        if cover[:, pos].any():
            raise Unsupported  # two slots of one dim share an index
        cover[:, pos] = True
        if flags & FLAG_IMPORTANCE:
            imp[:, pos] = ch
        if flags & FLAG_UPDATE:
            upd[:, pos] = ch
        sid[:, pos] = k
    return ChannelMap(imp, upd, sid)


def matrix_form(p: torch.nn.Parameter, slots: list, bufs) -> MatrixForm:
    """The matrix form of parameter `p` with slots `slots` [(k, slot, chan, flags)] of `bufs`, or Unsupported."""
    shape, nd = tuple(p.shape), p.dim()
    if nd == 0 or p.numel() == 0:
        raise Unsupported
    col_dims = {s.dim for _, s, _, _ in slots} - {0}
    if len(col_dims) > 1:
        raise Unsupported
    blocks = {s.blocks for _, s, _, _ in slots if s.blocks > 1}
    G = 1
    if blocks:
        # one conv-group count, blocked slots on the column dim only, and all column slots blocked
        if len(blocks) > 1 or any((s.blocks > 1) != (s.dim != 0) for _, s, _, _ in slots):
            raise Unsupported
        G = blocks.pop()
    if shape[0] % G:
        raise Unsupported
    order = physical_order(shape, tuple(p.stride()))
    if order is None:
        raise Unsupported
    if shape[0] == 1:  # a size-1 dim sorts anywhere; the rows go first
        order = [0] + [d for d in order if d != 0]
    if order[0] != 0:
        raise Unsupported
    n_rows, J = shape[0], p.numel() // shape[0]
    row_slots = [s for s in slots if s[1].dim == 0]
    col_slots = [s for s in slots if s[1].dim != 0]
    rows = cols = col_dim = None
    if row_slots:
        rows = ChannelMap(*(m.reshape(-1) for m in _index_map(n_rows, row_slots, bufs, 1)))
    if col_slots:
        col_dim = col_dims.pop()
        maps = _index_map(shape[col_dim], col_slots, bufs, G)
        # spread the [G, size] map over the columns of M: dims 1.. in physical order
        view = [G] + [shape[i] if i == col_dim else 1 for i in range(1, nd)]
        perm = [0] + list(order[1:])
        cols = ChannelMap(*(m.view(view).expand([G, *shape[1:]]).permute(perm).reshape(G * J) for m in maps))
    return MatrixForm(p, order, n_rows, n_rows // G, J, G, col_dim, rows, cols)
