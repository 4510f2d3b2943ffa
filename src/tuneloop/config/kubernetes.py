"""Kubernetes settings in one vocabulary.

`kubernetes`   where the platform's objects live: namespace, the state volume, the Secrets exposed as
               environment variables - one list for pipeline tasks and training pods alike.
PodResources   one model for what a pod asks for (cpu, memory, accelerators, placement), used by
               pipeline tasks (`platform.cpu_tasks` / `gpu_tasks`), training pods
               (`train.cluster.resources`) and the KServe predictor (`deploy.kserve.resources`); the
               three differ only in their defaults.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.base import _Strict
from tuneloop.config.secrets import plain_env

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SecretEnv(_Strict):
    name: str = Field(description="Environment variable in the container, e.g. MLFLOW_TRACKING_PASSWORD.")
    secret: str = Field(description="Kubernetes Secret in `kubernetes.namespace` that holds the value.")
    key: str = Field(description="Key inside that Secret.")


class Toleration(_Strict):
    key: str | None = Field(None, description="Taint key; null with operator Exists tolerates every taint.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal compares `value`; Exists ignores it.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; null tolerates every effect.")


class PodResources(_Strict):
    """What one pod asks for and where it may run."""

    cpu: str = Field("1", description="CPU of the pod, request = limit (Kubernetes quantity).")
    memory: str = Field("4Gi", description="Memory of the pod, request = limit (Kubernetes quantity).")
    accelerator_type: str | None = Field(None, description="Accelerator resource, e.g. nvidia.com/gpu; null: none.")
    accelerators: int | None = Field(
        None, ge=0, description="Accelerators per pod (with accelerator_type). null: none for CPU pipeline tasks; "
                                "train.nproc_per_node for the training pods and the GPU pipeline tasks (one "
                                "process per GPU).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pod tolerates.")

    @model_validator(mode="after")
    def _acc(self) -> PodResources:
        if self.accelerators and not self.accelerator_type:
            raise ValueError("accelerator_type: set it (e.g. nvidia.com/gpu) when accelerators > 0")
        return self

    def accelerator_count(self, default: int) -> int:
        """Accelerators per pod: `accelerators`, else `default` when an accelerator type is set, else 0."""
        if not self.accelerator_type:
            return 0
        return default if self.accelerators is None else self.accelerators

    def container_resources(self, default_accelerators: int) -> dict[str, Any]:
        """requests = limits, as a container's `resources` (training pods, the KServe predictor)."""
        res = {"cpu": self.cpu, "memory": self.memory}
        n = self.accelerator_count(default_accelerators)
        if n and self.accelerator_type:
            res[self.accelerator_type] = str(n)
        return {"requests": dict(res), "limits": dict(res)}

    def placement(self) -> dict[str, Any]:
        """The pod spec's nodeSelector and tolerations (only those that are set)."""
        out: dict[str, Any] = {}
        if self.node_selector:
            out["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            out["tolerations"] = [t.model_dump(exclude_none=True) for t in self.tolerations]
        return out


def _gpu_placement() -> dict[str, Any]:
    return {"node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]}


def gpu_task_resources() -> PodResources:
    return PodResources(cpu="8", memory="64Gi", accelerator_type="nvidia.com/gpu", **_gpu_placement())


class TrainPodResources(PodResources):
    """A training pod: one process per GPU; CPU pods with accelerators 0."""

    cpu: str = Field("8", description="CPU per training pod (request = limit).")
    memory: str = Field("64Gi", description="Memory per training pod (request = limit).")
    accelerator_type: str | None = Field("nvidia.com/gpu", description="GPU resource name; null for CPU pods.")


class PredictorResources(PodResources):
    """A KServe predictor pod (vLLM)."""

    cpu: str = Field("4", description="CPU per predictor pod.")
    memory: str = Field("32Gi", description="Memory per predictor pod.")
    accelerator_type: str | None = Field("nvidia.com/gpu", description="GPU resource name; null for CPU pods.")
    accelerators: int | None = Field(1, ge=0, description="GPUs per predictor pod.")


class KubernetesConfig(_Strict):
    """Where the platform's objects live on the cluster; kfp.local and local training ignore it."""

    namespace: str = Field("tuneloop", description="Namespace of the training jobs (TrainJob / PyTorchJob) and of "
                                                   "the InferenceService.")
    state_pvc: str | None = Field(
        "tuneloop-state", description="ReadWriteMany PersistentVolumeClaim mounted at `state_dir` in every pipeline "
                                      "task and training pod: checkpoints, the model cache, job inputs and outputs, "
                                      "the local stores. state_dir must then be absolute and hold every local path "
                                      "the tasks read (compile, submit and schedule check it). null mounts nothing.")
    secrets: list[SecretEnv] = Field(
        default_factory=list, description="Secrets exposed as environment variables in every pipeline task and "
                                          "training pod (MLflow and S3 credentials, the feedback database URL); the "
                                          "values never enter the config, the compiled YAML or the job objects.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Plain environment variables of every pipeline task and training pod, e.g. "
                                          "the OTEL_* variables that point them at a trace collector (the chart fills "
                                          "them from `tracing`). Secret values are refused here: list them in "
                                          "`secrets`.")
    service_account: str | None = Field(
        None, description="ServiceAccount the pipeline's task pods run as (the chart sets its own, the only one "
                          "bound to the Role that launches training jobs); null: Kubeflow Pipelines' default.")
    pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/part-of": "tuneloop"},
        description="Labels on every pod the platform creates (training pods, the KServe predictor), so the "
                    "release's NetworkPolicies select them; the chart sets its selector labels here.")

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        return plain_env(v)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 63:
            raise ValueError("a namespace is a DNS label: lower-case letters, digits and -, at most 63")
        return v


class PlatformConfig(_Strict):
    """Pipeline task settings compiled into the pipeline (kfp-kubernetes); kfp.local ignores them."""

    cpu_tasks: PodResources = Field(default_factory=PodResources,
                                    description="Pods of the CPU stages (ingest, validate, register, deploy, ...).")
    gpu_tasks: PodResources = Field(default_factory=gpu_task_resources,
                                    description="Pods of sft, dpo and evaluate.")
    retries: int = Field(2, ge=0, description="Retries with exponential backoff of every task but validate_data "
                                              "(network calls; a preempted training task resumes from its newest "
                                              "complete checkpoint).")
    retry_backoff_s: int = Field(30, gt=0, description="First retry delay; it doubles on each retry.")
    task_timeout_minutes: int = Field(60, gt=0, description="Timeout of every non-training task.")
