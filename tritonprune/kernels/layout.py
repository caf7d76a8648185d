"""GroupBuffers: all groups packed into a few flat tensors, so a regularization step is a fixed number of ops.

Every group gets a contiguous range of a flat channel space (`group_offsets`); every kept Slot is one row
of `table`. A Slot's channels are always one contiguous range of that space: channel `(g, c)` of its
`[G, A, C, B]` geometry is flat channel `chan + g*C + c` (G > 1 only for grouped-conv in-columns, see
`Slot`).

Contract with the backends (kernels/*.py); columns of the int64 `table` [n_slots, 16], one row per kept
slot, in the order of `entries`:

    0  W_PTR     address of element (0,0,0,0) of the slot in the parameter: data_ptr + geo.offset*elemsize
    1  G_PTR     the same in .grad (which has the parameter's strides, see refresh_pointers); 0 if no grad
    2  G         conv groups of a blocked slot (1 otherwise)
    3  A         elements before the channel dim (in the physical layout)
    4  C         channels per conv group (the slot covers G*C flat channels)
    5  B         contiguous elements per channel (stride 1)
    6  STRIDE_G  element strides of the [G, A, C, B] view; the stride of B is 1
    7  STRIDE_A
    8  STRIDE_C
    9  CHAN      flat channel index of the slot's first channel: group_offsets[group] + slot.offset
    10 GROUP     group id (index in the groups list)
    11 DTYPE     0 float32, 1 float16, 2 bfloat16, 3 float64
    12 FLAGS     bit0 counts in importance, bit1 receives the update
    13 NUMEL     G*A*C*B
    14 ENTRY     index of the row in `entries` (rows are never reordered)
    15 reserved, 0

Other tensors, all on the parameters' device:
    group_offsets          int64 [n_groups + 1]   flat channel offset of each group
    channel_group          int64 [n_channels]     group id of each flat channel
    n_importance_slots_bn  float32 [n_channels]   how many BatchNorm importance slots cover each channel
    acc                    float32 [n_channels]   scratch accumulator for per-channel sums

Backends may keep per-structure state in `cache` (a dict), keyed on `version`, which changes whenever a
pointer does.

Python side: `entries` (group_index, Slot, nn.Parameter) and `geometries` (SlotGeometry of the slot in
the parameter), both in table order.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..graph.geometry import SlotGeometry, slot_geometry
from ..graph.group import BATCHNORM, Group, Slot

# table columns
W_PTR, G_PTR, G, A, C, B, STRIDE_G, STRIDE_A, STRIDE_C, CHAN, GROUP, DTYPE, FLAGS, NUMEL, ENTRY = range(15)
N_COLS = 16

FLAG_IMPORTANCE = 1
FLAG_UPDATE = 2

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

Select = Callable[[Slot], tuple[bool, bool]]


def _param_of(named: dict[str, nn.Parameter], slot: Slot, group_index: int) -> nn.Parameter:
    p = named.get(slot.name)
    if p is None:
        raise ValueError(
            f"tritonprune.layout: group #{group_index} names parameter {slot.name!r}, which the model does not "
            "have; the groups were found on another model (or before pruning): pass the model's current groups"
        )
    return p


def _elem_ptr(t: torch.Tensor, geo: SlotGeometry) -> int:
    return t.data_ptr() + geo.offset * t.element_size()


class _Pins:
    """Identity checks pinning each used parameter at its qualified name in one model: the `_modules`
    entries along the path and the `_parameters` entry. They answer is_stale() without walking
    `named_parameters()` (milliseconds per step on a ResNet-50)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.root = weakref.ref(model)
        checks: dict[tuple[int, str], tuple[dict, str, object]] = {}
        for name in names:
            *path, attr = name.split(".")
            mod = model
            for part in path:
                d = mod._modules
                mod = d.get(part)
                if mod is None:
                    raise LookupError(name)
                checks[(id(d), part)] = (d, part, mod)
            d = mod._parameters
            checks[(id(d), attr)] = (d, attr, d.get(attr))
        self.checks = list(checks.values())

    def hold(self, model: nn.Module) -> bool:
        """True when every pinned module and parameter is still in place in `model`."""
        return self.root() is model and all(d.get(k) is o for d, k, o in self.checks)


