"""Lint the Python sources and the notebook with ruff (part of the README's test command)."""

import shutil
import subprocess
import sys

from conftest import ROOT


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(ROOT / ".venv" / "bin" / "ruff")
    cmd = [ruff] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    out = subprocess.run([*cmd, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
