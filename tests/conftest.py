"""Shared pytest setup: few threads (the suite runs on 2 cores, often with xdist), fixed seeds, and a
`cuda` marker that skips where no CUDA device is present."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# tests import their helpers as top-level modules (`from zoo import ZOO`, `import tp_oracle`)
sys.path.insert(0, os.path.dirname(__file__))

# torchvision and timm come from the tests-only folder `make test` fills (never from site-packages: the
# torchvision wheel is built for a CUDA torch); transformers imports torchvision on its own once it is on
# the path, and the stand-in of tests/tv.py makes every import work.
import tv  # noqa: E402

tv.install()

# Triton picks interpreted or compiled mode once, at import: without CUDA, its kernels run in the
# interpreter on CPU tensors, so set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(2 if (os.cpu_count() or 1) >= 2 and "PYTEST_XDIST_WORKER" not in os.environ else 1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
