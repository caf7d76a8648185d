"""`tritonprune inspect | bench | demo` argument handling, and inspect/bench on small models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tritonprune.app.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_inspect_module_factory(capsys):
    code, out = run(capsys, "inspect", "tritonprune.app.examples:small_resnet", "--input-shape", "1,1,8,8")
    assert code == 0
    assert "9 groups, 672 prunable channels" in out  # stem + 2 per stage x 3 stages + shortcuts merged
    assert "layer3.0.conv2" in out
    assert "params: 696,042 -> " in out  # the dry-run plan at the default ratio 0.5


def test_inspect_ignore_and_no_plan(capsys):
    code, out = run(capsys, "inspect", "tritonprune.app.examples:small_resnet", "--input-shape", "1x1x8x8",
                    "--ignore", "layer1.0.conv1", "--ratio", "0")
    assert code == 0
    assert "8 groups" in out and "layer1.0.conv1 " not in out
    assert "PrunePlan" not in out


def test_inspect_file_factory(capsys, tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch.nn as nn\n"
                 "def make():\n"
                 "    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))\n")
    code, out = run(capsys, "inspect", f"{f}:make", "--input-shape", "3,6", "--ratio", "0")
    assert code == 0
    assert "1 groups, 5 prunable channels" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "tritonprune.app.examples", "--input-shape", "1,1,8,8"], "expected MODULE:FACTORY"),
        (["inspect", "no_such_module_xyz:f", "--input-shape", "1"], "cannot import 'no_such_module_xyz'"),
        (["inspect", "tritonprune.app.examples:nope", "--input-shape", "1"], "has no attribute 'nope'"),
        (["inspect", "tritonprune.app.examples:small_resnet"], "give --input-shape"),
        (["inspect", "math:pi", "--input-shape", "1"], "neither an nn.Module nor callable"),
        (["inspect", "builtins:dict", "--input-shape", "1"], "returned a dict, not an nn.Module"),
        (["inspect", "/no/such/file.py:f", "--input-shape", "1"], "no such file"),
        (["bench", "--backends", "cuda_magic"], "unknown backend 'cuda_magic'"),
        (["bench", "--backends", "torch,triton"], "--backends triton runs the Triton kernels on CUDA tensors"),
    ],
)
def test_bad_arguments_say_what_is_wrong(argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert message in str(e.value.code)
    assert str(e.value.code).startswith("tritonprune ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "--input-shape", "1,a"], "expected comma-separated ints"),
        (["inspect", "--input-shape", "0,3"], "expected positive sizes"),
        (["inspect", "--input-shape", "2,3,x,8"], "expected comma-separated ints"),  # not read as (2, 3, 8)
        (["inspect", "--input-shape", "1,3,"], "expected comma-separated ints"),
        (["demo", "--ratio", "1.5"], "--ratio: must be in (0, 1)"),
        (["demo", "--epochs", "0"], "--epochs: must be >= 1"),
        (["demo", "--reg", "-1"], "--reg: must be a finite number >= 0"),
        (["demo", "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["inspect", "--ratio", "1"], "expected a number in [0, 1)"),
        (["bench", "--sizes", "16,x"], "expected comma-separated ints"),
        (["demo", "--regularizer", "l0"], "invalid choice: 'l0'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_input_shape_forms(capsys):
    code, out = run(capsys, "inspect", "tritonprune.app.examples:small_resnet", "--input-shape", "1x1x8x8")
    assert code == 0 and "9 groups" in out


def test_token_model_with_float_inputs_gets_the_dtype_hint(tmp_path):
    (tmp_path / "tok.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 16), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(16, 4))\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["inspect", f"{tmp_path / 'tok.py'}:build", "--input-shape", "2,5"])
    assert "try --input-dtype int64" in str(e.value.code) and "'0'" in str(e.value.code)


def test_demo_refuses_bad_arguments_before_importing_torch():
    # usage errors come from argparse (exit 2), before the seconds of `import torch`
    code = ("import sys\n"
            "from tritonprune.app.cli import main\n"
            "try:\n"
            "    main(['demo', '--ratio', '1.5'])\n"
            "except SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    run_ = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert run_.stdout.split() == ["2", "False"], run_.stdout + run_.stderr
    assert "--ratio: must be in (0, 1)" in run_.stderr


def test_bench_small(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out = run(capsys, "bench", "--sizes", "8", "--min-time", "0.01", "--threads", "1", "--quiet",
                    "--json", str(out_json))
    assert code == 0
    for method in ("tritonprune[torch]", "torch-pruning", "naive loop", "sgd step"):
        assert method in out
    data = json.loads(out_json.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["tritonprune[torch]"]["vs_tritonprune"] == 1.0
    assert rows["sgd step"]["vs_sgd_step"] == 1.0
    assert all(r["median_ms"] > 0 and r["width"] == 8 for r in data["rows"])
    assert "CPU accelerator" in out and data["cpu_accelerator"].split(":")[0] in ("on", "off")
