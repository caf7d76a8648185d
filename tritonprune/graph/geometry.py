"""Where a Slot's elements live in memory: a `[G, A, C, B]` strided view of the tensor's storage.

Per-channel reductions and updates do not care in which order a channel's elements are visited, so the
view follows the tensor's physical layout rather than its logical one: a channels_last conv weight is
read as densely as a contiguous one, and the innermost dim always has stride 1. Both the torch and the
Triton backends address slots through this one description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .group import Slot


@dataclass(frozen=True)
class SlotGeometry:
    """Element (g, a, c, b) of the slot is at `offset + g*stride_g + a*stride_a + c*stride_c + b`."""

    G: int
    A: int
    C: int
    B: int
    stride_g: int
    stride_a: int
    stride_c: int
    offset: int  # in elements, from the tensor's data_ptr()

    @property
    def numel(self) -> int:
        return self.G * self.A * self.C * self.B


def physical_order(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[int] | None:
    """Dims from outermost to innermost if the tensor is dense and non-overlapping, else None."""
    dims = sorted(range(len(shape)), key=lambda i: (-strides[i], i))
    expected = 1
    for i in reversed(dims):
        if shape[i] == 1:
            continue
        if strides[i] != expected:
            return None
        expected *= shape[i]
    return dims


def slot_geometry(tensor: torch.Tensor, slot: Slot) -> SlotGeometry:
    """The `[G, A, C, B]` view of `slot` in `tensor`; raises ValueError if no such strided view exists."""
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    order = physical_order(shape, strides)
    if order is None:
        raise ValueError(
            f"{slot.name}: tensor with shape {shape} and strides {strides} is not dense; "
            "call .contiguous() on it before regularizing"
        )
    d = slot.dim
    if shape[d] != 1:
        # size-1 dims sort anywhere; keep them out of the way so the channel dim splits the layout right
        order = [i for i in order if shape[i] != 1 or i == d]
    q = order.index(d)
    inner = math.prod(shape[i] for i in order[q + 1 :])
    outer = math.prod(shape[i] for i in order[:q])
    stride_a = shape[d] * inner
    G = slot.blocks
    if G > 1:
        if q == 0 or order[0] != 0 or shape[0] % G:
            raise ValueError(f"{slot.name}: cannot split dim 0 of shape {shape} into {G} conv groups")
        if slot.repeat != 1:
            raise ValueError(f"{slot.name}: blocked slots must have repeat 1")
    C = slot.length // G
    end = slot.start + C * slot.repeat
    if end > shape[d]:
        raise ValueError(
            f"{slot.name}: slot covers indices {slot.start}..{end} of dim {d}, but the tensor has {shape[d]}"
        )
    return SlotGeometry(
        G=G,
        A=outer // G,
        C=C,
        B=inner * slot.repeat,
        stride_g=(outer // G) * stride_a,
        stride_a=stride_a,
        stride_c=inner * slot.repeat,
        offset=slot.start * inner,
    )


def slot_view(tensor: torch.Tensor, geo: SlotGeometry) -> torch.Tensor:
    """A `[G, A, C, B]` view sharing storage with `tensor` (writes go through)."""
    return tensor.as_strided(
        (geo.G, geo.A, geo.C, geo.B),
        (geo.stride_g, geo.stride_a, geo.stride_c, 1),
        tensor.storage_offset() + geo.offset,
    )
