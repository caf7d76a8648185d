"""torchvision and timm for the tests, on the CPU build of torch.

The torchvision wheel on the package index is built for a CUDA torch: its compiled ops cannot load here,
and `import torchvision` fails while registering their fake kernels. No classification model needs those
ops, so an empty stand-in for `torchvision._meta_registrations` lets every model load. Tests only: the
library itself never imports torchvision.
"""

from __future__ import annotations

import sys
import types

import pytest


def install_stub() -> None:
    """Put the empty `torchvision._meta_registrations` in place (conftest does it for every test)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def torchvision():
    """The torchvision module, or skip the calling test where it is not installed."""
    install_stub()
    return pytest.importorskip("torchvision")


def timm():
    """The timm module (needs torchvision), or skip."""
    torchvision()
    return pytest.importorskip("timm")
