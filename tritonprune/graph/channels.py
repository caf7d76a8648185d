"""Channel identities: every channel of every parameter dim gets an integer id; coupling rules union ids.

Activations carry a compact id tensor with the activation's number of dims, each dim either 1 (ids
constant along it) or the activation's size; -1 marks elements with no channel identity (batch,
spatial, values from model inputs or constants). Parameters and buffers get 1-D ids per dim, made on
first use, so a weight's rows and columns are separate channel spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

NONE = -1


@dataclass
class Registered:
    """One parameter/buffer dim whose ids were handed out: the raw material of Slots."""

    name: str
    module: str
    kind: str
    role: str
    dim: int
    size: int  # number of ids (for blocked dims: blocks * tensor size along dim)
    first: int  # first id
    blocks: int = 1
    is_bias: bool = False
    is_buffer: bool = False

    @cached_property
    def ids(self) -> torch.Tensor:
        # made once: rules only read ids (every rule returns new tensors), so the one tensor is shared
        return torch.arange(self.first, self.first + self.size)


class IdSpace:
    def __init__(self) -> None:
        self.count = 0
        self.registered: dict[tuple[str, int], Registered] = {}
        self.edges_a: list[torch.Tensor] = []
        self.edges_b: list[torch.Tensor] = []
        self.excluded: list[torch.Tensor] = []
        self.requirements: list[tuple[torch.Tensor, int]] = []  # (ids in order, blocks)
        # blocks implied by a reshape splitting a channel dim (channel shuffle, heads): weaker than
        # the blocks and units an op states, which override them
        self.soft_requirements: list[tuple[torch.Tensor, int]] = []
        self.units: list[tuple[torch.Tensor, int]] = []  # (ids in order, unit): remove whole runs only
        self.unit_sources: list[str] = []  # the node that stated each unit requirement
        self.split_units: set[str] = set()  # those whose units fell into several groups (see assemble)
        self.mixing: list[torch.Tensor] = []  # ids an op mixes (norms, means over channels)
        # (ids [parts, n], why): every channel must own as many elements in each part (select/split)
        self.balanced: list[tuple[torch.Tensor, str]] = []
        self.balanced_selects: dict[int, str] = {}  # balanced index -> the select node that stated it
        # balanced index -> (module name): the parts are sized by an integer attribute of that module
        # (C2PSA's `split((self.c, self.c))`); where they are uneven they become equal blocks instead,
        # the module a reader of the group's width (Group.readers) whose attribute follows the cut
        self.balanced_sized_by: dict[int, str] = {}
        self.readers: list[tuple[torch.Tensor, str]] = []  # (ids, module name) of those blocks
        self.uneven_selects: set[str] = set()  # those whose parts fell into different groups (see assemble)
        # (lines [n, L], why): each line runs along a dim whose size the code fixes (slices of it, or
        # elementwise partners without identity such as rotary cos/sin); pruning must never shorten
        # it, so every line must be one whole unit (attention head) of its group
        self.fixed_lines: list[tuple[torch.Tensor, str]] = []
        self.poisoned: set[str] = set()  # tensors fed to ops without a rule: never pruned
        # (head ids in order, entries.EntryNeed): a module argument narrowed to the kept heads at its entry
        self.adaptors: list[tuple[torch.Tensor, object]] = []

    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.count, self.count + n)
        self.count += n
        return ids

    def param_ids(self, name: str, dim: int, size: int, *, module: str, kind: str, role: str,
                  blocks: int = 1, is_bias: bool = False, is_buffer: bool = False) -> torch.Tensor:
        key = (name, dim)
        reg = self.registered.get(key)
        if reg is None:
            reg = Registered(name, module, kind, role, dim, size, self.count, blocks, is_bias, is_buffer)
            self.count += size
            self.registered[key] = reg
            if name in self.poisoned:
                self.exclude(reg.ids)
        elif reg.size != size or reg.blocks != blocks:
            # the same tensor dim used two incompatible ways (e.g. shared weights in a grouped and a
            # plain conv): its channels cannot be pruned consistently
            self.exclude(reg.ids)
            return self.fresh(size).fill_(NONE)
        return reg.ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union ids elementwise (after broadcasting); pairs where either side is NONE are skipped."""
        if a.shape != b.shape:
            a, b = torch.broadcast_tensors(a, b)
        if a.dim() != 1:
            a, b = a.reshape(-1), b.reshape(-1)
        if a.numel() > 4096:  # big expanded values: drop the NONE pairs now (memory)
            both = (a >= 0) & (b >= 0)
            a, b = a[both], b[both]
        self.edges_a.append(a)  # else the NONE pairs are dropped once for all edges, in components()
        self.edges_b.append(b)

    def exclude(self, ids: torch.Tensor) -> None:
        _append_known(self.excluded, ids)

    def require_blocks(self, ids: torch.Tensor, blocks: int) -> None:
        if blocks > 1:
            self.requirements.append((ids.reshape(-1).clone(), blocks))

    def require_units(self, ids: torch.Tensor, unit: int, source: str = "") -> None:
        if unit > 1:
            self.units.append((ids.reshape(-1).clone(), unit))
            self.unit_sources.append(source)

    def fix_dim(self, ids: torch.Tensor, dim: int, why: str) -> None:
        lines = ids.movedim(dim, -1).reshape(-1, ids.shape[dim])
        lines = torch.unique(lines, dim=0) if lines.shape[0] > 1 else lines
        self.fixed_lines.append((lines, why))

    def adapt(self, heads: torch.Tensor, need: object) -> None:
        self.adaptors.append((heads, need))

    def mix(self, ids: torch.Tensor) -> None:
        _append_known(self.mixing, ids)

    def require_balanced(self, parts: torch.Tensor, why: str, select: str = "", sized_by: str | None = None) -> None:
        """Each row of `parts` is one part of a dim an op indexes by position; pruning must keep the parts
        equal, so every channel must own the same number of elements in each part. `select`: the node
        name of a select stating it (find_groups may join its parts, see assemble._check_balanced).
        `sized_by`: the module whose integer attribute sizes the parts (rows of `parts` are then 1-D
        channel runs): parts in different groups are kept equal as blocks, that module reading the width."""
        if select:
            self.balanced_selects[len(self.balanced)] = select
        if sized_by is not None:
            self.balanced_sized_by[len(self.balanced)] = sized_by
        self.balanced.append((parts.reshape(parts.shape[0], -1).clone(), why))

    def components(self) -> torch.Tensor:
        """Component label of every id (the smallest id in its component)."""
        n = self.count
        if not self.edges_a:
            return torch.arange(n)
        a, b = torch.cat(self.edges_a), torch.cat(self.edges_b)
        # unions pair aligned id ranges (a layer's channels with the next one's): a few hundred runs stand
        # for ~10^5 edges, so the components are found on intervals of ids; else on the ids themselves
        runs = _runs(a, b) if a.numel() > 8192 else None  # (small graphs: propagation is cheaper)
        labels = _interval_labels(n, *runs) if runs is not None else None
        return labels if labels is not None else _propagate(n, a, b)


