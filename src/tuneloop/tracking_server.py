"""The embedded MLflow store served on loopback for the tasks of one local pipeline run.

Under kfp.local every task is a fresh interpreter. Opening the embedded sqlite store costs
each of them SQLAlchemy, Alembic and a schema check (~0.8 s on this machine's 2 cores) before
the stage does anything; the REST client costs ~0.1 s. So `run_local` starts `mlflow server`
on the same sqlite file for the run's duration and its tasks (and their training ranks) talk
to it over HTTP, as they do to the tracking server on a cluster.

How the tasks find it: `RunConfig.tracking_uri` reads `TUNELOOP_SERVED_STORE`
("<sqlite uri> <http uri>") and answers the http URI only for a config whose embedded store
is exactly that sqlite file, so a config with another state_dir or an explicit
`registry.tracking_uri` is never redirected. Artifacts keep their location in the state
folder (experiments name it explicitly), so nothing a run writes depends on the server:
after the run the same sqlite file is read directly. If the server does not come up, the
run goes on against the sqlite file, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tuneloop.config import RunConfig
from tuneloop.config.run import SERVED_STORE_ENV

log = logging.getLogger("tuneloop.tracking_server")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310 - loopback URL built here
            return r.status == 200
    except OSError:
        return False


class ServedStore:
    """`mlflow server` over one embedded store: start() returns at once, ready() waits for it."""

    def __init__(self, cfg: RunConfig) -> None:
        self.store = cfg.tracking_uri
        self.log_path: Path = cfg.state_path / "mlflow-server.log"
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen | None = None
        self.artifact_root = cfg.artifact_location or ""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
               "PYTHONWARNINGS": "ignore"}
        env.pop(SERVED_STORE_ENV, None)
        port = self.url.rsplit(":", 1)[1]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
                 "--backend-store-uri", self.store, "--default-artifact-root", self.artifact_root,
                 "--no-serve-artifacts"],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def ready(self, timeout_s: float = 120) -> bool:
        """True once /health answers; False (with a warning) if the server died or timed out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc is not None:
            if self.proc.poll() is not None:
                break
            if _healthy(self.url):
                return True
            time.sleep(0.2)
        log.warning("the run's MLflow server did not come up (see %s); its tasks open %s directly",
                    self.log_path, self.store)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serves(cfg: RunConfig) -> bool:
    """Whether a local run serves this config's store: only the embedded sqlite default, unless
    TUNELOOP_SERVE_STORE=0 (the tasks then open the sqlite file themselves)."""
    if os.environ.get("TUNELOOP_SERVE_STORE", "1") == "0":
        return False
    return not cfg.registry.tracking_uri and cfg.tracking_uri.startswith("sqlite:")


@contextlib.contextmanager
def tasks_use(server: ServedStore | None) -> Iterator[None]:
    """Point this process' children at `server` (when it came up) for the block's duration."""
    if server is None or not server.ready():
        yield
        return
    old = os.environ.get(SERVED_STORE_ENV)
    os.environ[SERVED_STORE_ENV] = f"{server.store} {server.url}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SERVED_STORE_ENV, None)
        else:
            os.environ[SERVED_STORE_ENV] = old
