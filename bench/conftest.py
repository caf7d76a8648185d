"""Benchmarks: run with `python -m pytest bench --benchmark-only` (not part of the test suite)."""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# transformers imports torchvision, whose wheel here is built for a CUDA torch: the tests' stand-in
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import tv  # noqa: E402

tv.install_stub()
