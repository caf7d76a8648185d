"""torchvision and timm for the tests, on the CPU build of torch.

The torchvision wheel on the package index is built for a CUDA torch: installed next to the CPU torch it
breaks `from transformers import Trainer` and `import lightning` (both import it when it is there), so no
extra of this package installs it. `make test` puts the model code of torchvision and timm (`pip install
--no-deps --target .venv/tests-only`) where only the tests look: `install()` adds that folder to
sys.path. The compiled ops still cannot load, and no classification model needs them, so an empty
stand-in for `torchvision._meta_registrations` lets every model load. The library never imports either.
"""

from __future__ import annotations

import os
import sys
import types

import pytest

# the folder `make test` fills; TRITONPRUNE_TEST_DEPS points elsewhere
TESTS_ONLY = os.environ.get("TRITONPRUNE_TEST_DEPS") or os.path.join(sys.prefix, "tests-only")


def install() -> None:
    """Put the tests-only folder on sys.path (after site-packages) and the empty
    `torchvision._meta_registrations` in place (conftest does it for every test)."""
    if os.path.isdir(TESTS_ONLY) and TESTS_ONLY not in sys.path:
        sys.path.append(TESTS_ONLY)
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


install_stub = install  # the older name (bench/ uses it)


def torchvision():
    """The torchvision module, or skip the calling test where it is not installed."""
    install()
    return pytest.importorskip("torchvision")


def timm():
    """The timm module (needs torchvision), or skip."""
    torchvision()
    return pytest.importorskip("timm")
