"""Training config: the backends' fields and the combinations that are refused before any compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_config

from tuneloop.config import ConfigError, TrainConfig, load_config
from tuneloop.train.common import check_host
from tuneloop.train.launch import build_spec
from tuneloop.train.local import TrainingFailed, launch_local
from tuneloop.train.spec import JobSpec

pytestmark = pytest.mark.unit


def _load(tmp_path: Path, **train: Any):
    return load_config(tiny_config(tmp_path, Path("/nonexistent-model"),
                                   **{f"train__{k}": v for k, v in train.items()}))


@pytest.mark.parametrize("train, message", [
    ({"num_nodes": 2}, "train.num_nodes: the local backend runs on one node"),
    ({"backend": "trainjob", "cluster": {"resources": {"accelerators": 4}}, "nproc_per_node": 2},
     "one process per GPU; set it to cluster.resources.accelerators (4)"),
    ({"backend": "pytorchjob", "method": "qlora", "cluster": {"resources": {"accelerators": 0}}},
     "method qlora needs CUDA GPUs; cluster.resources.accelerators is 0"),
    ({"backend": "trainjob", "liger_kernels": True, "cluster": {"resources": {"accelerators": 0}}},
     "liger_kernels needs CUDA GPUs"),
    ({"method": "qlora", "deepspeed": "zero3_offload"}, "zero3_offload cannot offload 4-bit"),
    ({"method": "full"}, "train.method: full fine-tuning writes a full model"),
    ({"backend": "trainjob", "cluster": {"env": {"HF_TOKEN": "hf_abc"}, "resources": {"accelerators": 2}}},
     "HF_TOKEN: looks like a secret"),
    ({"checkpoint": {"keep": 1}}, "train.checkpoint.keep"),
    ({"backend": "kubernetes"}, "train.backend"),
])
def test_impossible_training_combinations_are_refused(tmp_path: Path, train: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, **train)
    assert message in str(e.value), str(e.value)


def test_namespace_is_a_dns_label(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kubernetes.namespace: a namespace is a DNS label"):
        load_config(tiny_config(tmp_path, Path("/nonexistent-model"), kubernetes={"namespace": "ML_Team"}))


def test_cluster_backends_load(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(
        tmp_path, Path("/nonexistent-model"), train__backend="trainjob", train__num_nodes=4, train__nproc_per_node=8,
        train__cluster={"resources": {"accelerators": 8,
                                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}},
        kubernetes={"secrets": [{"name": "HF_TOKEN", "secret": "hf", "key": "token"}]},
        train__method="qlora", train__liger_kernels=True,
        train__checkpoint={"every_steps": 100, "uri": "s3://bucket/ckpt"}))
    assert cfg.train.num_nodes == 4 and cfg.kubernetes.secrets[0].secret == "hf"
    spec = build_spec(cfg, "sft", Path("/m"), Path("/d"), Path("/o"), pipeline_run="run9")
    assert spec.checkpoint_mirror == "s3://bucket/ckpt/run9/sft"
    assert spec.checkpoint_dir.endswith("checkpoints/run9/sft") and spec.train.method == "qlora"
    # the pipeline parameter round trip keeps the new sections
    raw = yaml.safe_load(yaml.safe_dump(cfg.to_pipeline_param()))
    assert raw["kubernetes"]["secrets"][0]["key"] == "token"


def test_gpu_only_options_fail_on_this_cpu_host_before_anything_starts(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    spec = JobSpec(stage="sft", base_model_dir="/m", data_path="/d", output_dir=str(tmp_path / "o"),
                   train=TrainConfig(method="qlora"))
    with pytest.raises(Exception, match="method: qlora .* needs a CUDA GPU and this host has none"):
        check_host(spec)
    with pytest.raises(TrainingFailed, match="needs a CUDA GPU"):
        launch_local(spec, 2, tmp_path, 60)
    assert not (tmp_path / "o" / "job_spec.json").exists(), "nothing was launched"
