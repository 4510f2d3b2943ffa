"""Kubernetes keys that moved to the `kubernetes` section and the one pod-resources model keep working for
one release: an old-style config loads to the same objects, with a warning naming each new key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from tuneloop.config import ConfigError, load_config

OLD = dict(
    train__backend="trainjob", train__nproc_per_node=8,
    train__cluster={"namespace": "ml", "gpus_per_node": 8, "gpu_resource": "amd.com/gpu",
                    "resources": {"cpu": "32", "memory": "256Gi"},
                    "node_selector": {"gpu": "mi300"}, "tolerations": [{"key": "amd.com/gpu", "operator": "Exists"}],
                    "state_pvc": "tl-state",
                    "secret_env": [{"name": "HF_TOKEN", "secret": "hf", "key": "token"}]},
    platform={"state_pvc": "tl-state",
              "secrets": [{"name": "MLFLOW_TRACKING_PASSWORD", "secret": "mlflow-auth", "key": "password"}]},
    deploy={"backend": "kserve", "namespace": "ml",
            "kserve": {"base_model_uri": "s3://models/base", "gpus": 2, "cpu": "6", "memory": "48Gi",
                       "node_selector": {"gpu": "a100"}}},
)


def test_an_old_style_config_loads_with_a_warning_per_moved_key(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path, Path("/nonexistent-model"), **OLD))
    k = cfg.kubernetes
    assert (k.namespace, k.state_pvc) == ("ml", "tl-state")
    assert [s.name for s in k.secrets] == ["MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"]
    r = cfg.train.cluster.resources
    assert (r.cpu, r.memory, r.accelerator_type, r.accelerators) == ("32", "256Gi", "amd.com/gpu", 8)
    assert r.node_selector == {"gpu": "mi300"} and r.tolerations[0].key == "amd.com/gpu"
    p = cfg.deploy.kserve.resources
    assert (p.cpu, p.memory, p.accelerators, p.node_selector) == ("6", "48Gi", 2, {"gpu": "a100"})
    said = "\n".join(cfg.deprecations)
    for old, new in [("train.cluster.namespace", "kubernetes.namespace"), ("deploy.namespace", "kubernetes.namespace"),
                     ("platform.state_pvc", "kubernetes.state_pvc"), ("train.cluster.secret_env", "kubernetes.secrets"),
                     ("train.cluster.gpus_per_node", "train.cluster.resources.accelerators"),
                     ("deploy.kserve.gpus", "deploy.kserve.resources.accelerators")]:
        assert f"{old} is deprecated and read for one more release; use {new}" in said
    assert len(cfg.deprecations) == 14
    # what travels to the tasks is the new form only
    param = cfg.to_pipeline_param()
    assert "namespace" not in param["deploy"] and "secret_env" not in param["train"]["cluster"]
    assert load_config(tiny_config(tmp_path, Path("/nonexistent-model"), **OLD)).model_dump() == cfg.model_dump()


def test_old_and_new_keys_that_disagree_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"deploy.namespace \('serving'\) and train.cluster.namespace \('ml'\) "
                                          "disagree; both are now kubernetes.namespace"):
        load_config(tiny_config(tmp_path, Path("/nonexistent-model"), **{
            **OLD, "deploy": {**OLD["deploy"], "namespace": "serving"}}))
    with pytest.raises(ConfigError, match="platform.state_pvc .* disagree"):
        load_config(tiny_config(tmp_path, Path("/nonexistent-model"), kubernetes={"state_pvc": "other"},
                                platform={"state_pvc": "tl-state"}))


def test_validate_prints_the_deprecations(tmp_path: Path) -> None:
    path = tiny_config(tmp_path, Path("/nonexistent-model"), platform={"state_pvc": "tl-state"})
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "validate", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning: " in r.stderr and "use kubernetes.state_pvc" in r.stderr
    assert "platform.state_pvc is deprecated and read for one more release; use kubernetes.state_pvc" in r.stderr
