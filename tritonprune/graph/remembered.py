"""The example inputs of the last `find_groups` on each model class, kept as shapes (never the data).

Slicing verifies ambiguous integer attributes after a cut by running the pruned model on inputs of these
shapes (pruning.module_attrs); the trace is the one place that sees them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .trace import split_inputs

_INPUTS: dict[type, Any] = {}  # model class -> spec of the example inputs of the last find_groups


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    return x


def remember_inputs(model: nn.Module, example_inputs: Any) -> None:
    """Keep the shapes (not the data) of the example inputs of `find_groups`, to verify attribute choices."""
    try:
        split_inputs(example_inputs)  # a form the model can be called with (graph.trace.call_with)
    except TypeError:
        return
    _INPUTS[type(model)] = pytree.tree_map(_spec, example_inputs)


def remembered_inputs(model_class: type) -> Any | None:
    """The spec `remember_inputs` kept for this class, or None."""
    return _INPUTS.get(model_class)
