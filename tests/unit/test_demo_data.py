"""The shipped demo data passes its own checker (counts, balance, no overlap between files)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
CHECKER = Path(__file__).resolve().parents[2] / "src" / "tuneloop" / "demo" / "data" / "check_demo_data.py"


def test_demo_data_checker_passes():
    r = subprocess.run([sys.executable, str(CHECKER)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: all checks passed" in r.stdout
