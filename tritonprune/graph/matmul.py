"""Products of two activations: bmm, baddbmm, matmul and mm without a weight, einsum.

Written as an einsum over letters: batch letters (in both operands and the output), contracted letters
(in both operands, not in the output) and free letters (one operand and the output).

- A batch letter along which channels run (attention heads reshaped into a batch dim, q @ k^T per head)
  couples everything of one batch index: every channel of head h in both operands becomes one channel,
  so heads go whole, together with what they meet (the scores of head h, then the values of head h).
- Otherwise a contracted letter couples the operands' channels at the same position (x @ y over C), and
  a free letter carries its operand's channels to the output.
- An operand without channels along a contracted letter where the other has them (a table shared by all
  heads) keeps that dim's size: fine where the other's lines along it go whole (whole heads), else
  those channels are left out, naming the op.
"""

from __future__ import annotations

import string

import torch
from torch import fx

from .channels import NONE, has_ids, none_like
from .elementwise import align, couple
from .entries import adapt_entry
from .walker import Walker, no_identity, overloads, rule, unknown, where

aten = torch.ops.aten


def _in_letters(ids: torch.Tensor, shape: tuple[int, ...], letters: str, order: str) -> tuple[torch.Tensor, list[int]]:
    """Compact ids and real sizes laid out along `order` (size 1 for the letters the operand lacks)."""
    perm = [letters.index(c) for c in order if c in letters]
    ids = ids.permute(perm)
    sizes = [shape[letters.index(c)] if c in letters else 1 for c in order]
    view = [ids.shape[perm.index(letters.index(c))] if c in letters else 1 for c in order]
    return ids.reshape(view), sizes


def contract(w: Walker, node: fx.Node, operands: list[tuple[object, str]], out: str) -> object:
    """Channel ids of the output of einsum(`operands` letters -> `out`); see the module docstring."""
    ops = []
    for arg, letters in operands:
        ids, shape = w.act(arg), w.shape(arg)
        if shape is None or len(shape) != len(letters) or len(set(letters)) != len(letters):
            return unknown(w, node)
        ops.append((ids if isinstance(ids, torch.Tensor) else none_like(shape), shape, letters))
    if not any(has_ids(ids) for ids, _, _ in ops):
        return no_identity(w, node)
    if len(ops) != 2:
        return unknown(w, node)
    order = "".join(dict.fromkeys(out + "".join(lt for _, _, lt in ops)))
    (a, sa), (b, sb) = (_in_letters(i, s, lt, order) for i, s, lt in ops)
    la, lb = ops[0][2], ops[1][2]
    batch = [k for k, c in enumerate(order) if c in la and c in lb and c in out]
    contracted = [k for k, c in enumerate(order) if c in la and c in lb and c not in out]
    summed = [k for k, c in enumerate(order) if c not in out and not (c in la and c in lb)]
    varies = lambda t, dims: any(t.shape[k] > 1 for k in dims)  # noqa: E731

    if varies(a, summed) or varies(b, summed):
        w.warn(node, "a product sums over a channel dim of one operand only")
        return _give_up(w, node, a, b)
    chan_batch = [k for k in batch if a.shape[k] > 1 or b.shape[k] > 1]
    if chan_batch:
        return _per_batch_index(w, node, (a, sa), (b, sb), chan_batch, order, out)
    free_a = [k for k, c in enumerate(order) if c in la and c in out and c not in lb]
    free_b = [k for k, c in enumerate(order) if c in lb and c in out and c not in la]
    fixed = False
    for t, other, s_other in ((a, b, sb), (b, a, sa)):
        if not varies(t, contracted):
            continue
        if varies(t, free_a + free_b) and not varies(other, free_a + free_b):
            # the other operand is a table shared by all heads (SAM's relative-position embedding, a
            # parameter or no channels at all): the contracted size must stay, which holds where each of
            # t's lines along it goes whole (a head that is one channel) and the table keeps its size;
            # assemble fails the groups, naming this op, where not
            why = where(w, node, "a product with a table shared by the heads keeps the contracted size")
            for k in contracted:
                for u in (t, other):
                    if u.shape[k] > 1:
                        w.space.fix_dim(u, k, why)
            fixed = True
            break
        elif varies(t, free_a + free_b) or not has_ids(other) \
                or any(other.shape[k] == 1 and s_other[k] > 1 for k in contracted):
            w.warn(node, "a product over a channel dim that the other operand has no channels along")
            return _give_up(w, node, a, b)
    if varies(a, contracted) and not fixed:
        pa, pb = torch.broadcast_tensors(a, b)
        w.space.union(pa, pb)
        w.space.exclude(torch.where(pb < 0, pa, NONE))
        w.space.exclude(torch.where(pa < 0, pb, NONE))
    if varies(a, free_a) and varies(b, free_b):
        w.warn(node, "an outer product of two sets of channels")
        return _give_up(w, node, a, b)
    src = a if varies(a, free_a) else b if varies(b, free_b) else None
    if src is None:
        return no_identity(w, node)
    gone = set(contracted + summed)
    res = src[tuple(0 if k in gone else slice(None) for k in range(len(order)))]
    kept = [c for k, c in enumerate(order) if k not in gone]
    return res.permute([kept.index(c) for c in out])


