"""Integer attributes of arbitrary modules that a forward reads, updated after slicing.

Slicing cuts tensors and updates the attributes of the layers torch ships (Conv, Linear, norms) and of
attention layers (see attention_attrs). Model code also keeps its own integers and reshapes with them:
torchvision's ViT reshapes the patch embedding with `self.hidden_dim`, timm's attention with
`self.attn_dim`, MetaFormer's layer scale views its weight with `self.shape = (dim, 1, 1)`. Listing
such attributes per class does not scale; this module finds them from evidence instead:

- a resized dim is one tensor dim the cuts shrink, old size -> new size; it is *seen* by the module
  owning the tensor and by that module's parent (ViT's `hidden_dim` lives on the model, the patch
  embedding conv is its child); a module the graph found sizing an op on a group by an attribute of
  its own (`Group.readers`: C2PSA's `split((self.c, self.c))` runs two levels above the conv it splits,
  its attention views qkv by `self.num_heads`) sees the group's count per block, old -> new;
- an integer attribute of a module (or an int inside a tuple/list attribute) whose value equals the
  old size of a resized dim the module sees is updated to the new size, when every dim of that old
  size the module sees agrees on the new one (a dim of that size left whole counts as a vote for the
  old value: a GPT-2 `Conv1D` with nx == nf, one of them cut);
- only attributes that the module's own class code reads (`.name` in the source of its classes) are
  touched, so that incidental integers (a stored image size, a seed) are left alone; where the source
  cannot be read the attribute is taken as read;
- attributes of torch's own modules are left to slicing and attention_attrs, and an attribute those
  already set is never set twice;
- tuples (MetaFormer's `shape`) and scalars under 8 are always verified: small ints (timm Swin's
  `window_size` (2, 2) at a small input, a layer index) match cut dims by coincidence;
- where the evidence is ambiguous (dims of the same old size going to different new sizes: timm's
  `attn_dim` equals the residual width of a ViT, and heads and residual are pruned apart) the candidates are
  verified, not guessed: with the example inputs of the last `find_groups` on a model of this class,
  each choice (one per attribute and class, e.g. every block's `attn_dim` together) is tried by a
  forward on fake tensors (no compute), the old value first, and the first that runs is kept. Without inputs, or where
  none runs, the attribute is left unchanged and named in a warning.

Verifying costs forwards, so two shortcuts keep it to what is needed (`Choices`): a caller that runs the
sliced model on those very inputs anyway (the run check) may take the sure updates unverified and
verify them by its own forward (if that forward fails, it slices again with the full verification);
and the values one slicing settled on are reused by an identical slicing of an identical model (the
real `apply` after the run check on a copy), proven by a digest of the tensors' names and shapes, the
cuts, every candidate with its old value and options, and the verification inputs.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..graph.remembered import remembered_inputs

Update = tuple[Any, str, Any]  # (object, attribute, new value)
SMALL = 8  # scalars below this are verified like ambiguous ones


def _is_torch_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.")


@cache
def _class_source(cls: type) -> str | None:
    """Source of the methods of `cls` and its model-code bases, `__init__` left out (storing an
    attribute is not reading it); None if some source cannot be read."""
    parts = []
    for c in cls.__mro__:
        if c in (nn.Module, object) or c.__module__.startswith("torch."):
            continue
        for k, f in vars(c).items():
            if k == "__init__":
                continue
            if isinstance(f, property):
                f = f.fget
            if isinstance(f, (staticmethod, classmethod)):
                f = f.__func__
            if not inspect.isfunction(f):
                continue
            try:
                parts.append(inspect.getsource(f))
            except (OSError, TypeError):
                return None
    return "\n".join(parts)


def reads(m: nn.Module, attr: str) -> bool:
    """Whether the code of `m`'s class reads `attr` (True where its source is unavailable)."""
    return _reads(type(m), attr)


@cache
def _reads(cls: type, attr: str) -> bool:
    src = _class_source(cls)
    if src is None:
        return True
    return re.search(rf"\.{re.escape(attr)}\b|['\"]{re.escape(attr)}['\"]", src) is not None


def _scopes(name: str) -> list[str]:
    owner = name.rpartition(".")[0]
    return [owner, owner.rpartition(".")[0]] if owner else [owner]


