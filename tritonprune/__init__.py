"""tritonprune: structured-sparsity training and channel pruning for PyTorch.

    groups = tpr.find_groups(model, example_inputs)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, example_inputs,
                                   regularizer=tpr.GroupNorm(reg=5e-4))
    ...train as usual...
    plan = tpr.prune(model, example_inputs, ratio=0.5, optimizer=opt)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers, IDEs and the API reference see
    from . import distributed
    from .graph import Group, Slot, TraceError, find_groups
    from .integrations.hf_checkpoint import from_pretrained, save_pretrained
    from .pruning.plan import PrunePlan
    from .pruning.pruner import prune
    from .regularizing.optimizer import RegularizedOptimizer
    from .regularizing.regularizers import BNScale, GroupLasso, GroupNorm, GrowingReg

# Loaded on first use (PEP 562), so that `import tritonprune` does not import torch: the command line
# parses its arguments (and rejects bad ones) before paying for torch.
_EXPORTS = {
    "distributed": (".distributed", None),
    "Group": (".graph", "Group"),
    "Slot": (".graph", "Slot"),
    "TraceError": (".graph", "TraceError"),
    "find_groups": (".graph", "find_groups"),
    "from_pretrained": (".integrations.hf_checkpoint", "from_pretrained"),  # transformers is imported on use
    "save_pretrained": (".integrations.hf_checkpoint", "save_pretrained"),
    "PrunePlan": (".pruning.plan", "PrunePlan"),
    "prune": (".pruning.pruner", "prune"),
    "RegularizedOptimizer": (".regularizing.optimizer", "RegularizedOptimizer"),
    "BNScale": (".regularizing.regularizers", "BNScale"),
    "GroupLasso": (".regularizing.regularizers", "GroupLasso"),
    "GroupNorm": (".regularizing.regularizers", "GroupNorm"),
    "GrowingReg": (".regularizing.regularizers", "GrowingReg"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tritonprune' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module, __name__)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "find_groups",
    "Group",
    "Slot",
    "TraceError",
    "RegularizedOptimizer",
    "GroupNorm",
    "BNScale",
    "GroupLasso",
    "GrowingReg",
    "prune",
    "PrunePlan",
    "distributed",
    "save_pretrained",
    "from_pretrained",
]