def _runs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The edges (a[i], b[i]) without NONE ends as runs (a0, b0, k): a0 + j ~ b0 + j for j < k; None
    where runs would not be much fewer than edges."""
    e = a.numel()
    brk = torch.ones(e, dtype=torch.bool)
    brk[1:] = (a[1:] != a[:-1] + 1) | (b[1:] != b[:-1] + 1)
    if e and bool((a.min() < 0) | (b.min() < 0)):
        # no run continues through a NONE end (it would need -2 before it), but one could start after it:
        # cut there too; the NONE edges stay runs of one, dropped below (masking the edges costs more)
        brk[1:] |= ((a < 0) | (b < 0))[:-1]
    starts = brk.nonzero().squeeze(1)
    if starts.numel() > max(64, e // 8):
        return None
    lengths = torch.diff(starts, append=torch.tensor([e]))
    a0, b0 = a[starts], b[starts]
    keep = (a0 >= 0) & (b0 >= 0) & (a0 != b0)  # (an edge of an id to itself joins nothing)
    return a0[keep], b0[keep], lengths[keep]


def _interval_labels(n: int, a0: torch.Tensor, b0: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Components of the runs' edges, found on intervals: the ids are cut at every run's ends, and every
    cut inside one side of a run is carried by its shift to the other side, until each run maps the
    intervals of one side onto those of the other. Run-joined intervals are then one component position
    by position: an id's label is the smallest start in its interval's component plus its offset. None
    where the cuts keep multiplying (runs overlapping their own shift): the caller works on the ids."""
    if not a0.numel():
        return torch.arange(n)
    shift = b0 - a0
    cuts = torch.unique(torch.cat([torch.tensor([0, n]), a0, a0 + k, b0, b0 + k]))  # sorted
    limit = 8 * cuts.numel()
    for _ in range(16):
        ia, ib = torch.searchsorted(cuts, a0), torch.searchsorted(cuts, b0)
        ma, mb = torch.searchsorted(cuts, a0 + k) - ia, torch.searchsorted(cuts, b0 + k) - ib
        pa, pb = _ranges(ia, ma), _ranges(ib, mb)
        more = torch.unique(torch.cat([cuts, cuts[pa] + shift.repeat_interleave(ma),
                                       cuts[pb] - shift.repeat_interleave(mb)]))
        if more.numel() == cuts.numel():
            break  # closed: the cuts of each run's sides match one to one after its shift
        if more.numel() > limit:
            return None
        cuts = more
    else:
        return None
    root = _propagate(cuts.numel() - 1, pa, pb)  # intervals joined; the smallest index has the smallest start
    starts = cuts[:-1]
    return torch.arange(n) - (starts - starts[root]).repeat_interleave(torch.diff(cuts))


