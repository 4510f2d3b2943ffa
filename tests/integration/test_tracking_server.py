"""A local pipeline run serves its embedded MLflow store over loopback to its tasks
(tuneloop.tracking_server): only the config whose store it is gets redirected, what is logged
through the server is in the sqlite file afterwards, and artifacts stay in the state folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.config.run import SERVED_STORE_ENV

pytestmark = pytest.mark.integration


def test_only_the_served_store_is_redirected(tmp_path, tiny_model_dir, monkeypatch):
    served = load_config(tiny_config(tmp_path / "a", tiny_model_dir))
    other = load_config(tiny_config(tmp_path / "b", tiny_model_dir))
    store = served.tracking_uri
    monkeypatch.setenv(SERVED_STORE_ENV, f"{store} http://127.0.0.1:1")
    assert served.tracking_uri == "http://127.0.0.1:1"
    assert other.tracking_uri.startswith("sqlite:") and other.tracking_uri != store
    served.registry.tracking_uri = "http://mlflow.example:5000"  # an explicit server is never redirected
    assert served.tracking_uri == "http://mlflow.example:5000"
    monkeypatch.delenv(SERVED_STORE_ENV)
    assert other.tracking_uri.startswith("sqlite:")


def test_tasks_log_through_the_server_into_the_state_folder(tmp_path, tiny_model_dir):
    from tuneloop.registry import Registry
    from tuneloop.tracking_server import ServedStore, serves, tasks_use

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    assert serves(cfg)
    server = ServedStore(cfg)
    server.start()
    try:
        with tasks_use(server):
            assert os.environ[SERVED_STORE_ENV].endswith(server.url)
            # a child process (as a kfp.local task is) logs a run with an artifact through the server
            code = ("import sys; from tuneloop.config import load_config; from tuneloop.registry import Registry\n"
                    "reg = Registry(load_config(sys.argv[1])); assert reg.uri.startswith('http://'), reg.uri\n"
                    "rid = reg.start_pipeline_run('served', 'kfp-served', {'k': 1})\n"
                    "reg.client.log_text(rid, 'hello', 'note.txt'); reg.client.set_terminated(rid); print(rid)")
            r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "config.yaml")], capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            rid = r.stdout.strip().splitlines()[-1]
        assert SERVED_STORE_ENV not in os.environ
    finally:
        server.stop()
    assert server.proc.poll() is not None
    reg = Registry(cfg)  # the sqlite file directly, after the server is gone
    assert reg.uri.startswith("sqlite:")
    run = reg.client.get_run(rid)
    assert run.data.params["k"] == "1"
    art = Path(run.info.artifact_uri.removeprefix("file://"))
    assert art.is_relative_to(cfg.state_path.resolve()) and (art / "note.txt").read_text() == "hello"


def test_a_server_that_cannot_start_leaves_the_tasks_on_sqlite(tmp_path, tiny_model_dir):
    from tuneloop.tracking_server import ServedStore, tasks_use

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    server = ServedStore(cfg)
    server.store = "nosuchscheme://x"  # mlflow server refuses the backend and exits
    server.start()
    with tasks_use(server):
        assert SERVED_STORE_ENV not in os.environ
        assert cfg.tracking_uri.startswith("sqlite:")
