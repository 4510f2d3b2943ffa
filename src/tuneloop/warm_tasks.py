"""kfp.local tasks forked from a warm interpreter instead of started cold.

kfp.local's SubprocessRunner starts every task as a fresh interpreter (`python3 -m kfp.dsl.executor_main ...`)
that imports kfp, MLflow, tuneloop and its stage's libraries (transformers, peft, Great Expectations,
Evidently) again before the stage does anything: 3-8 s per task on the 2-core machines here, about as much as
the stage's own work for most tasks (`python bench/orchestration_overhead.py` prints it per task). A local run
(`tuneloop run`, orchestrate.run_local) therefore starts one server process that imports all of that once, and
kfp.local's `python3` is pointed at a small client (warm_task_client.py) that asks the server to fork a child
for the task. The child is the task: the client hands it its stdin/stdout/stderr (kfp.local reads them as
before), its working directory, environment and arguments, and exits with the child's exit status. Everything
else is what kfp.local does: the same command, executor input and outputs, the same logs.

A fork is only as good as what it inherits, so the server
- imports modules and nothing else: no connection, file or model is open when it forks, and no Python thread
  runs (checked before every fork; it refuses to fork otherwise). The native helper threads that imports start
  (OpenBLAS's pool, the OpenMP pool a torch op at transformers' import starts, jemalloc's background thread) are
  fork-aware: each library re-creates its pool in the child, as in any forked DataLoader worker;
- forks only when the task's environment equals its own (apart from NOT_COMPARED: the shell's PWD, OLDPWD, SHLVL
  and _, and the terminal size in COLUMNS and LINES):
  libraries read variables such as HF_HUB_OFFLINE when they are imported, so a task with other values (e.g.
  `kubernetes.env` set per task) gets a fresh interpreter as before, from the client, with a log line saying why;
- gives every child fresh seeds for Python's, NumPy's and torch's default generators, default signal handlers,
  the task's working directory first on sys.path, and runs `kfp.dsl.executor_main` as __main__ with exit
  handlers run at the end, as an interpreter would.
When the server cannot be reached, the client starts the task the ordinary way, so a run never depends on it.
The socket lives in a folder only the run's user can enter (mkdtemp, mode 0700): whoever can connect could run
code as that user, which they can do anyway.
`tuneloop run --cold-tasks` (or TUNELOOP_COLD_TASKS=1) switches it off.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneloop.warm_task_client import SIZE, STATUS, read_exactly

log = logging.getLogger("tuneloop.warm_tasks")

CLIENT = Path(__file__).with_name("warm_task_client.py")
ENV_OFF = "TUNELOOP_COLD_TASKS"
# not compared (the task gets its own values): set by the task's `sh -ec`, or a terminal size that a library of
# the run's process sets after the server started (rich and shutil read it when they print, not at import)
NOT_COMPARED = ("PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES")
# what the stages import (tuneloop.stages and the modules its functions import lazily, with the libraries those
# import lazily in turn, as listed by sys.modules in a task): imported once by the server, never again per task
PRELOAD = (
    "kfp.dsl.executor_main", "tuneloop.config", "tuneloop.env", "tuneloop.progress", "tuneloop.stages",
    "tuneloop.registry", "tuneloop.models",
    "tuneloop.data.ingest", "tuneloop.data.pii", "tuneloop.data.dedup", "tuneloop.data.feedback",
    "tuneloop.data.validate", "tuneloop.data.drift", "tuneloop.data.preflight", "tuneloop.data.replay",
    "tuneloop.data.formatting", "tuneloop.data.safety_pairs",
    "tuneloop.evaluate.run", "tuneloop.evaluate.scoring", "tuneloop.evaluate.safety", "tuneloop.evaluate.label_probs",
    "tuneloop.evaluate.diagnosis", "tuneloop.evaluate.calibration", "tuneloop.evaluate.model_card",
    "tuneloop.evaluate.sequential", "tuneloop.train.launch", "tuneloop.train.local", "tuneloop.train.memory",
    "tuneloop.train.merge", "tuneloop.deploy.canary", "tuneloop.deploy.mlflow_model", "tuneloop.feedback.store",
    "tuneloop.feedback.canary_looks", "tuneloop.monitor.labels", "tuneloop.repair",
    "mlflow", "mlflow.tracking", "mlflow.models", "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store", "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.store.model_registry.sqlalchemy_workspace_store", "mlflow.tracing.export", "mlflow.tracing.processor.otel",
    "opentelemetry.sdk.metrics", "alembic.command", "alembic.config",
    "torch", "transformers", "transformers.pipelines", "transformers.models.llama.modeling_llama", "peft",
    "great_expectations", "evidently", "evidently.presets", "evidently.metrics", "presidio_analyzer",
    "presidio_anonymizer", "spacy", "pandas", "sklearn.metrics", "rouge_score.rouge_scorer", "savvi",
    "py_markdown_table", "httpx", "httpcore", "datasketch", "xxhash", "spacy.lang.en",
    "mlflow.tracing.processor.base_mlflow", "mlflow.tracing.export.utils", "peft.utils.transformers_weight_conversion",
    "yaml",
)


def exit_code(status: int) -> int:
    """A waitpid status as the exit code a shell reports: the code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def env_difference(task_env: dict[str, str], own_env: dict[str, str]) -> list[str]:
    """The variables in which a task's environment differs from the server's (NOT_COMPARED left out)."""
    keys = (set(task_env) | set(own_env)) - set(NOT_COMPARED)
    return sorted(k for k in keys if task_env.get(k) != own_env.get(k))