def _ranges(first: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """first[i], first[i] + 1, ..., first[i] + count[i] - 1 for every i, concatenated."""
    offsets = torch.cumsum(count, 0) - count
    return first.repeat_interleave(count) + torch.arange(int(count.sum())) - offsets.repeat_interleave(count)


def _propagate(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Components by label propagation over the edges (any edge list)."""
    labels = torch.arange(n + 1)  # n: a sink for the NONE ends of edges, kept at its own label
    # pairs with a NONE side are dropped by pointing them at the sink (cheaper than masking them out)
    a = torch.where(a < 0, n, a)
    b = torch.where(b < 0, n, b)
    while True:
        la, lb = labels[a], labels[b]
        low = torch.minimum(la, lb)
        new = labels.clone()
        new.scatter_reduce_(0, la, low, reduce="amin")
        new.scatter_reduce_(0, lb, low, reduce="amin")
        new[n] = n  # the sink joins nothing: an edge to it changes no other label
        # pointer jumping until every id points at a fixed point of the label map
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            return labels[:n]
        labels = new


# ---- compact id tensors -------------------------------------------------------------------------


def none_like(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    return torch.full((1,) * len(shape), NONE, dtype=torch.long)


def has_ids(ids: torch.Tensor | None) -> bool:
    return ids is not None and bool((ids >= 0).any())


def along(ids1d: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A compact id tensor of `ndim` dims that varies along `dim` only."""
    shape = [1] * ndim
    shape[dim] = ids1d.numel()
    return ids1d.reshape(shape)


def expand_dims(ids: torch.Tensor, shape: tuple[int, ...], dims: list[int]) -> torch.Tensor:
    """Materialize the compact ids along `dims` to the real sizes."""
    target = list(ids.shape)
    for d in dims:
        target[d] = shape[d]
    return ids.expand(target) if target != list(ids.shape) else ids


def channel_vector(ids: torch.Tensor, dim: int, size: int) -> torch.Tensor | None:
    """The 1-D ids along `dim` if ids vary along `dim` only (or are constant NONE); else None."""
    others = [d for d in range(ids.dim()) if d != dim and ids.shape[d] > 1]
    if others:
        return None
    if ids.shape[dim] == size:
        return ids.reshape(-1)
    flat = ids.reshape(-1)
    if flat.numel() == 1 and flat.item() < 0:
        return torch.full((size,), NONE, dtype=torch.long)
    return None


def _append_known(to: list, ids: torch.Tensor) -> None:
    """Append the channel ids of `ids` (read with known_ids)."""
    if ids.dim() != 1:
        ids = ids.reshape(-1)
    if ids.numel() > 4096:  # big expanded values: keep the distinct ids only (memory)
        ids = ids.unique()
    to.append(ids)  # the NONE (-1) entries are dropped where the list is read (known_ids)


def known_ids(parts: list[torch.Tensor]) -> torch.Tensor:
    """The channel ids collected by _append_known (exclude, mix), in one tensor without the NONE entries."""
    ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    return ids[ids >= 0]