def _resized(tensors: Mapping[str, torch.Tensor], cuts: Mapping[tuple[str, int], Any]) -> dict[str, dict[int, set[int]]]:
    """Per module name: {old size: {sizes after the cuts}} of the tensor dims that module sees (its own
    tensors and its children's), for the old sizes some cut shrinks. A dim of that size that no cut
    touches adds the old size itself: the evidence is then ambiguous (an attribute equal to it may be
    that dim)."""
    seen: dict[str, dict[int, set[int]]] = {}
    for (name, dim), cut in cuts.items():
        if name != cut.name or not cut.removed.any() or name not in tensors:
            continue  # aliases of tied tensors carry the same cut
        old = tensors[name].shape[dim]
        new = old - int(cut.removed[0].sum())  # kept per block (build_cuts checked the blocks agree)
        for module, before, after in cut.readers:
            if after != before:
                # a module sizing an op on the group by an attribute of its own (Group.readers), wherever
                # it sits, sees the group's count per block (C2PSA's `self.c`, a head count)
                seen.setdefault(module, {}).setdefault(before, set()).add(after)
        if new != old:
            for s in _scopes(name):
                seen.setdefault(s, {}).setdefault(old, set()).add(new)
    if seen:
        for name, t in tensors.items():
            for s in _scopes(name):
                sizes = seen.get(s)
                if sizes is None:
                    continue
                for dim, n in enumerate(t.shape):
                    cut = cuts.get((name, dim))
                    if n in sizes and (cut is None or not cut.removed.any()):
                        sizes[n].add(n)
    return seen


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 1


def _candidates(m: nn.Module) -> Iterable[tuple[str, Any]]:
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if _int(v) or (isinstance(v, (tuple, list)) and v and all(isinstance(x, int) for x in v) and any(_int(x) for x in v)):
            yield k, v


@dataclass
class Unclear:
    """One attribute whose new value the evidence does not fix: the values it may take."""

    module: nn.Module
    name: str  # qualified module name, for messages
    attr: str
    old: Any
    options: list[Any]

    def key(self) -> tuple:
        # one decision per attribute of a class (every ViT block's attn_dim, every stage's dim_out_qk):
        # option i of each, the options being of one kind (as many, the old value first or not)
        return (type(self.module), self.attr, len(self.options), repr(self.options[0]) == repr(self.old))


@dataclass
class Settled:
    """The values one slicing's attributes ended with, and the digest of what decided them."""

    basis: str
    values: list[tuple[str, str, Any]]  # (qualified module name, attribute, value)
    unresolved: list[Unclear]  # left unchanged and warned about


@dataclass
class Choices:
    """How a slicing settles its attributes (see the module docstring). In: `reuse`, values settled by an
    identical slicing; `defer`, the input spec of the forward the caller runs next on the sliced model.
    Out: `settled`, and `deferred` when the sure updates were set unverified."""

    reuse: Settled | None = None
    defer: Any = None
    settled: Settled | None = None
    deferred: bool = False


@dataclass
class ModuleAttrs:
    """The attribute updates of one slicing: `updates` (sure) and `unclear` (to verify after commit)."""

    updates: list[Update] = field(default_factory=list)
    unclear: list[Unclear] = field(default_factory=list)
    sure: list[Unclear] = field(default_factory=list)  # the updates as choices (new value first)
    digest: str = ""  # of the tensors' names and shapes and of the cuts (module_updates)

    def basis(self, specs: Any) -> str:
        h = hashlib.sha256(self.digest.encode())
        for u in (*self.sure, *self.unclear):
            h.update(f"{u.name}|{u.attr}|{u.old!r}|{u.options!r}\n".encode())
        h.update(repr(specs).encode())
        return h.hexdigest()

    def commit(self, model: nn.Module, choices: Choices | None = None) -> None:
        specs = remembered_inputs(type(model))
        if choices is not None and choices.reuse is not None and choices.reuse.basis == self.basis(specs):
            # the same cuts of the same tensors and candidates were verified already (on a copy)
            for name, attr, value in choices.reuse.values:
                setattr(model.get_submodule(name), attr, value)
            if choices.reuse.unresolved:
                _warn_unclear(choices.reuse.unresolved, specs)
            choices.settled = choices.reuse
            return
        unresolved = self._commit(model, specs, choices)
        if choices is not None:
            choices.settled = Settled(
                self.basis(specs),
                [("" if u.name == "<root>" else u.name, u.attr, getattr(u.module, u.attr))
                 for u in (*self.sure, *self.unclear)],
                unresolved,
            )

    def _commit(self, model: nn.Module, specs: Any, choices: Choices | None) -> list[Unclear]:
        for obj, attr, value in self.updates:
            setattr(obj, attr, value)
        if self.unclear and resolve(model, self.unclear, specs):
            return []
        if specs is not None and self.sure and not self.unclear and choices is not None and choices.defer is not None \
                and _same_spec(choices.defer, specs):
            choices.deferred = True  # the caller's forward on these inputs verifies them
            return []
        if specs is not None and self.sure and not runs(model, specs):
            # a width matched by coincidence (timm BoT's dim_out_qk equal to the block width): the sure
            # updates become choices too (new value first), the unclear ones keep old-first
            if resolve(model, self.sure + self.unclear, specs):
                return []
            for u in self.sure:
                setattr(u.module, u.attr, u.options[0])
        if self.unclear:
            _warn_unclear(self.unclear, specs)
        return list(self.unclear)


def input_spec(example_inputs: Any) -> Any:
    """The spec `remembered_inputs` keeps for these inputs (shapes, dtypes, devices; other leaves as they are)."""
    from ..graph.remembered import _spec

    return pytree.tree_map(_spec, example_inputs)


