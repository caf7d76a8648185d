"""The notebooks run top to bottom (with TRITONPRUNE_NB_QUICK=1: tiny sizes) in a kernel of this very Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "tritonprune-test"


@pytest.fixture()
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec that runs sys.executable, found first through JUPYTER_PATH (whatever else is installed)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tritonprune test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("TRITONPRUNE_NB_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


@pytest.mark.parametrize("name", ["01_profile_regularizer.ipynb", "02_sparse_training.ipynb"])
def test_notebook_runs(name, kernel_env):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120,
                                     resources={"metadata": {"path": str(kernel_env)}})
    client.execute()  # raises CellExecutionError with the cell and traceback if any cell fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    # every notebook draws at least one figure
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)


@pytest.mark.parametrize("name", ["01_profile_regularizer.ipynb", "02_sparse_training.ipynb"])
def test_committed_with_outputs(name):
    """The committed notebooks carry the outputs of a full (not quick) run."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "quick=False" in text, "execute the notebook with full parameters before committing it"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