# the server ---------------------------------------------------------------------------------------------------
def _reseed() -> None:
    """Fresh seeds in a forked child: without them every task would draw the same 'random' numbers."""
    import random
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _run_task(argv: list[str], cwd: str, env: dict[str, str]) -> int:
    """In the forked child: become `python -m kfp.dsl.executor_main ARGS` started in CWD with ENV; its exit code."""
    import atexit
    import runpy
    import traceback

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[0] = os.getcwd()
    _reseed()
    code = 0
    try:
        if len(argv) < 2 or argv[0] != "-m":
            raise SystemExit(f"warm task server: can only run `python -m MODULE ...`, got {argv[:2]}")
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an interpreter prints the traceback and exits 1; so does the task
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    return code


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request: a length-prefixed JSON header {argv, cwd, env} and the client's stdin, stdout, stderr."""
    head, fds, _, _ = socket.recv_fds(conn, SIZE.size, 3)
    body = read_exactly(conn, SIZE.unpack(head)[0])
    if body is None:
        raise ConnectionError("client went away while sending its request")
    return json.loads(body), list(fds)


def why_not_fork(request: dict[str, Any], fds: list[int], start_env: dict[str, str]) -> str:
    """Why this request is not forked (the client then starts the task cold), or '' when it may be."""
    if len(fds) != 3:
        return f"expected 3 file descriptors, got {len(fds)}"
    if diff := env_difference(request.get("env", {}), start_env):
        return "its environment differs from the warm server's in " + ", ".join(diff[:5]) + (
            " ..." if len(diff) > 5 else "")
    if (n := threading.active_count()) != 1:
        return f"the warm server runs {n} Python threads; forking it would be unsafe"
    return ""


def serve(path: str, preload: list[str]) -> None:
    """Import PRELOAD, then fork a child per request on the Unix socket PATH until SIGTERM or SIGINT."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)  # bound before the imports: tasks that come early wait in the backlog
    started, start_env = time.perf_counter(), dict(os.environ)
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a module that cannot be imported is imported by the task instead
            print(f"warm task server: not preloaded {name}: {type(e).__name__}: {e}", file=sys.stderr)
    # what the imports set themselves (e.g. DO_NOT_TRACK, KMP_INIT_AT_FORK): a fresh interpreter's imports
    # would set the same in the task, so the child gets them on top of the task's environment
    by_imports = {k: v for k, v in os.environ.items() if start_env.get(k) != v}
    print(f"warm task server: {len(sys.modules)} modules imported in {time.perf_counter() - started:.1f}s; "
          "tasks are forked from it", file=sys.stderr, flush=True)
    stop = False

    def on_stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    children: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while not stop:
        for _ in sel.select(timeout=0.05):
            conn, _ = listener.accept()
            conn.settimeout(10)  # a client that connects and sends nothing must not hold up the others
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError, struct.error) as e:
                print(f"warm task server: bad request: {e}", file=sys.stderr)
                conn.close()
                continue
            conn.settimeout(None)
            if refuse := why_not_fork(request, fds, start_env):  # the client starts the task the ordinary way
                body = refuse.encode()
                conn.sendall(STATUS.pack(-1) + SIZE.pack(len(body)) + body)
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the task
                code = 1
                try:
                    sel.close()
                    listener.close()
                    for other in (conn, *children.values()):  # a sibling's client must see its own task end
                        other.close()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    code = _run_task(request["argv"], request["cwd"], {**request["env"], **by_imports})
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            conn.sendall(STATUS.pack(pid))
            children[pid] = conn
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = children.pop(pid)
                with contextlib.suppress(OSError):
                    conn.sendall(STATUS.pack(exit_code(status)))
                conn.close()
    for pid, conn in children.items():  # the run is over (or interrupted): its tasks go with it
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        conn.close()
    listener.close()


# the run's side ----------------------------------------------------------------------------------------------
class WarmTaskServer:
    """The server process of one local run, and the `python3` that kfp.local is to use while it runs."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self._dir = tempfile.mkdtemp(prefix="tuneloop-warm-")
        self.socket = os.path.join(self._dir, "tasks.sock")
        self.env = {**os.environ, "_KFP_RUNTIME": "true"}  # what the tasks' `sh` sets before `python3`
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneloop.warm_tasks", self.socket, *preload],
                                     env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # bound within a second; tasks that connect before it is warm wait

    def python(self) -> str:
        """What replaces `python3` in the tasks' commands: the client, told where the server listens."""
        return " ".join(shlex.quote(p) for p in (sys.executable, "-S", "-E", str(CLIENT), self.socket))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.socket)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


@contextlib.contextmanager
def warm_kfp_local_tasks(enabled: bool = True) -> Iterator[WarmTaskServer | None]:
    """While inside, kfp.local's SubprocessRunner (use_venv=False) starts its tasks through a WarmTaskServer.
    Off when `enabled` is false or TUNELOOP_COLD_TASKS is set (yields None)."""
    if not enabled or os.environ.get(ENV_OFF, "").lower() in ("1", "true", "yes"):
        yield None
        return
    from kfp.local import subprocess_task_handler as handler

    server = WarmTaskServer()
    original = handler.environment

    @contextlib.contextmanager
    def environment(use_venv: bool, *args: Any, **kwargs: Any) -> Iterator[str]:
        if use_venv:  # kfp's own venv mode installs packages per task: nothing to keep warm
            with original(use_venv, *args, **kwargs) as python:
                yield python
            return
        yield server.python()

    handler.environment = environment
    try:
        yield server
    finally:
        handler.environment = original
        server.stop()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
