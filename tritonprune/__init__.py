"""tritonprune: structured-sparsity training and channel pruning for PyTorch.

    groups = tpr.find_groups(model, example_inputs)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, example_inputs,
                                   regularizer=tpr.GroupNorm(reg=5e-4))
    ...train as usual...
    plan = tpr.prune(model, example_inputs, ratio=0.5, optimizer=opt)
"""

from . import distributed
from .graph import Group, Slot, TraceError, find_groups
from .integrations.hf_checkpoint import from_pretrained, save_pretrained  # transformers is imported on use
from .pruning.plan import PrunePlan
from .pruning.pruner import prune
from .regularizing.optimizer import RegularizedOptimizer
from .regularizing.regularizers import BNScale, GroupLasso, GroupNorm, GrowingReg

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
