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
    test: Literal["sequential", "fixed"] = Field(
        "sequential", description="sequential: always-valid tests evaluated after every `batch_requests`, stopping "
                                  "early on clear harm (rollback) or clear success (promote) with the false-rollback "
                                  "and false-promotion rates held at `alpha` however often they are looked at; "
                                  "fixed: Fisher's and Welch's tests once, at the end of the window.")
    requests: int = Field(40, gt=0, description="Most requests in the analysis window: the local replay sends this "
                                                "many, fewer when the sequential test decides earlier.")
    batch_requests: int = Field(
        10, gt=0, description="sequential: requests (both sides) between two looks; the local replay sends this "
                              "many per look, the kserve backend looks whenever this many new ones were logged.")
    min_requests: int = Field(
        20, ge=1, description="sequential: requests each side needs before the test may stop early either way (a "
                              "canary pod's warm-up must not decide it); at the window's end it decides on what "
                              "there is.")
    inconclusive: Literal["promote", "rollback"] = Field(
        "promote", description="sequential: the decision when the window ends with neither harm nor success shown: "
                               "promote (no harm was shown: the fixed test's rule, for low traffic) or rollback "
                               "(the champion stays unless the canary was proven within every margin: the careful "
                               "choice where traffic fills the window).")
    traffic_file: str | None = Field(
        None, description="JSONL of prompts (with optional `reference`) replayed through the local gateway during "
                          "analysis; null on a cluster, where real traffic is analysed.")
    max_error_rate_increase: float = Field(
        0.05, ge=0, le=1, description="Allowed canary error rate minus the champion's. fixed: roll back if exceeded "
                                      "and Fisher's p < `alpha`; sequential: roll back once the difference is shown "
                                      "above it, promote once shown below it (and the other metrics likewise).")
    max_p95_latency_ratio: float = Field(
        2.0, gt=0, description="Allowed canary latency over the champion's. fixed: ratio of the p95s; sequential: "
                               "ratio of the geometric means of answered requests (a uniform slowdown moves the "
                               "p95 by the same factor), tested like the error rate.")
    min_latency_requests: int = Field(
        20, ge=1, description="fixed: answered requests each side needs before latency is compared: with fewer, "
                              "the p95 is the slowest request, and one scheduling stall would decide the rollout.")
    min_feedback_delta: float = Field(
        -0.1, description="Allowed canary mean feedback score minus the champion's. fixed: roll back if below it "
                          "(one-sided Welch test at `alpha` when both sides have enough feedback); sequential: "
                          "tested like the error rate.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level. fixed: of each test; sequential: the "
                                                       "rate of rolling back a canary within every margin, and of "
                                                       "promoting one beyond a margin, under continuous peeking.")
    max_new_tokens: int = Field(8, gt=0, description="Generation budget of each replayed request.")
    window_minutes: float = Field(
        30.0, gt=0, description="kserve backend: longest wait for live traffic (sequential: less on a decision). "
                                "Cut at run time to the analyze task's timeout (`platform.task_timeout_minutes`) "
                                "less a reserve of min(5 min, 20%), with a warning.")

    @model_validator(mode="after")
    def _sequential_options(self) -> CanaryConfig:
        if self.test == "fixed" and self.inconclusive == "rollback":
            raise ValueError("inconclusive: `rollback` applies to the sequential test; `test: fixed` promotes "
                             "unless one of its tests fails")
        if "batch_requests" in self.model_fields_set and self.batch_requests > self.requests:
            raise ValueError(f"batch_requests: {self.batch_requests} exceeds `requests` ({self.requests}), the "
                             "window's maximum: the first look would be its end")
        return self


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


