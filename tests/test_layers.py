"""The layering rule (pyproject.toml [tool.importlinter]) holds, and breaking it fails the linter (issue 19)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")
needs_linter = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))   # this copy of the package first on the path
    return subprocess.run([str(LINT), "--no-cache"], cwd=str(root), capture_output=True, text=True, env=env, timeout=300)


@needs_linter
def test_contracts_hold_and_a_break_is_caught(tmp_path):
    ok = _lint(ROOT)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "BROKEN" not in ok.stdout
    # the same tree with metrics/ importing from lib/: the first contract breaks and the linter fails
    shutil.copytree(ROOT / "monailabel_dr", tmp_path / "monailabel_dr",
                    ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    victim = tmp_path / "monailabel_dr" / "metrics" / "lesions.py"
    victim.write_text(victim.read_text() + "\nfrom monailabel_dr.lib.errors import BadInput  # noqa: E402,F401\n")
    bad = _lint(tmp_path)
    assert bad.returncode != 0
    assert "monailabel_dr.metrics is not allowed to import monailabel_dr.lib" in bad.stdout, bad.stdout[-3000:]