class GroupBuffers:
    """The flattened form of a list of Groups for one model; see the module docstring for the layout."""

    def __init__(self) -> None:  # use GroupBuffers.build
        self.entries: list[tuple[int, Slot, nn.Parameter]] = []
        self.geometries: list[SlotGeometry] = []
        self.flags: list[int] = []
        self.group_sizes: list[int] = []
        self.device = torch.device("cpu")
        self.table = torch.zeros(0, N_COLS, dtype=torch.int64)
        self.group_offsets = torch.zeros(1, dtype=torch.int64)
        self.channel_group = torch.zeros(0, dtype=torch.int64)
        self.n_importance_slots_bn = torch.zeros(0)
        self.acc = torch.zeros(0)
        self._shapes: dict[str, tuple[nn.Parameter, tuple[int, ...], tuple[int, ...], torch.dtype]] = {}
        self._ptrs: tuple[int, ...] = ()
        self._pins: _Pins | None = None
        self._chans: list[int] = []
        # bumped whenever a pointer changes; backends key per-structure caches (views, launch plans) on it
        self.version = 0
        self.cache: dict = {}

    # ------------------------------------------------------------------------------------------ build

    @classmethod
    def build(cls, model: nn.Module, groups: Sequence[Group], select: Select) -> GroupBuffers:
        """Pack `groups` of `model`; `select(slot) -> (counts_in_importance, receives_update)`.

        Slots with neither flag, and buffers (running statistics), are left out.
        """
        self = cls()
        named = dict(model.named_parameters())
        offsets = [0]
        chan_rows: list[list[int]] = []
        for gi, group in enumerate(groups):
            self.group_sizes.append(group.size)
            for slot in group.slots:
                if slot.is_buffer:
                    continue
                imp, upd = select(slot)
                if not (imp or upd):
                    continue
                p = _param_of(named, slot, gi)
                if slot.offset + slot.length > group.size:
                    raise ValueError(
                        f"tritonprune.layout: slot {slot.name} covers channels {slot.offset}..{slot.offset + slot.length} "
                        f"of group #{gi}, which has {group.size}"
                    )
                try:
                    geo = slot_geometry(p, slot)
                except ValueError as e:
                    raise ValueError(
                        f"tritonprune.layout: {e} (group #{gi}); if the model was pruned or reshaped, pass its new groups"
                    ) from None
                if p.dtype not in DTYPE_CODES:
                    raise ValueError(f"tritonprune.layout: {slot.name} has dtype {p.dtype}; only floating dtypes are supported")
                flags = (FLAG_IMPORTANCE if imp else 0) | (FLAG_UPDATE if upd else 0)
                self.entries.append((gi, slot, p))
                self.geometries.append(geo)
                self.flags.append(flags)
                chan_rows.append([offsets[-1] + slot.offset, gi])
                self._shapes[slot.name] = (p, tuple(p.shape), tuple(p.stride()), p.dtype)
            offsets.append(offsets[-1] + group.size)

        devices = {p.device for _, _, p in self.entries}
        if len(devices) > 1:
            raise ValueError(
                f"tritonprune.layout: the regularized parameters live on several devices ({sorted(map(str, devices))}); "
                "move the model to one device first"
            )
        self.device = devices.pop() if devices else torch.device("cpu")
        dev = self.device

        n_channels = offsets[-1]
        self.group_offsets = torch.tensor(offsets, dtype=torch.int64, device=dev)
        sizes = torch.tensor(self.group_sizes, dtype=torch.int64)
        self.channel_group = torch.repeat_interleave(torch.arange(len(groups)), sizes).to(dev)
        bn_count = torch.zeros(n_channels, dtype=torch.float32)
        rows = []
        for k, ((_, slot, p), geo, flags, (chan, gi)) in enumerate(
            zip(self.entries, self.geometries, self.flags, chan_rows)
        ):
            if flags & FLAG_IMPORTANCE and slot.kind == BATCHNORM:
                bn_count[chan : chan + slot.length] += 1
            rows.append(
                [0, 0, geo.G, geo.A, geo.C, geo.B, geo.stride_g, geo.stride_a, geo.stride_c, chan, gi,
                 DTYPE_CODES[p.dtype], flags, geo.numel, k, 0]
            )
        self._chans = [r[CHAN] for r in rows]
        self.table = torch.tensor(rows, dtype=torch.int64).reshape(-1, N_COLS).to(dev)
        self.n_importance_slots_bn = bn_count.to(dev)
        self.acc = torch.zeros(n_channels, dtype=torch.float32, device=dev)
        if isinstance(model, nn.Module):
            try:
                self._pins = _Pins(model, list(self._shapes))
            except LookupError:  # a name reached otherwise than through _modules: the slow check stays
                self._pins = None
        self.refresh_pointers()
        return self

    # ------------------------------------------------------------------------------------- properties

    @property
    def n_slots(self) -> int:
        return len(self.entries)

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def n_channels(self) -> int:
        return int(self.acc.numel())

    @property
    def chans(self) -> list[int]:
        """CHAN column as Python ints (built once; no device sync)."""
        return self._chans

    # ---------------------------------------------------------------------------------------- refresh

    def _pointer_key(self) -> tuple[int, ...]:
        key = []
        for _, _, p in self.entries:
            g = p.grad
            key.append(p.data_ptr())
            key.append(0 if g is None else g.data_ptr())
        return tuple(key)

    def refresh_pointers(self) -> bool:
        """Re-read parameter and .grad addresses; True if any changed (the pointer columns are rewritten).

        A .grad whose strides differ from its parameter's is replaced by a copy with the parameter's
        strides: the table gives one geometry per slot, used for both the weight and its gradient, and
        the optimizer reads p.grad afterwards, so the regularized values must live in p.grad itself.
        """
        for _, slot, p in self.entries:
            g = p.grad
            if g is not None and g.stride() != p.stride():
                if g.shape != p.shape:
                    raise ValueError(f"tritonprune.layout: {slot.name}.grad has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
                p.grad = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=p.device).copy_(g)
        key = self._pointer_key()
        if key == self._ptrs:
            return False
        self._ptrs = key
        self.version += 1
        ptrs = []
        for (_, _, p), geo in zip(self.entries, self.geometries):
            g = p.grad
            ptrs.append([_elem_ptr(p, geo), 0 if g is None else _elem_ptr(g, geo)])
        if ptrs:
            self.table[:, W_PTR : G_PTR + 1] = torch.tensor(ptrs, dtype=torch.int64).to(self.device)
        return True

    def is_stale(self, model: nn.Module) -> bool:
        """True when a parameter the buffers use was replaced, reshaped or changed dtype/layout (pruning)."""
        if self._pins is not None and self._pins.hold(model):  # every parameter still at its name
            return any(
                p.shape != shape or p.stride() != stride or p.dtype != dtype
                for p, shape, stride, dtype in self._shapes.values()
            )
        named = dict(model.named_parameters())
        for name, (p, shape, stride, dtype) in self._shapes.items():
            q = named.get(name)
            if q is not p or tuple(q.shape) != shape or tuple(q.stride()) != stride or q.dtype != dtype:
                return True
        return False
