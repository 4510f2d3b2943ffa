"""The whole run config: one YAML file -> one `RunConfig`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from tuneloop.config.align import alignment_data_problem
from tuneloop.config.base import DEFAULT_STATE_DIR, ConfigError, _Strict
from tuneloop.config.data import DataConfig
from tuneloop.config.deploy import DeployConfig, MonitorConfig, RegistryConfig
from tuneloop.config.evaluate import EvaluateConfig
from tuneloop.config.kubernetes import KubernetesConfig, PlatformConfig
from tuneloop.config.secrets import credential_findings
from tuneloop.config.train import BaseModelConfig, TrainConfig


class RunConfig(_Strict):
    name: str = Field(description="Name of this continuous-training loop (run names and tags start with it).")
    state_dir: str = Field(
        DEFAULT_STATE_DIR, description="Durable state: MLflow store, feedback store, model cache, checkpoints. "
                                       "Relative paths are taken from the current directory.")
    base_model: BaseModelConfig = Field(description="The model that is fine-tuned.")
    data: DataConfig = Field(description="Training and evaluation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="SFT and DPO training.")
    evaluate: EvaluateConfig = Field(description="Evaluation against the champion and the promotion gate.")
    registry: RegistryConfig = Field(description="MLflow tracking and model registry.")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="Canary deploy, analysis, promotion.")
    kubernetes: KubernetesConfig = Field(
        default_factory=KubernetesConfig, description="Where the platform's objects live on a cluster: namespace, "
                                                      "state volume, Secrets (ignored by kfp.local and local training).")
    platform: PlatformConfig = Field(default_factory=PlatformConfig,
                                     description="Pipeline task pods: resources, retries, timeouts (compiled into the "
                                                 "pipeline; ignored by kfp.local).")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig,
                                   description="Production monitoring and the retraining trigger (`tuneloop monitor`).")

    _deprecations: list[str] = PrivateAttr(default_factory=list)

    @property
    def deprecations(self) -> list[str]:
        """Warnings for deprecated keys found when this config was loaded (config/deprecated.py)."""
        return self._deprecations

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("use letters, digits, - and _ only")
        return v

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        gpus = self.platform.gpu_tasks.accelerators
        if gpus is not None and gpus and self.platform.gpu_tasks.accelerator_type \
                and gpus != self.train.nproc_per_node:
            raise ValueError(f"platform.gpu_tasks.accelerators: {gpus} GPUs per training pod but "
                             f"train.nproc_per_node is {self.train.nproc_per_node}; torchrun starts one process "
                             "per GPU, so they must match")
        if self.train.backend != "local" and not self.kubernetes.state_pvc:
            raise ValueError(f"kubernetes.state_pvc: the {self.train.backend} backend's pods read their inputs and "
                             "write their outputs on the state volume; name its PersistentVolumeClaim")
        self.monitor.check_slices(self.evaluate.slices)  # quality floors and SLOs name classification slices
        why = alignment_data_problem(self.train.alignment, [s.kind for s in self.data.sources])
        if why:
            raise ValueError(why)
        found = credential_findings(self.model_dump(mode="json"))
        if found:
            raise ValueError(found[0])
        if self.deploy.backend == "kserve" and self.deploy.kserve is None:
            raise ValueError("deploy.kserve: the kserve backend needs its section (base_model_uri at least)")
        timeout = self.platform.task_timeout_minutes
        budget = timeout - min(5.0, 0.2 * timeout)  # deploy/canary.py: the analyze task keeps a reserve
        if self.deploy.backend == "kserve" and self.deploy.canary.window_minutes > budget:
            raise ValueError(f"deploy.canary.window_minutes: {self.deploy.canary.window_minutes:g} minutes do not fit "
                             f"in the analyze task's timeout (platform.task_timeout_minutes {timeout}, less "
                             f"{timeout - budget:g} minutes for the analysis itself): lower the window to at most "
                             f"{budget:g} or raise the timeout")
        if self.deploy.backend == "local" and self.deploy.canary.traffic_file is None:
            raise ValueError("deploy.canary.traffic_file: the local backend replays traffic from a file; set it")
        if self.train.method == "full":
            raise ValueError("train.method: full fine-tuning writes a full model, and the evaluate, register and "
                             "deploy stages take LoRA adapters only (for now); use lora or qlora")
        return self

    def to_pipeline_param(self) -> dict[str, Any]:
        """The config as the pipeline's `config` parameter: JSON, nulls left out (KFP structs refuse
        them; a missing key parses back to the same default)."""
        return self.model_dump(mode="json", exclude_none=True)

    # -- derived locations (never stored in the config itself) --
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def tracking_uri(self) -> str:
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        return f"sqlite:///{(self.state_path / 'mlflow.db').resolve()}"

    @property
    def artifact_location(self) -> str | None:
        """Artifact root for the embedded store; a server decides its own."""
        if self.registry.tracking_uri:
            return None
        return (self.state_path / "mlartifacts").resolve().as_uri()

    @property
    def feedback_db(self) -> Path | str:
        env = self.deploy.feedback_store_env
        if env:
            if not os.environ.get(env):
                raise ConfigError(f"deploy.feedback_store_env: environment variable {env} is not set")
            return os.environ[env]
        return self.state_path / "feedback.db"


