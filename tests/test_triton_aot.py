"""Every kernel specialization the Triton backend launches on the zoo models (all regularizers, coupled
and decoupled, fp32 and bf16) compiles for sm_80 and sm_90 without a GPU, with no register spills, and
the matrix kernels' hot loops stay within their instruction budgets (a static model, not a timing).

A kernel that only the interpreter accepts fails here. Compilation runs in a subprocess: this process
imported triton with TRITON_INTERPRET=1 (tests/conftest.py), which compiled code cannot use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoo import ZOO

from tritonprune.graph import find_groups

ti = pytest.importorskip("tritonprune.kernels.triton_impl")
if not ti.HAS_TRITON:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

from tritonprune.kernels import static_report as sr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _have_tools() -> bool:
    try:
        sr._tool("cuobjdump")
        sr._tool("ptxas")
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def zoo_specs():
    specs: dict = {}
    for name in sorted(ZOO):
        torch.manual_seed(0)
        model, inputs = ZOO[name]()
        groups = find_groups(model, inputs)
        for s in sr.model_launch_specs(model, groups):
            specs.setdefault(s, None)
        if name == "resnext":  # the generic per-slot kernels too (parameters that fit no matrix form)
            ti.MATRIX_PATH = False
            try:
                for s in sr.model_launch_specs(model, groups, dtypes=(torch.float32,),
                                               regularizers=(("group_norm", False), ("bn_scale", True))):
                    specs.setdefault(s, None)
            finally:
                ti.MATRIX_PATH = True
    return list(specs)


def test_zoo_specs_cover_every_kernel_kind(zoo_specs):
    kernels = {s.kernel for s in zoo_specs}
    assert {"mat_sums", "colsum", "reduce", "gamma", "lasso", "gather", "mat_update", "slot_sums",
            "slot_update"} <= kernels
    # both dtypes, both update forms and both targets reach the matrix update
    upd = {(dict(s.constexprs)["DTYPE"], dict(s.constexprs)["SIGN"], dict(s.constexprs)["TO_PARAM"])
           for s in zoo_specs if s.kernel == "mat_update"}
    assert upd == {(d, sg, tp) for d in (0, 2) for sg in (False, True) for tp in (False, True)}


@pytest.mark.slow
@pytest.mark.skipif(not _have_tools(), reason="this triton wheel ships no ptxas/cuobjdump")
def test_zoo_specializations_compile_for_sm80_and_sm90(zoo_specs, tmp_path):
    spec_file = tmp_path / "specs.json"
    spec_file.write_text(json.dumps([sr.spec_to_json(s) for s in zoo_specs]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh compile, not another run's cache
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tritonprune.kernels.static_report", "--arch", "sm_80,sm_90",
         "--out", str(tmp_path / "out"), "--specs", str(spec_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(rows) == 2 * len(zoo_specs)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert (tmp_path / "out" / r["cubin"]).stat().st_size > 0
        assert r["spills"] == 0, r
        if r["kind"] in ("sums", "update"):
            assert r["hot_loop_vector_loads"] > 0, f"no 16-byte loads in the hot loop: {r}"
    assert proc.returncode == 0, "\n" + proc.stdout
