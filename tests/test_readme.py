"""Every Python block of README.md and of the documentation pages (docs/*.md) runs as written, in a fresh interpreter of this environment (the one
`make test` builds: what a user who installed the dev extra has, without the tests' torchvision).

A block may use the names its prose says the reader has (`model`, `example_inputs`, `loader`, ...): the
section's setup below defines them, small enough for CPU. A block that needs a GPU or several processes
is skipped with the reason. A new section with Python blocks must be listed here (the test says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a small image classifier and its data: `model`, `Net`, `example_inputs`, `loader`, `criterion`, `optimizer`
VISION = """
import torch
from tritonprune.app.examples import SmallResNet
torch.manual_seed(0)
def Net():
    return SmallResNet(in_channels=3, num_classes=10, width=8)
model = Net()
example_inputs = torch.randn(2, 3, 8, 8)
_data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
loader = torch.utils.data.DataLoader(_data, batch_size=16)
criterion = torch.nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
import torch_pruning as tp, tritonprune as tpr  # the migration section: "before" and "after"
"""

# a tiny Llama built from a config, also saved as ./my-llama: `model`, `ds`, `ids`
LLAMA = """
import torch, transformers
torch.manual_seed(0)
_cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                use_cache=False)
model = transformers.LlamaForCausalLM(_cfg)
model.save_pretrained("my-llama")
ids = torch.randint(0, 100, (1, 16))
ds = [{"input_ids": (_t := torch.randint(0, 100, (16,))), "labels": _t.clone()} for _ in range(32)]
"""

# Ultralytics lives where the tests keep the packages that import torchvision (tests/tv.py); a block
# about it passes where it is not installed
YOLO = """
import importlib.util, os, sys, tempfile, types
sys.path.append(os.path.join(sys.prefix, "tests-only"))
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp()
if importlib.util.find_spec("ultralytics") is None:
    sys.exit(0)
"""

DISTRIBUTED = "skip: needs several processes (torchrun); tests/test_distributed.py runs these calls under gloo"

# section heading -> the setup its blocks run after, or the reason they are skipped
SECTIONS = {
    "Add it to a training loop": VISION,
    "API": "skip: a signature listing (argument names and defaults), not a program",
    "Hugging Face models: coverage and save/reload": LLAMA,
    "DDP": DISTRIBUTED,
    "FSDP2 (`fully_shard`)": DISTRIBUTED,
    "Pruning under distribution": DISTRIBUTED,
    "Hugging Face `Trainer`": LLAMA,
    "What sparse training buys, and the tuning (honest version)": LLAMA + "import tritonprune as tpr\nx = ids\n",
    "accelerate": VISION,
    "PyTorch Lightning": VISION,
    "Lightning Fabric": VISION,
    "Torch-Pruning: what is the same, what differs, migration": VISION,
    "tritonprune": VISION,  # docs/index.md
    "Detectors: outputs whose width may change (`free_outputs`)": YOLO,
    "Diffusion UNets, SAM, CLIP": "import torch\n",
}


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """(section heading, line of the block's first line, code) for every ```python block."""
    out, heading, block, start = [], "", None, 0
    for i, line in enumerate(text.splitlines(), 1):
        if block is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif block is None and line.strip() == "```python":
            block, start = [], i + 1
        elif block is not None and line.strip() == "```":
            out.append((heading, start, "\n".join(block)))
            block = None
        elif block is not None:
            block.append(line)
    return out


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCKS = [(page.relative_to(ROOT).as_posix(), *block) for page in PAGES for block in python_blocks(page.read_text())]


def test_every_section_with_python_is_listed():
    unknown = sorted({h for _, h, _, _ in BLOCKS} - set(SECTIONS))
    assert not unknown, f"sections with Python blocks that tests/test_readme.py does not know: {unknown}"
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("page,heading,line,code", BLOCKS, ids=[f"{p}:{line}" for p, _, line, _ in BLOCKS])
def test_block_runs(page, heading, line, code, tmp_path):
    setup = SECTIONS.get(heading)
    if setup is None:
        pytest.fail(f"{page}:{line}: section {heading!r} is not listed in tests/test_readme.py")
    if setup.startswith("skip: "):
        pytest.skip(setup[len("skip: "):])
    # the block keeps its README line numbers in tracebacks
    program = f'{setup}\nexec(compile("\\n" * {line - 1} + {code!r}, {page!r}, "exec"))\n'

    env = {k: v for k, v in os.environ.items() if k not in ("TRITONPRUNE_TEST_DEPS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{page}:{line} ({heading}) failed:\n{run.stderr[-4000:]}"


def test_demo_table_is_the_committed_run():
    # the README's demo table is generated from bench/results/demo.json, never typed in
    sys.path.insert(0, str(ROOT / "bench"))
    import demo_table

    results = json.loads(demo_table.RESULTS.read_text())
    text = (ROOT / "README.md").read_text()
    assert demo_table.readme_with_table(text, results) == text, "run python bench/demo_table.py"
    assert results["machine"]["cpu"] and results["threads"] >= 1
