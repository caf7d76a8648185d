"""Torch-Pruning 1.6.1 as an oracle: its channel groups on a model, in forms our tests can compare.

Facts about how Torch-Pruning groups channels and regularizes are in notes/torch_pruning_behaviour.md.
Only tests import this module; torch_pruning is a dev dependency.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

try:
    import torch_pruning as tp
    from torch_pruning import ops as tp_ops

    HAS_TP = True
except ImportError:  # the oracle is optional; tests that need it skip
    tp = None
    HAS_TP = False

Slot = tuple[str, int, tuple[int, ...]]  # (qualified tensor name, dim, sorted indices)

# Where TP 1.6.1 is wrong or crashes on zoo models (checked by tests/test_zoo_models.py).
# Slot indices wrong: TP's split mapping hands the split parts to the consumers in the wrong order,
# and after adaptive_avg_pool3d(., 1).flatten(1) its reshape mapping gives 20 indices for 10 channels.
TP_WRONG_SLOTS = {"split_chunk", "conv_transpose_1d_3d", "depthwise_multiplier"}
# (split_chunk also has a TP group across torch.split(x, [4, 14]), whose sizes are fixed in forward.)
# GroupNormPruner.regularize raises (grouped-conv in-channels, ConvTranspose in-channels, the wrong
# slots above). On the others it runs, without NaN for randomized weights.
TP_GROUPNORM_REG_FAILS = {"resnext", "unet", "split_chunk", "depthwise_multiplier", "conv_transpose_1d_3d"}
# BNScalePruner(group_lasso=True).regularize raises on a group without BatchNorm (TypeError) or with a
# BatchNorm only partly in the group (densenet concat: shape mismatch).
TP_GROUP_LASSO_FAILS = {"densenet", "se_block", "unet", "mlp", "prelu_instancenorm_groupnorm"}


def _require_tp() -> None:
    if not HAS_TP:
        raise RuntimeError(
            "tests/tp_oracle: torch_pruning is not installed; pip install torch-pruning==1.6.1"
        )


def _as_args(example_inputs: Any) -> Any:
    # TP calls model(*inputs) for a tuple/list, model(**inputs) for a dict, model(inputs) otherwise.
    return list(example_inputs) if isinstance(example_inputs, tuple) else example_inputs


def root_types() -> tuple[type, ...]:
    """get_all_groups' default root types (Conv*d incl. transposed, Linear)."""
    _require_tp()
    return (tp_ops.TORCH_CONV, tp_ops.TORCH_LINEAR)


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """A TP DependencyGraph for `model`, with TP's warnings (unwrapped parameters) silenced."""
    _require_tp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=_as_args(example_inputs))


def _out_group(dg, module: nn.Module):
    pruner = dg.get_pruner_of_module(module)
    n = pruner.get_out_channels(module)
    return dg.get_pruning_group(module, pruner.prune_out_channels, list(range(n)))


def output_layers(dg, model: nn.Module) -> list[nn.Module]:
    """Root layers (Conv/Linear) whose output channels reach a model output.

    This is what a Torch-Pruning user passes as `ignored_layers` (the classifier, a segmentation head):
    a root whose out-channel group contains a graph sink (a module whose output nothing consumes,
    i.e. a model output) or one of TP's `_OutputOp` nodes (an output made by a non-module op).
    """
    found = []
    for m in dg.module2node:
        if not isinstance(m, root_types()):
            continue
        for dep, _ in _out_group(dg, m):
            target = dep.target
            if isinstance(target.module, tp_ops._OutputOp) or (
                len(target.outputs) == 0 and dg.is_out_channel_pruning_fn(dep.handler)
            ):
                found.append(m)
                break
    return found


def tp_groups(model: nn.Module, example_inputs: Any, ignored_layers=None, dg=None) -> list:
    """TP's groups from get_all_groups, with the output layers added to `ignored_layers`.
    Pass `dg` (from build_graph) to reuse a traced graph."""
    dg = dg or build_graph(model, example_inputs)
    ignored = list(ignored_layers or []) + output_layers(dg, model)
    return list(dg.get_all_groups(ignored_layers=ignored, root_module_types=root_types()))


def tp_group_sizes(model: nn.Module, example_inputs: Any, ignored_layers=None) -> list[int]:
    """Sorted sizes of TP's groups. A TP group's size is its root's out-channel count (the first dep,
    `group[0]`, is the root's prune_out_channels over range(out_channels))."""
    return sorted(len(group[0][1]) for group in tp_groups(model, example_inputs, ignored_layers))


# ------------------------------------------------------------------------------------- group slots


