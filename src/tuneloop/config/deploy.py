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
    min_latency_requests: int = Field(
        20, ge=1, description="Answered requests each side needs before latency is compared: with fewer, the p95 "
                              "is the slowest request, and one scheduling stall would decide the rollout.")
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
    events_token_env: str | None = Field(
        "TUNELOOP_EVENTS_TOKEN", description="Environment variable (set from a Secret) holding an API key with scope "
                                             "`events` only: KServe's payload logger cannot send headers, so the key "
                                             "goes into the logger URL (`access_token=`) and so into the "
                                             "InferenceService object; keep it to that one scope. null: no token.")
    min_replicas: int = Field(1, ge=0, description="Minimum predictor replicas.")
    max_replicas: int = Field(2, ge=1, description="Maximum predictor replicas.")
    resources: PredictorResources = Field(
        default_factory=PredictorResources, description="Each predictor pod: cpu, memory, GPUs, node selector, "
                                                        "tolerations (the namespace is `kubernetes.namespace`).")


class AuthConfig(_Strict):
    """Who may call the gateway and the feedback service. Keys are bearer tokens; only their sha256 is
    kept (in a file or an environment variable that a Kubernetes Secret fills), never in this config."""

    enabled: bool = Field(
        True, description="false (dev only; refused with the kserve backend): every endpoint is open to anyone, "
                          "admin included, and the services say so loudly at start. Keep true.")
    keys_file: str | None = Field(
        None, description="Absolute path of the API-key file (a mounted Secret): one key a line, `NAME SCOPES "
                          "sha256:HEX` (scopes comma-separated: chat, feedback, events, admin, trusted); "
                          "`tuneloop api-key` makes one. Re-read when it changes.")
    keys_env: str | None = Field(
        "TUNELOOP_API_KEYS", description="Environment variable (from a Secret) holding keys in the same format "
                                         "(lines or `;`-separated). With neither keys_file nor this set, the local "
                                         "gateway makes its own token in <state_dir>/auth/ and the feedback "
                                         "service refuses to start.")
    user_id_secret_env: str = Field(
        "TUNELOOP_USER_ID_SECRET", description="Environment variable (from a Secret, >= 32 characters) with the "
                                               "HMAC key under which user ids are stored; unset, the local gateway "
                                               "keeps a generated one in <state_dir>/auth/ and the feedback service "
                                               "refuses to start.")
    trust_corrections: Literal["all", "trusted_keys", "reviewed"] = Field(
        "trusted_keys", description="Which corrections become training data: all; those sent with a key that has "
                                    "the `trusted` scope; or only those an admin reviewed (POST "
                                    "/admin/corrections/review). The others are stored, flagged untrusted, and "
                                    "ingest leaves them out.")

    @model_validator(mode="after")
    def _absolute(self) -> AuthConfig:
        if self.keys_file is not None and not self.keys_file.startswith("/"):
            raise ValueError("keys_file: give an absolute path (the mounted Secret), not a relative one")
        return self


class RateLimit(_Strict):
    per_minute: float | None = Field(None, gt=0, description="Sustained rate (token-bucket refill); null: no limit.")
    burst: int = Field(20, ge=1, description="Bucket size: how many may come at once before the rate applies.")


class FeedbackPerUserLimit(RateLimit):
    per_minute: float | None = Field(12.0, gt=0, description="Sustained rate (token-bucket refill); null: no limit.")
    burst: int = Field(10, ge=1, description="Bucket size: how many may come at once before the rate applies.")


class FeedbackPerKeyLimit(RateLimit):
    per_minute: float | None = Field(3000.0, gt=0, description="Sustained rate (token-bucket refill); null: no limit.")
    burst: int = Field(300, ge=1, description="Bucket size: how many may come at once before the rate applies.")


class LimitsConfig(_Strict):
    """Bounds on what one request or one client can make the services hold or do (per process)."""

    max_body_bytes: int = Field(
        256 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="Largest request body; refused with 413 as soon as it is exceeded (Content-Length first).")
    max_prompt_tokens: int = Field(
        1024, gt=0, description="Largest prompt (chat template included) the gateway generates for; longer: 400.")
    feedback_per_user: FeedbackPerUserLimit = Field(
        default_factory=FeedbackPerUserLimit, description="POST /v1/feedback per user (the user the rated request "
                                                          "was served to); over it: 429 with Retry-After.")
    feedback_per_key: FeedbackPerKeyLimit = Field(
        default_factory=FeedbackPerKeyLimit, description="POST /v1/feedback per API key; over it: 429.")
    chat_per_user: RateLimit = Field(default_factory=RateLimit, description="Gateway chat requests per user.")
    chat_per_key: RateLimit = Field(default_factory=RateLimit, description="Gateway chat requests per API key.")
    pending_halves_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Feedback service: KServe request/response halves waiting for their "
                                               "other half, in bytes, across replicas; the oldest go first.")
    pending_halves_max_age_s: float = Field(
        600.0, gt=0, description="Feedback service: a half whose other half has not come after this long is "
                                 "dropped (counted on /metrics).")


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
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys of the gateway and the feedback "
                                                                     "service; user-id hashing; trust in corrections.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Body, prompt and rate limits of the "
                                                                           "gateway and the feedback service.")

    @model_validator(mode="after")
    def _auth_on_clusters(self) -> DeployConfig:
        if self.backend == "kserve" and not self.auth.enabled:
            raise ValueError("deploy.auth.enabled: false is for local development only; the kserve backend's "
                             "feedback service must authenticate its writers")
        return self


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


