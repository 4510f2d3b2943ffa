"""Cluster settings from the run config's `platform` section are compiled into the pipeline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_config

from tuneloop.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def _platform_spec(path) -> dict:  # noqa: ANN001
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _containers(path) -> dict:  # noqa: ANN001
    return yaml.safe_load_all(path.read_text()).__next__()["deploymentSpec"]["executors"]


def test_compiled_pipeline_places_gpu_and_cpu_tasks(tmp_path, tiny_model_dir):
    # cluster-shaped: everything the tasks read lies on the state volume, mounted at state_dir
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    cfg = tiny_config(tmp_path, tmp_path / "models" / "base", state_dir=str(tmp_path), kubernetes={
        "state_pvc": "tl-state", "secrets": [{"name": "MLFLOW_TRACKING_PASSWORD", "secret": "mlflow-auth", "key": "password"}]},
        platform={"gpu_tasks": {"cpu": "8", "memory": "64Gi", "accelerator_type": "nvidia.com/gpu", "accelerators": 2,
                      "node_selector": {"gpu": "h100"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}})
    out = tmp_path / "p.yaml"
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "compile", "--config", str(cfg), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    containers, k8s = _containers(out), _platform_spec(out)
    for gpu_task in ("exec-sft", "exec-dpo", "exec-evaluate"):
        res = containers[gpu_task]["container"]["resources"]
        assert res["accelerator"]["resourceCount"] == "2" and res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert k8s[gpu_task]["nodeSelector"]["labels"] == {"gpu": "h100"}
        assert k8s[gpu_task]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "accelerator" not in containers["exec-ingest"]["container"]["resources"]
    assert "tolerations" not in k8s["exec-ingest"]
    for name, spec in k8s.items():
        assert spec["pvcMount"][0]["constant"] == "tl-state" and spec["pvcMount"][0]["mountPath"] == str(tmp_path)
        assert spec["secretAsEnv"][0]["secretName"] == "mlflow-auth"
        assert spec["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "MLFLOW_TRACKING_PASSWORD", "secretKey": "password"}]
    text = out.read_text()
    assert "retryPolicy" in text
    spec = yaml.safe_load_all(text).__next__()
    dags = [spec["root"]["dag"]["tasks"]] + [c["dag"]["tasks"] for c in spec["components"].values() if "dag" in c]
    pre = next(d["check-prerequisites"] for d in dags if "check-prerequisites" in d)  # inside the exit handler
    assert pre["retryPolicy"]["maxRetryCount"] == 2
    assert spec["root"]["dag"]["tasks"]["finalize"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_gpus_per_pod_must_match_training_processes(tmp_path, tiny_model_dir):
    assert load_config(tiny_config(tmp_path, tiny_model_dir, train__nproc_per_node=4))  # derived: 4 GPUs per pod
    path = tiny_config(tmp_path, tiny_model_dir, train__nproc_per_node=4,
                       platform={"gpu_tasks": {"accelerator_type": "nvidia.com/gpu", "accelerators": 2}})
    with pytest.raises(ConfigError, match="platform.gpu_tasks.accelerators: 2 GPUs per training pod"):
        load_config(path)
    with pytest.raises(ConfigError, match="accelerator_type"):
        load_config(tiny_config(tmp_path, tiny_model_dir, platform={"cpu_tasks": {"accelerators": 1}}))


@pytest.mark.parametrize("key, override", [
    ("base_model.path", {}),  # the tiny model lives outside this state_dir
    ("data.sources[0].path", {"data__sources": [{"path": "/srv/elsewhere/train.jsonl"}]}),
    ("deploy.canary.traffic_file", {"deploy__canary__traffic_file": "/srv/elsewhere/traffic.jsonl"}),
])
def test_cluster_paths_must_lie_on_the_state_volume(tmp_path, tiny_model_dir, key, override):
    from tuneloop.orchestrate import check_cluster_paths

    model = tiny_model_dir if key == "base_model.path" else shutil.copytree(tiny_model_dir, tmp_path / "models")
    cfg = load_config(tiny_config(tmp_path, model, state_dir=str(tmp_path), **override))
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .* is not below state_dir"):
        check_cluster_paths(cfg)
    cfg.kubernetes.state_pvc = None  # no volume: nothing to check
    check_cluster_paths(cfg)


def test_cluster_state_dir_must_be_absolute(tmp_path, tiny_model_dir):
    from tuneloop.orchestrate import check_cluster_paths

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    cfg.state_dir = "relative/state"
    with pytest.raises(ConfigError, match="state_dir: 'relative/state' must be an absolute path"):
        check_cluster_paths(cfg)


def test_compile_names_the_key_of_a_path_off_the_volume(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir)  # state_dir is tmp/state; the model lives elsewhere
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "compile", "--config", str(cfg), "--out",
                        str(tmp_path / "p.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "base_model.path" in r.stderr and "is not below state_dir" in r.stderr
