"""The registry code path on every backend: the embedded sqlite store, and `mlflow server`
started on loopback on sqlite and on a real Postgres (as the chart runs it on a cluster)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, start_until_healthy, tiny_config

pytestmark = pytest.mark.integration


def _start_server(root: Path, backend_store_uri: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    url = f"http://127.0.0.1:{port}"
    proc = start_until_healthy([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1", "--backend-store-uri", backend_store_uri,
                                "--artifacts-destination", str(root / "artifacts")],
                               f"{url}/health", root / "server.log", env)
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    yield from _start_server(root, f"sqlite:///{root / 'server.db'}")


@pytest.fixture(scope="module")
def mlflow_server_postgres(tmp_path_factory, postgres):
    """The chart's production set-up: the tracking server on a Postgres backend store."""
    yield from _start_server(tmp_path_factory.mktemp("mlflow-server-pg"), postgres("mlflow"))


def _adapter(tmp: Path) -> Path:
    d = tmp / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return d


@pytest.mark.parametrize("backend", ["sqlite", "server", "server-postgres"])
def test_registry_lifecycle(backend, tmp_path, tiny_model_dir, request):
    from tuneloop.config import load_config
    from tuneloop.registry import TAG_PIPELINE_RUN, Registry

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    if backend != "sqlite":
        cfg.registry.tracking_uri = request.getfixturevalue(
            {"server": "mlflow_server", "server-postgres": "mlflow_server_postgres"}[backend])
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("r1", "kfp-123", {"train.sft.max_steps": 4})
    assert reg.start_pipeline_run("r1", "kfp-123", {}) == parent, "a retried prerequisites task reuses the run"
    with reg.stage_run(parent, "ingest") as rid:
        data = tmp_path / "sft.jsonl"
        data.write_text('{"id": "a", "prompt": "p", "completion": "c"}\n')
        reg.log_dataset(rid, data, "tiny-sft", "f" * 64, "training")
        reg.log_metrics(rid, {"accepted": 1})
    run = reg.client.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert run.inputs.dataset_inputs[0].dataset.name == "tiny-sft"
    with pytest.raises(RuntimeError), reg.stage_run(parent, "sft"):
        raise RuntimeError("boom")
    failed = reg.client.search_runs([reg.experiment_id()], "tags.`tuneloop.stage` = 'sft'")[0]
    assert failed.info.status == "FAILED"

    with reg.stage_run(parent, "register") as rid:
        tags = {TAG_PIPELINE_RUN: parent, "tuneloop.data_hash": "f" * 64}
        mv = reg.register(rid, _adapter(tmp_path), tags)
        again = reg.register(rid, _adapter(tmp_path / "retry") if (tmp_path / "retry").mkdir() is None else None,
                             tags)
    assert again.version == mv.version, "retried registration must not create a duplicate version"
    assert len(reg.client.search_model_versions(f"name = '{cfg.registry.model_name}'")) == 1
    assert reg.aliases() == {"challenger": str(mv.version)}
    reg.set_alias("champion", mv.version)
    reg.delete_alias("challenger")
    assert reg.aliases() == {"champion": str(mv.version)}
    got = reg.download_adapter(reg.alias_version("champion"), tmp_path / "cache")
    assert (got / "adapter_config.json").read_text() == '{"r": 4}'
    reg.finish_pipeline_run(parent, "promoted v1")
    assert reg.client.get_run(parent).info.status == "FINISHED"
