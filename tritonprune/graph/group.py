"""Group and Slot: the channel spaces found in a model and the tensor slices that live in them.

A Group is a set of `size` channels that must be removed together: removing group channel i removes,
in every Slot of the group, the tensor indices that channel i maps to. Slots name tensors by their
qualified names in the model, so a group found on one model applies to any copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Slot.kind: which kind of module owns the tensor. Regularizers and importance pick slots by kind.
CONV = "conv"  # Conv1d/2d/3d weight and bias
CONV_T = "conv_transpose"  # ConvTranspose1d/2d/3d weight [in, out/groups, *k] and bias
LINEAR = "linear"
BATCHNORM = "batchnorm"  # affine weight/bias; running_mean/var are Slots with role STAT
LAYERNORM = "layernorm"
GROUPNORM = "groupnorm"
INSTANCENORM = "instancenorm"
PRELU = "prelu"
EMBEDDING = "embedding"
PARAM = "param"  # a bare nn.Parameter used in forward (layer scale)

# Slot.role: what the channel dim of the tensor is to its module.
OUT = "out"  # producer rows: conv/linear out-channels (weight and bias)
IN = "in"  # consumer columns: conv/linear in-channels
AFFINE = "affine"  # per-channel parameters of norms, PReLU, embeddings, bare parameters
STAT = "stat"  # buffers: BatchNorm/InstanceNorm running statistics


@dataclass(frozen=True)
class Slot:
    """One tensor seen along one dim, covering group channels [offset, offset + length).

    Index map (blocks == 1): group channel `offset + i` owns the indices
    `start + i*repeat + r` (0 <= r < repeat) along `dim`. `repeat` > 1 is a Linear reading a flattened
    C x H x W map (repeat = H*W) or a depthwise conv with a channel multiplier.

    Index map (blocks == G > 1, grouped-conv in-columns): the tensor is `[O, I/G, *k]` with `dim` 1;
    group channel `offset + j*(length//G) + p` owns column `start + p` of the rows of conv group j,
    rows `j*O/G .. (j+1)*O/G`.
    """

    name: str  # qualified name in named_parameters() or named_buffers()
    module: str  # qualified name of the owning module ('' for the root)
    kind: str  # CONV, LINEAR, BATCHNORM, ...
    role: str  # OUT, IN, AFFINE, STAT
    dim: int
    offset: int
    length: int
    start: int = 0
    repeat: int = 1
    blocks: int = 1
    is_bias: bool = False
    is_buffer: bool = False

    def indices(self) -> list[list[int]]:
        """For each covered group channel, the indices along `dim` it owns (blocks == 1 only)."""
        if self.blocks != 1:
            raise ValueError(f"Slot {self.name}: indices() is undefined for blocked slots")
        return [
            list(range(self.start + i * self.repeat, self.start + (i + 1) * self.repeat))
            for i in range(self.length)
        ]


@dataclass(frozen=True)
class HeadInput:
    """A forward argument of `module` that carries the group's heads along `dim` (see graph/entries.py):
    `heads` head rows per period (batch x heads), head h being group channel `channels[h]`. Pruning
    narrows the argument to the kept heads' rows at the module's entry."""

    module: str
    arg: str
    dim: int
    heads: int
    channels: tuple[int, ...]


@dataclass
class Group:
    """A set of coupled channels.

    `blocks` > 1 means the channels come in `blocks` contiguous equal runs (the conv groups of a grouped
    convolution, the groups of a GroupNorm, attention heads when pruning head dims): pruning must remove
    the same count from every run. `unit` > 1 means channels are removed only in whole contiguous runs
    of `unit` (whole attention heads). `exact` is False when an op mixes the channels (a norm or a mean
    over them): removing a channel then changes the others slightly, so the pruned model is not
    exactly the soft-pruned one. `origin` names the producer the group was found from.
    """

    size: int
    slots: tuple[Slot, ...]
    blocks: int = 1
    origin: str = ""
    unit: int = 1
    exact: bool = True
    index: int = field(default=0, compare=False)
    inputs: tuple[HeadInput, ...] = ()  # arguments narrowed to the kept heads (Bloom's ALiBi)
    # modules whose forward sizes an op on these channels by one of their own integer attributes (C2PSA's
    # `split((self.c, self.c))`, `self.c` on the module running the split, above the layers): slicing
    # looks for the attribute there too (pruning/module_attrs)
    readers: tuple[str, ...] = ()

    def slots_of(self, *kinds: str, roles: tuple[str, ...] | None = None) -> list[Slot]:
        return [s for s in self.slots if s.kind in kinds and (roles is None or s.role in roles)]

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.slots:
            seen.setdefault(s.module, None)
        return list(seen)

    @property
    def param_names(self) -> list[str]:
        return [s.name for s in self.slots if not s.is_buffer]

    def __repr__(self) -> str:
        blocks = f", blocks={self.blocks}" if self.blocks > 1 else ""
        blocks += f", unit={self.unit}" if self.unit > 1 else ""
        mods = ", ".join(self.modules[:4]) + (", ..." if len(self.modules) > 4 else "")
        return f"Group(#{self.index} {self.origin!r}, size={self.size}{blocks}, slots={len(self.slots)}: {mods})"


def block_count(a: int, b: int) -> int:
    """The finer of two nested block partitions, or 0 if they do not nest."""
    if a % b == 0 or b % a == 0:
        return max(a, b)
    return 0
