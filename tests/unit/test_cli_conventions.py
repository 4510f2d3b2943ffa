"""CLI conventions a newcomer expects: -h, --version, tables not cut short when the output is a log."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tuneloop import __version__

pytestmark = pytest.mark.unit


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], capture_output=True, text=True, timeout=120)


def test_version_and_short_help():
    assert _cli("--version").stdout.strip() == f"tuneloop {__version__}"
    for args in (("-h",), ("validate", "-h"), ("ingest", "-h")):
        r = _cli(*args)
        assert r.returncode == 0 and "Usage:" in r.stdout, (args, r.stderr)


def test_a_piped_summary_is_not_truncated():
    from tuneloop.cli.summary import console

    assert console.width >= 200  # not a terminal here: no wrapping at 80 columns, no "ticket_rout…"
