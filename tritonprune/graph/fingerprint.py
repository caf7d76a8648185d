"""A fingerprint of a model's structure: the names and shapes of its parameters and buffers.

Groups found on a model describe that structure. A RegularizedOptimizer records the fingerprint when it
gets its groups, and `prune` compares it before reusing them: a layer replaced, a buffer added (one that
scales the channels, say) or a tensor reshaped since then means the groups may no longer be right.
Values are not part of it (training changes them).
"""

from __future__ import annotations

import hashlib

from torch import nn


def fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for kind, items in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            h.update(f"{kind}:{name}:{tuple(t.shape)}\n".encode())
    return h.hexdigest()[:24]
