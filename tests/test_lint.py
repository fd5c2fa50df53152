"""Lint the Python sources and the notebook with ruff (part of the README's test command)."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
