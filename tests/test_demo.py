"""`tritonprune demo --quick`: the whole pipeline on a few hundred digits, in a subprocess like a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from tritonprune.app import demo  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "tritonprune.app.cli", "demo", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def test_table_has_three_rows(quick_run):
    _, stdout, _ = quick_run
    for name in ("| dense ", "| group_norm + prune ", "| l2 + prune (no sparse training) "):
        assert name in stdout
    assert "reg. share of step" in stdout and "MACs/img" in stdout


def test_numbers_are_consistent(quick_run):
    _, _, res = quick_run
    dense, sparse, naive = res["rows"]
    assert sparse["params"] < dense["params"] and naive["params"] == sparse["params"]
    assert sparse["macs"] < dense["macs"]
    for r in res["rows"]:
        assert 0.0 <= r["acc"] <= 1.0 and r["latency_ms"] > 0
    for r in (sparse, naive):
        assert 0.0 <= r["acc_pruned"] <= 1.0
    assert dense["acc"] > 0.5  # it did learn (chance is 0.1)
    assert 0.0 < sparse["reg_share"] < 1.0 and sparse["reg_ms"] > 0
    # group norms were recorded for every group, before and after
    assert len(res["norms"]["init"]) == len(res["norms"]["sparse"]) == len(res["groups"]) == 9


def test_figure_and_files_written(quick_run):
    out, _, _ = quick_run
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "table.md").read_text().count("\n") == 5


def test_progress_falls_back_to_prints(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    bar = demo._Progress(10, "dense", enabled=True)
    assert bar.bar is None
    bar.update()
    bar.epoch(1, 2, 0.5, 0.75)
    bar.close()
    out = capsys.readouterr().out
    assert "dense" in out and "epoch 1/2" in out and "test acc 0.750" in out


def test_table_formats_ratios():
    rows = [
        dict(name="dense", acc=0.9, acc_pruned=None, params=1000, macs=2000, latency_ms=4.0, reg_share=None,
             reg_ms=None, step_ms=10.0),
        dict(name="x + prune", acc=0.8, acc_pruned=0.5, params=250, macs=500, latency_ms=2.0, reg_share=0.05,
             reg_ms=0.5, step_ms=10.0),
    ]
    text = demo.table({"rows": rows})
    assert "250 (0.25x)" in text and "2.00 ms (0.50x)" in text and "5.0% (0.50 / 10.0 ms)" in text
    assert "50.0%" in text and "80.0%" in text
