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


def _command_paths() -> list[tuple[str, ...]]:
    import typer.main

    from tuneloop.cli import app

    root = typer.main.get_command(app)
    paths = []
    for name, cmd in root.commands.items():
        paths.append((name,))
        paths += [(name, sub) for sub in getattr(cmd, "commands", {})]
    return paths


def test_help_shows_no_python_types_and_capital_arguments():
    import re

    from typer.testing import CliRunner

    from tuneloop.cli import app

    paths = _command_paths()
    assert ("validate",) in paths and ("review", "export") in paths and len(paths) >= 15
    for path in paths:
        res = CliRunner().invoke(app, [*path, "-h"])  # -h on every subcommand
        assert res.exit_code == 0 and "Usage:" in res.output, (path, res.output)
        found = re.findall(r"<(?:bool|str|int|float|path|list\[[^\]]*\])>", res.output)
        assert not found, (path, found)
        usage = next(line for line in res.output.splitlines() if "Usage:" in line)
        assert "{" not in usage and not re.search(r"\[[a-z_]+\]", usage), (path, usage)  # [CONFIG], PATHS...
    assert "[CONFIG]" in CliRunner().invoke(app, ["validate", "-h"]).output
    assert "PATHS..." in CliRunner().invoke(app, ["ingest", "-h"]).output


@pytest.mark.parametrize("command", ["submit", "schedule", "upload-pipeline"])
def test_required_options_are_marked(command: str):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    res = CliRunner().invoke(app, [command, "-h"])
    host = next(line for line in res.output.splitlines() if "--host" in line)
    assert "*" in host and "[required]" in res.output, res.output
    res = CliRunner().invoke(app, [command])
    assert res.exit_code == 2 and "Missing option '--host'" in res.output


def test_usage_errors_are_plain_lines_when_piped():
    r = _cli("ingest", "some.jsonl")  # no --out
    assert r.returncode == 2 and "╭" not in r.stderr and "Traceback" not in r.stderr
    assert "Error: Missing option '--out'." in r.stderr.splitlines()
