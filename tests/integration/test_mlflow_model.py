"""The registered version is an MLflow model: `models:/NAME@champion` loads with mlflow.pyfunc and
answers a prompt (tiny random model + a real random LoRA adapter; a real sqlite MLflow)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import free_port, register_version, start_until_healthy, tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def mlflow_server(mlflow_server_root):
    """`mlflow server` on loopback serving artifacts (mlflow-artifacts:/), as on a cluster."""
    root, port = mlflow_server_root, free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = start_until_healthy([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                                "--artifacts-destination", str(root / "artifacts")],
                               f"http://127.0.0.1:{port}/health", root / "server.log", env)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(20)


@pytest.mark.parametrize(("backend", "bundle_limit_mb"), [("sqlite", 64), ("sqlite", 0), ("server", 64)],
                         ids=["base-bundled", "base-by-path", "server"])
def test_champion_loads_with_pyfunc_and_answers(tmp_path, tiny_model_dir, backend, bundle_limit_mb, request):
    import mlflow
    import pandas as pd

    from tuneloop.config import load_config
    from tuneloop.deploy.mlflow_model import build_model_dir
    from tuneloop.registry import Registry
    from tuneloop.tiny import build_random_adapter

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    if backend == "server":
        cfg.registry.tracking_uri = request.getfixturevalue("mlflow_server")
    reg = Registry(cfg)
    adapter = build_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    model_dir = build_model_dir(adapter, tiny_model_dir, tmp_path / "model", "tiny-llama", "Answer briefly.",
                                max_new_tokens=5, bundle_limit_mb=bundle_limit_mb)
    assert (model_dir / "MLmodel").exists() and (model_dir / "adapter_config.json").exists()
    version = register_version(reg, model_dir, "run-1")
    reg.set_alias("champion", version)

    mv = reg.model_version(version)
    parent = reg.pipeline_run("run-1")
    assert mv.run_id == parent.info.run_id, "the version's source run is the pipeline run, not the register stage"
    assert mv.source.startswith("models:/m-"), "the version is an MLflow 3 logged model"
    model_id = mv.source.removeprefix("models:/")
    logged = reg.client.get_logged_model(model_id)
    assert logged.source_run_id == parent.info.run_id and logged.status.name == "READY"
    assert [o.model_id for o in reg.client.get_run(parent.info.run_id).outputs.model_outputs] == [model_id]
    assert reg.adapter_uri(mv).startswith(logged.artifact_location)
    # the version's folder is still the adapter folder for the gateway, the evaluation and KServe
    got = reg.download_adapter(mv, tmp_path / "cache")
    assert json.loads((got / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text())

    if backend == "server":  # KServe's storage initializer fetches the same folder from the bucket behind MLflow
        from tuneloop.config import KServeConfig
        from tuneloop.deploy.kserve import _adapter_uri

        cfg.deploy.kserve = KServeConfig(base_model_uri="s3://models/base", artifact_store_uri="s3://mlflow")
        uri = _adapter_uri(cfg, version)
        assert uri.startswith("s3://mlflow/") and model_id in uri, uri
        served = request.getfixturevalue("mlflow_server_root") / "artifacts" / uri.removeprefix("s3://mlflow/")
        assert (served / "adapter_config.json").exists(), f"{served} is not an adapter folder"

    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    assert model.metadata.get_input_schema().input_names() == ["prompt"]
    assert model.metadata.get_params_schema() is not None
    answers = model.predict(pd.DataFrame({"prompt": ["Where is my parcel?", "Reset my password"]}),
                            params={"max_new_tokens": 3})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert isinstance(model.predict({"prompt": "hello"})[0], str)
    config = model.model_config
    assert config["system_prompt"] == "Answer briefly."
    if bundle_limit_mb:
        assert config["base_model_path"] is None, "a small base travels inside the model"
    else:
        assert config["base_model_path"] == str(tiny_model_dir.resolve()), "a large base is referenced by path"


def test_a_missing_base_model_says_how_to_point_at_it(tmp_path, tiny_model_dir):
    import shutil

    import mlflow

    from tuneloop.deploy.mlflow_model import build_model_dir
    from tuneloop.tiny import build_random_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    adapter = build_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=4)
    model_dir = build_model_dir(adapter, base, tmp_path / "model", "tiny-llama", None, bundle_limit_mb=0)
    shutil.rmtree(base)
    with pytest.raises(Exception, match="base_model_path"):
        mlflow.pyfunc.load_model(str(model_dir))
    model = mlflow.pyfunc.load_model(str(model_dir), model_config={"base_model_path": str(tiny_model_dir)})
    assert isinstance(model.predict({"prompt": "hi"}, params={"max_new_tokens": 2})[0], str)
