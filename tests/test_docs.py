"""The documentation site (mkdocs.yml, docs/) builds with warnings as errors, API reference included,
and the command-line page documents every option the parser has. CI runs `make test` only, so the
build is checked here; the `dev` extra installs MkDocs (the `docs` extra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    core = (tmp_path / "site" / "reference" / "core" / "index.html").read_text()
    for text in ("Choose channels to remove", "RegularizedOptimizer", "from_pretrained"):
        assert text in core, text  # the reference is generated from the docstrings


def test_cli_page_names_every_option():
    from tritonprune.app.cli import build_parser

    page = (ROOT / "docs" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {opt}" for name, p in sub.choices.items() for a in p._actions
               for opt in a.option_strings if opt.startswith("--") and opt != "--help" and f"`{opt}" not in page]
    assert not missing, f"docs/cli.md does not document: {missing}"


def test_coverage_tables_match_the_measured_results():
    # docs/huggingface.md's table and the README's summary are rendered from bench/results/hf_heads.json
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_table.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, "stale coverage tables: run `python bench/hf_table.py` after bench/hf_heads.py"
