"""kfp.local tasks forked from a warm interpreter (tuneloop.warm_tasks): a real server process and the real client,
started as kfp.local starts a task's `python3` (here with a small module instead of kfp's executor)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tuneloop.warm_tasks import CLIENT, WarmTaskServer, env_difference, exit_code

pytestmark = pytest.mark.integration

TASK = """
import os, random, sys
print("ppid", os.getppid(), flush=True)
print("argv", sys.argv[1:], "cwd", os.getcwd(), "main", __name__, flush=True)
print("rand", random.random(), "stdin", sys.stdin.readline().strip(), flush=True)
print("to stderr", file=sys.stderr, flush=True)
what = sys.argv[1]
if what == "kill":
    os.kill(os.getpid(), 9)
if what == "sleep":
    print("sleeping", flush=True)
    import time
    time.sleep(60)
if what == "raise":
    raise ValueError("the task failed")
sys.exit(int(what))
"""


@pytest.fixture()
def server(tmp_path):
    srv = WarmTaskServer(preload=("json", "random"))
    yield srv
    srv.stop()


def _task(server: WarmTaskServer, cwd, arg: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    (cwd / "task_mod.py").write_text(TASK)
    env = {**server.env, **(env or {})}  # a task of the run that started the server has its environment
    cmd = [sys.executable, "-S", "-E", str(CLIENT), server.socket, "-m", "task_mod", arg]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _run(server, cwd, arg, env=None):  # noqa: ANN001, ANN202
    p = _task(server, cwd, arg, env)
    out, _ = p.communicate("hello\n", timeout=120)
    return p.returncode, out


def _field(out: str, name: str) -> str:
    return next(line.split()[1] for line in out.splitlines() if line.startswith(name + " "))


def test_a_task_is_forked_from_the_server_and_behaves_like_an_interpreter(server, tmp_path):
    rc, out = _run(server, tmp_path, "3")
    assert rc == 3, out
    assert int(_field(out, "ppid")) == server.proc.pid, out  # a child of the warm server
    assert f"argv ['3'] cwd {tmp_path} main __main__" in out
    assert "stdin hello" in out and "to stderr" in out
    rc2, out2 = _run(server, tmp_path, "0")
    assert rc2 == 0 and _field(out2, "rand") != _field(out, "rand"), "every child gets fresh seeds"
    rc3, out3 = _run(server, tmp_path, "raise")
    assert rc3 == 1 and "ValueError: the task failed" in out3 and "Traceback" in out3


def test_a_task_killed_by_a_signal_fails_and_sigterm_reaches_the_task(server, tmp_path):
    rc, out = _run(server, tmp_path, "kill")
    assert rc == 128 + 9, out
    p = _task(server, tmp_path, "sleep")
    p.stdin.write("x\n")
    p.stdin.flush()
    while "sleeping" not in (p.stdout.readline() or "sleeping"):
        pass
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM


def test_another_environment_or_no_server_starts_the_task_cold(server, tmp_path):
    rc, out = _run(server, tmp_path, "4", env={"HF_HUB_OFFLINE": "0", "SOME_TASK_SETTING": "x"})
    assert rc == 4, out
    assert "starts in a fresh interpreter: its environment differs from the warm server's in HF_HUB_OFFLINE, " \
           "SOME_TASK_SETTING" in out
    assert int(_field(out, "ppid")) != server.proc.pid
    server.stop()
    started = time.monotonic()
    rc, out = _run(server, tmp_path, "5")
    assert rc == 5 and "the warm task server is not reachable" in out, out
    assert time.monotonic() - started < 60


@pytest.mark.unit
def test_exit_codes_and_environment_differences():
    assert exit_code(0) == 0 and exit_code(3 << 8) == 3 and exit_code(9) == 137
    assert env_difference({"A": "1", "PWD": "/x", "SHLVL": "2", "COLUMNS": "80"}, {"A": "1", "PWD": "/y"}) == []
    assert env_difference({"A": "1", "B": "2"}, {"A": "0", "C": "3"}) == ["A", "B", "C"]