def _names(model: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    mods = {id(m): n for n, m in model.named_modules()}
    params = {id(p): n for n, p in model.named_parameters()}
    return mods, params


def _q(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def dep_slots(model: nn.Module, dep, idxs, names=None) -> list[Slot]:
    """The (tensor, dim, indices) that one TP dependency touches when its handler prunes `idxs`.

    Mirrors the handlers in torch_pruning/pruner/function.py: conv out rows are dim 0 (dim 1 for a
    transposed conv), conv in columns dim 1 (dim 0 transposed); a grouped (non-depthwise) conv's
    in-handler acts on the per-conv-group column `i mod (in/groups)`; norms touch weight, bias and
    running statistics along dim 0; LayerNorm its last dim; bare parameters their pruning_dim.
    """
    mods, params = names or _names(model)
    module = dep.target.module
    plain = sorted({int(i) for i in idxs})
    ix = tuple(plain)
    # depthwise and norm pruners alias prune_in_channels = prune_out_channels: same __name__
    is_out = dep.handler.__name__ == "prune_out_channels"

    if isinstance(module, nn.Parameter):
        return [(params[id(module)], int(dep.target.pruning_dim), ix)]
    prefix = mods.get(id(module))
    if prefix is None:  # TP's own op nodes (concat, split, reshape, output...) own no tensors
        return []

    out: list[Slot] = []

    def add(attr: str, dim: int, indices=ix) -> None:
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            out.append((_q(prefix, attr), dim, tuple(indices)))

    if isinstance(module, tp_ops.TORCH_CONV):
        t = module.transposed
        depthwise = tp_ops.module2type(module) == tp_ops.OPTYPE.DEPTHWISE_CONV
        if depthwise or is_out:
            add("weight", 1 if (t and not depthwise) else 0)
            add("bias", 0)
        else:
            per_group = module.in_channels // module.groups
            cols = sorted({i % per_group for i in plain}) if module.groups > 1 else plain
            add("weight", 0 if t else 1, cols)
    elif isinstance(module, nn.Linear):
        if is_out:
            add("weight", 0)
            add("bias", 0)
        else:
            add("weight", 1)
    elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            add(attr, 0)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            add("weight", module.weight.dim() - 1)
        if module.bias is not None:
            add("bias", module.bias.dim() - 1)
    elif isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            add("weight", 0)
    elif isinstance(module, nn.Embedding):
        add("weight", 1)
    return out


def tp_group_slots(model: nn.Module, example_inputs: Any, ignored_layers=None) -> list[list[Slot]]:
    """Per TP group (get_all_groups order), the sorted (tensor name, dim, sorted indices) it touches
    when the whole group is pruned. A tensor reached by two deps of one group (e.g. a conv feeding
    itself through a residual) is merged into one entry with the union of indices."""
    names = _names(model)
    result = []
    for group in tp_groups(model, example_inputs, ignored_layers):
        merged: dict[tuple[str, int], set[int]] = {}
        for dep, idxs in group:
            for name, dim, ix in dep_slots(model, dep, idxs, names):
                merged.setdefault((name, dim), set()).update(ix)
        result.append(sorted((n, d, tuple(sorted(ix))) for (n, d), ix in merged.items()))
    return result


def our_group_slots(group) -> list[Slot]:
    """A tritonprune Group in tp_group_slots' form: sorted (tensor name, dim, sorted indices), one
    entry per (tensor, dim). A blocked slot (grouped-conv in-columns) gives its per-conv-group
    columns, which is what TP's in-channel handler touches."""
    merged: dict[tuple[str, int], set[int]] = {}
    for s in group.slots:
        if s.blocks == 1:
            ix = {i for row in s.indices() for i in row}
        else:
            ix = set(range(s.start, s.start + s.length // s.blocks))
        merged.setdefault((s.name, s.dim), set()).update(ix)
    return sorted((n, d, tuple(sorted(ix))) for (n, d), ix in merged.items())


def describe(model: nn.Module, example_inputs: Any, ignored_layers=None) -> str:
    """Human-readable dump of TP's groups (for notes and debugging)."""
    mods, _ = _names(model)
    lines = []
    for k, group in enumerate(tp_groups(model, example_inputs, ignored_layers)):
        lines.append(f"group {k}: size {len(group[0][1])}")
        for item in group:
            dep, plain, roots = item.dep, list(item.idxs), list(item.root_idxs)
            name = mods.get(id(dep.target.module), repr(dep.target.module))
            lines.append(
                f"  {dep.handler.__self__.__class__.__name__}.{dep.handler.__name__:20s} {name:30s} "
                f"n={len(plain)} idx[{min(plain, default=-1)}..{max(plain, default=-1)}] "
                f"root[{min(roots, default=-1)}..{max(roots, default=-1)}]"
            )
    return "\n".join(lines)