def _same_spec(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and repr(a) == repr(b)
    except Exception:  # a leaf whose == is not a plain answer: not provably the same
        return False


def _digest(tensors: Mapping[str, torch.Tensor], cuts: Mapping[tuple[str, int], Any]) -> str:
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
    for (name, dim), cut in sorted(cuts.items(), key=lambda kv: kv[0]):
        if cut.removed.any():
            h.update(f"{name}:{dim}:{cut.name}:".encode())
            h.update(cut.removed.numpy().tobytes())
    return h.hexdigest()


def _options(value: Any, sizes: Mapping[int, set[int]]) -> list[Any] | None:
    """New values `value` may take after the cuts ([] if unchanged; several if ambiguous)."""
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    # the old value first: where several choices run, the attribute does not shape this forward
    per = [sorted(sizes[v], key=lambda n, v=v: (n != v, n)) if _int(v) and v in sizes else [v] for v in values]
    if all(len(p) == 1 and p[0] == v for p, v in zip(per, values)):
        return []
    combos = list(itertools.product(*per))[:16]
    if isinstance(value, (tuple, list)):
        return [type(value)(c) for c in combos]
    return [c[0] for c in combos]


def module_updates(model: nn.Module, tensors: Mapping[str, torch.Tensor], cuts: Mapping[tuple[str, int], Any],
                   taken: Iterable[Update] = ()) -> ModuleAttrs:
    """The model-code integer attributes that `cuts` invalidate (see the module docstring); nothing is
    set until `commit`. `taken`: updates made elsewhere (attention_attrs), not touched again."""
    done = {(id(o), a) for o, a, _ in taken}
    out = ModuleAttrs()
    modules = dict(model.named_modules(remove_duplicate=False))
    for mname, sizes in _resized(tensors, cuts).items():
        m = modules.get(mname)
        if m is None or _is_torch_module(m):
            continue
        for attr, value in _candidates(m):
            if (id(m), attr) in done or not reads(m, attr):
                continue
            options = _options(value, sizes)
            if len(options) == 1 and (isinstance(value, (tuple, list)) or value < SMALL):
                # a tuple's small ints (a window of (2, 2), a kernel size) and small scalars (a layer
                # index) match cut dims by chance more often than a width: verify, the old value first
                options = [value, *options]
            if len(options) == 1:
                out.updates.append((m, attr, options[0]))
                out.sure.append(Unclear(m, mname or "<root>", attr, value, [options[0], value]))
            elif options:
                out.unclear.append(Unclear(m, mname or "<root>", attr, value, options))
            done.add((id(m), attr))
    if out.sure or out.unclear:
        out.digest = _digest(tensors, cuts)
    return out


# ------------------------------------------------------------------------------------ verification

def _materialize(spec: Any) -> Any:
    if isinstance(spec, tuple) and len(spec) == 4 and spec[0] == "tensor":
        _, shape, dtype, device = spec
        if dtype.is_floating_point or dtype.is_complex:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.zeros(shape, dtype=dtype, device=device)
    return spec


def runs(model: nn.Module, specs: Any) -> bool:
    """Whether `model` runs on inputs of these shapes: a forward of a meta copy on fake tensors (the
    run check's own, so a model whose parameters are already on meta, as in that check, works too)."""
    from .fake_run import RunFailure, fake_forward, prepared_copy

    inputs = pytree.tree_map(
        _materialize, specs, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 4 and x[:1] == ("tensor",)
    )
    return not isinstance(fake_forward(prepared_copy(model), inputs, train=False), RunFailure)


def resolve(model: nn.Module, unclear: list[Unclear], specs: Any | None) -> bool:
    """Set the attributes to the first choice (in option order) under which the model runs; False, with
    every attribute back at its old value, where none is found or there are no inputs to run."""
    classes: dict[tuple, list[Unclear]] = {}
    for u in unclear:
        classes.setdefault(u.key(), []).append(u)
    keys = list(classes)
    if specs is not None:
        choices = itertools.islice(itertools.product(*[range(len(classes[k][0].options)) for k in keys]), 16)
        for pick in choices:
            for k, i in zip(keys, pick):
                for u in classes[k]:
                    setattr(u.module, u.attr, u.options[i])
            if runs(model, specs):
                return True
    for u in unclear:
        setattr(u.module, u.attr, u.old)
    return False


def _warn_unclear(unclear: list[Unclear], specs: Any | None) -> None:
    shown = "; ".join(f"{u.name}.{u.attr}={u.old!r} (could become {u.options})" for u in unclear[:6])
    more = f" and {len(unclear) - 6} more" if len(unclear) > 6 else ""
    why = "no choice runs the model" if specs is not None else "no example inputs to verify a choice with"
    warnings.warn(
        f"tritonprune: attributes left unchanged after pruning, ambiguous ({why}): {shown}{more}. "
        "If the pruned model fails to run, add those modules to ignored_layers",
        stacklevel=5,
    )