class QualitySLO(_Strict):
    """A quality SLO of one classification slice, checked on realized figures (ground truth that arrived)."""

    slice: str = Field(description="Classification slice (one of evaluate.slices).")
    label: str | None = Field(
        None, description="The label whose precision or recall is bound, e.g. `block`; null with metric accuracy.")
    metric: Literal["precision", "recall", "accuracy"] = Field(
        description="precision: of the requests answered `label`, the share whose truth is `label`; recall: of the "
                    "requests whose truth is `label`, the share answered `label`; accuracy: the slice's share of "
                    "right answers.")
    min: float = Field(ge=0, le=1, description="Floor on the realized value over the monitor window.")

    @model_validator(mode="after")
    def _label(self) -> QualitySLO:
        if (self.metric == "accuracy") != (self.label is None):
            raise ValueError(f"slos: {self.metric} on slice {self.slice!r}: precision and recall need a `label`, "
                             "accuracy takes none")
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
    min_estimated_accuracy: float | None = Field(
        None, ge=0, le=1, description="Floor on the estimated accuracy of every classification slice over the "
                                      "window (label-free: NannyML CBPE on the probabilities the champion gives "
                                      "each label, calibrated on its evaluation set); below it the signal "
                                      "`estimated_quality` fires. null: no floor.")
    min_estimated_accuracy_per_slice: dict[str, float] = Field(
        default_factory=dict, description="Floors for named slices, {slice: floor}; they replace "
                                          "min_estimated_accuracy there.")
    estimate_chunk_hours: float = Field(
        6.0, gt=0, description="Estimated and realized quality are also reported per chunk of this many hours "
                               "(ending now), to see when a drop began.")
    estimate_max_requests: int = Field(
        2000, ge=0, description="Window requests per classification slice whose label probabilities the monitor "
                                "computes with the champion where the gateway recorded none (a uniform random "
                                "sample; computed once, kept); 0: recorded probabilities only.")
    quality_confidence: float = Field(
        0.9, gt=0.5, lt=1, description="Confidence level of the quality intervals: the estimate's (from CBPE's "
                                       "sampling error), the realized figures' (Wilson) and the audit's (PPI).")
    min_quality_requests: int = Field(
        30, ge=2, description="Fewer requests than this - with label probabilities for an estimate, with ground "
                              "truth for a realized figure and its SLO, human-rated for the audit - give no verdict.")
    slos: list[QualitySLO] = Field(
        default_factory=list, description="Quality SLOs per slice and label, checked on realized figures "
                                          "(delayed labels); a breach - the whole interval below `min` - is "
                                          "reported and fires the signal `quality_slo`.")
    retrain_on: list[Literal["drift", "feedback_trend", "feedback_volume", "estimated_quality", "quality_slo"]] = \
        Field(default_factory=lambda: ["drift", "feedback_trend", "feedback_volume", "estimated_quality",
                                       "quality_slo"],
              description="Signals that start a new pipeline run (error-rate and latency SLO breaches alert but do "
                          "not retrain).")
    action: Literal["report", "run", "submit"] = Field(
        "report", description="When retraining is due: report only, run the pipeline here (kfp.local), or "
                              "submit a Kubeflow Pipelines run to `kfp_host`.")
    kfp_host: str | None = Field(None, description="Kubeflow Pipelines endpoint for action `submit`.")

    @model_validator(mode="after")
    def _host(self) -> MonitorConfig:
        if self.action == "submit" and not self.kfp_host:
            raise ValueError("kfp_host: action `submit` needs the Kubeflow Pipelines endpoint")
        bad = {k: v for k, v in self.min_estimated_accuracy_per_slice.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"min_estimated_accuracy_per_slice: floors are shares 0..1 (got {bad})")
        return self

    def check_slices(self, slices: dict) -> None:  # {name: SliceConfig} (evaluate.slices)
        """ValueError naming the key when a floor or SLO names a slice that is not a classification slice of
        evaluate.slices, or an SLO a label the slice does not have (called by the run config's checks)."""
        def labels_of(name: str, key: str) -> list[str]:
            s = slices.get(name)
            if s is None or s.task != "classification":
                raise ValueError(f"monitor.{key}: {name!r} is not a classification slice of evaluate.slices")
            return list(s.labels)

        for name in self.min_estimated_accuracy_per_slice:
            labels_of(name, "min_estimated_accuracy_per_slice")
        for i, slo in enumerate(self.slos):
            labels = labels_of(slo.slice, f"slos[{i}].slice")
            if slo.label is not None and slo.label not in labels:
                raise ValueError(f"monitor.slos[{i}].label: {slo.label!r} is not a label of slice {slo.slice!r} "
                                 f"({', '.join(labels)})")