def _per_batch_index(w: Walker, node: fx.Node, a, b, chan_batch: list[int], order: str, out: str) -> object:
    """Channels along a batch dim (heads): one channel per batch index, across both operands."""
    (a, sa), (b, sb) = a, b
    full = [max(sa[k], sb[k]) for k in chan_batch]
    rows = []
    for t, s in ((a, sa), (b, sb)):
        if any(s[k] > 1 for k in chan_batch) and not bool((t >= 0).any()):
            w.warn(node, "a batched product over heads meets an operand without channels along the heads")
            return _give_up(w, node, a, b)
        rest = [k for k in range(t.dim()) if k not in chan_batch]
        m = t.permute(chan_batch + rest)
        m = m.expand(*full, *m.shape[len(chan_batch):]).reshape(-1, int(torch.tensor(m.shape[len(chan_batch):]).prod()))
        rows.append(m)
    rows = torch.cat(rows, 1)
    valid = rows >= 0
    first = torch.where(valid.any(1), rows.gather(1, valid.float().argmax(1, keepdim=True)).squeeze(1), NONE)
    if bool((first < 0).any()):
        # a head with no channel at all next to heads with channels: its size cannot follow
        w.warn(node, "a batched product over heads where some heads have no channels")
        return _give_up(w, node, a, b)
    w.space.union(rows, first[:, None].expand_as(rows))
    shape = [1] * len(out)
    for k, n in zip(chan_batch, full):
        shape[out.index(order[k])] = n
    perm_letters = [order[k] for k in chan_batch]
    rep = first.reshape(full)
    # lay the batch letters out in output order
    want = sorted(range(len(perm_letters)), key=lambda i: out.index(perm_letters[i]))
    return rep.permute(want).reshape(shape)


def _give_up(w: Walker, node: fx.Node, a: torch.Tensor, b: torch.Tensor) -> object:
    w.space.exclude(a)
    w.space.exclude(b)
    return no_identity(w, node)


def matmul_letters(na: int, nb: int) -> tuple[str, str, str] | None:
    """torch.matmul's broadcasting as einsum letters, for operands of `na` and `nb` dims."""
    if na < 1 or nb < 1:
        return None
    batch = string.ascii_lowercase[: max(na, nb, 2) - 2]
    la = batch[len(batch) - max(na - 2, 0):] + ("NK" if na >= 2 else "K")
    lb = batch[len(batch) - max(nb - 2, 0):] + ("KM" if nb >= 2 else "K")
    return la, lb, batch + ("N" if na >= 2 else "") + ("M" if nb >= 2 else "")


def activation_matmul(w: Walker, node: fx.Node) -> object:
    """matmul / mm / bmm of two activations (attention scores q @ k^T, attn @ v)."""
    a, b = node.args[0], node.args[1]
    sa, sb = w.shape(a), w.shape(b)
    letters = matmul_letters(len(sa), len(sb)) if sa is not None and sb is not None else None
    if letters is None:
        return unknown(w, node)
    la, lb, out = letters
    return contract(w, node, [(a, la), (b, lb)], out)


@rule(*overloads(aten.bmm))
def bmm(w: Walker, node: fx.Node) -> object:
    return activation_matmul(w, node)


@rule(*overloads(aten.baddbmm))
def baddbmm(w: Walker, node: fx.Node) -> object:
    """input * beta + b1 @ b2: the product's channels meet the input's elementwise."""
    ids = contract(w, node, [(node.args[1], "bnk"), (node.args[2], "bkm")], "bnm")
    inp, shape = w.act(node.args[0]), w.shape(node.args[0])
    out = w.out_shape(node)
    if not isinstance(ids, torch.Tensor) or shape is None:
        return ids
    inp = align(inp if isinstance(inp, torch.Tensor) else none_like(shape), 3)
    shape = (1,) * (3 - len(shape)) + tuple(shape)
    if not has_ids(inp) and adapt_entry(w, node, node.args[0], align(ids, 3), shape):
        return align(ids, 3)  # a bias the module receives per head (Bloom's ALiBi): narrowed at its entry
    return couple(w, node, align(ids, 3), out, inp, shape)


@rule(*overloads(aten.einsum))
def einsum(w: Walker, node: fx.Node) -> object:
    eq, operands = node.args[0], node.args[1]
    if "..." in eq or "->" not in eq:
        return unknown(w, node)
    lhs, out = eq.replace(" ", "").split("->")
    parts = lhs.split(",")
    if len(parts) != len(operands):
        return unknown(w, node)
    return contract(w, node, list(zip(operands, parts)), out)
