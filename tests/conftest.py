"""Shared fixtures: a tiny random Llama with a real BPE tokenizer (tuneloop.tiny), tiny run configs.

Nothing is downloaded: the tokenizer is trained on the demo data's text, the model is a
2-layer LlamaConfig with random weights, and both are saved with save_pretrained.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tuneloop.tiny import free_port  # noqa: F401 - used by tests via conftest
from tuneloop.tiny import tiny_run_config as tiny_config  # noqa: F401 - used by tests via conftest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# DeepSpeed's CPU op is compiled on first use (40 s to 2 min): once per machine, not once per test state dir
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tuneloop-torch-extensions"))


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    """Unmarked tests are unit tests; gpu tests skip without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("integration", "gpu", "unit")):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuneloop.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSON lines; bytes and str rows are written as they are (for broken-input cases)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
            f.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def start_until_healthy(argv: list[str], health_url: str, log: Path, env: dict[str, str] | None = None,
                        timeout_s: float = 120) -> subprocess.Popen:
    """Start a server process (output to `log`) and wait until `health_url` answers 200; fails the
    test with the log's tail if it exits or does not answer in time."""
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{' '.join(argv[:3])} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"{' '.join(argv[:3])} did not answer {health_url} in {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) of a nested dict/list, the root included as path ""."""
    out = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += walk(v, f"{path}[{i}]")
    return out


def register_version(reg: Any, adapter: Path, run_name: str) -> str:
    """Register an adapter folder as a new model version under a fresh pipeline run (as the
    register stage does); returns the version."""
    from tuneloop.registry import TAG_PIPELINE_RUN

    parent = reg.start_pipeline_run(run_name, run_name, {})
    with reg.stage_run(parent, "register") as rid:
        return str(reg.register(rid, adapter, {TAG_PIPELINE_RUN: parent}).version)


def _pg_program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # Debian keeps them off PATH
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator[Callable[[str], str]]:
    """A real PostgreSQL server on loopback (initdb + pg_ctl in a temp dir, trust auth on
    127.0.0.1 only), as the chart's feedback service and MLflow server use on a cluster. Yields
    database(name) -> the SQLAlchemy URL of a new, empty database. Skips, saying why, where
    PostgreSQL is not installed."""
    initdb, pg_ctl = _pg_program("initdb"), _pg_program("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (initdb/pg_ctl not found); apt-get install postgresql")
    run_as: dict[str, int] = {}
    if os.geteuid() == 0:  # initdb refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid}
    root = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))  # not under pytest's 0700 root-owned tmp
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    data, logfile, port = root / "data", root / "server.log", free_port()
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(root)}

    def pg(*args: str | Path) -> None:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=root, **run_as)
        if done.returncode != 0:
            log = logfile.read_text() if logfile.exists() else ""
            pytest.fail(f"{' '.join(map(str, args[:2]))} failed: {done.stderr[-2000:]}{log[-2000:]}")

    pg(initdb, "-D", data, "-U", "tuneloop", "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync")
    pg(pg_ctl, "-D", data, "-l", logfile, "-w", "-t", "60", "-o",
       f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def database(name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="tuneloop", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://tuneloop@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, env=env,
                       cwd=root, **run_as)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3-compatible server as its own process on loopback (no in-process patching of boto)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/moto-api/", timeout=2)
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(20)
