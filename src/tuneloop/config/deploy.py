"""`registry`, `deploy` (canary, KServe) and `monitor`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneloop.config.base import _Strict
from tuneloop.config.kubernetes import PredictorResources

class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null uses sqlite:///<state_dir>/mlflow.db (the embedded default).")
    experiment: str = Field("tuneloop", description="MLflow experiment of the pipeline runs.")
    model_name: str = Field(description="Registered model name in the MLflow registry.")


class CanaryConfig(_Strict):
    mode: Literal["canary", "shadow"] = Field(
        "canary", description="canary: the new version answers `traffic_percent` of users; shadow: it gets a copy "
                              "of every request, its answers are logged for analysis and never returned.")
    traffic_percent: int = Field(20, ge=1, le=99, description="Share of users (sticky by user id) sent to the canary.")
    requests: int = Field(40, gt=0, description="Requests in the analysis window (local replay sends this many).")
    traffic_file: str | None = Field(
        None, description="JSONL of prompts (with optional `reference`) replayed through the local gateway during "
                          "analysis; null on a cluster, where real traffic is analysed.")
    max_error_rate_increase: float = Field(
        0.05, ge=0, le=1, description="Roll back if canary error rate exceeds the champion's by more than this.")
    max_p95_latency_ratio: float = Field(
        2.0, gt=0, description="Roll back if canary p95 latency exceeds the champion's times this.")
    min_feedback_delta: float = Field(
        -0.1, description="Roll back if canary mean feedback score minus the champion's is below this (one-sided "
                          "Welch test at `alpha` when both sides have enough feedback).")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the canary tests.")
    max_new_tokens: int = Field(8, gt=0, description="Generation budget of each replayed request.")
    window_minutes: float = Field(
        30.0, gt=0, description="kserve backend: how long live traffic is collected before the analysis.")


class KServeConfig(_Strict):
    base_model_uri: str = Field(description="Base weights for the serving runtime (s3://, gs://, pvc://, https://).")
    artifact_store_uri: str | None = Field(
        None, description="Bucket prefix behind the MLflow server's mlflow-artifacts:/ URIs (e.g. s3://mlflow), so "
                          "KServe's storage initializer can fetch adapters.")
    service_name: str | None = Field(None, description="InferenceService name; default: the registered model name.")
    runtime: str = Field("kserve-huggingfaceserver", description="ServingRuntime (vLLM backend).")
    service_account: str = Field("tuneloop-serving", description="Service account with access to the storage.")
    feedback_url: str | None = Field(
        None, description="Feedback service base URL; each revision's payload logger posts there.")
    min_replicas: int = Field(1, ge=0, description="Minimum predictor replicas.")
    max_replicas: int = Field(2, ge=1, description="Maximum predictor replicas.")
    resources: PredictorResources = Field(
        default_factory=PredictorResources, description="Each predictor pod: cpu, memory, GPUs, node selector, "
                                                        "tolerations (the namespace is `kubernetes.namespace`).")


class DeployConfig(_Strict):
    backend: Literal["local", "kserve"] = Field(
        "local", description="local: the `tuneloop serve` gateway; kserve: a KServe InferenceService (vLLM) "
                             "updated with canaryTrafficPercent.")
    kserve: KServeConfig | None = Field(None, description="The KServe backend's settings.")
    feedback_store_env: str | None = Field(
        None, description="Environment variable (set from a Secret) holding the SQLAlchemy URL of the feedback "
                          "store, e.g. Postgres on a cluster; null: sqlite in state_dir.")
    gateway_url: str = Field("http://127.0.0.1:8710", description="Where the local gateway listens.")
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="Canary rollout and automatic analysis.")


class MonitorConfig(_Strict):
    window_hours: float = Field(24.0, gt=0, description="Production traffic of the last N hours is checked.")
    slo_error_rate: float = Field(0.01, ge=0, le=1, description="SLO: largest acceptable share of failed requests.")
    slo_p95_latency_ms: float = Field(2000.0, gt=0, description="SLO: largest acceptable p95 latency.")
    baseline_requests: int = Field(
        100, gt=1, description="Scored requests right after the champion's promotion that form the feedback "
                               "baseline (mean and sigma of the SPC chart).")
    min_window_feedback: int = Field(10, gt=0, description="Fewer scored requests in the window: no SPC verdict.")
    min_new_feedback: int = Field(
        50, gt=0, description="Feedback items since the champion was registered that justify a new run.")
    max_drifted_share: float = Field(
        0.5, gt=0, le=1, description="Prompt drift: share of text descriptors that drifted (Evidently).")
    max_embedding_drift: float = Field(
        0.55, gt=0, le=1, description="Prompt drift: Evidently embedding-drift score (classifier ROC AUC) above "
                                      "which production prompts count as drifted.")
    retrain_on: list[Literal["drift", "feedback_trend", "feedback_volume"]] = Field(
        default_factory=lambda: ["drift", "feedback_trend", "feedback_volume"],
        description="Signals that start a new pipeline run (SLO breaches alert but do not retrain).")
    action: Literal["report", "run", "submit"] = Field(
        "report", description="When retraining is due: report only, run the pipeline here (kfp.local), or "
                              "submit a Kubeflow Pipelines run to `kfp_host`.")
    kfp_host: str | None = Field(None, description="Kubeflow Pipelines endpoint for action `submit`.")

    @model_validator(mode="after")
    def _host(self) -> MonitorConfig:
        if self.action == "submit" and not self.kfp_host:
            raise ValueError("kfp_host: action `submit` needs the Kubeflow Pipelines endpoint")
        return self


