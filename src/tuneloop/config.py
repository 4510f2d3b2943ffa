"""The typed run config: one YAML file -> one `RunConfig`, checked before any compute.

Every field has a help text (it is the configuration reference in the README, printed by
`tuneloop config-reference`). Unknown keys are refused, and combinations that cannot work
are refused in validators, with the dotted key named in the message, so a mistake fails in
a second on the laptop instead of an hour later on a GPU node.

Relative paths in a config file are resolved against the file's own folder, so a config
and its data can travel together; `s3://` and other URIs are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_STATE_DIR = ".tuneloop"
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "exact_match": True, "token_f1": True,
                    "nll": False, "perplexity": False}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(_Strict):
    path: str = Field(description="A file or a folder (every .jsonl/.csv/.parquet inside it).")
    kind: Literal["sft", "preference"] = Field(
        "sft", description="sft: prompt/response or chat `messages` records; preference: prompt/chosen/rejected.")
    slice: str | None = Field(None, description="Slice label for records that carry none of their own.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="File format; auto picks it from the file extension.")


class DataConfig(_Strict):
    sources: list[DataSource] = Field(description="New training data for this run.", min_length=1)
    eval: list[DataSource] = Field(
        description="Held-out evaluation sets (sft kind); candidate and champion are scored on these.", min_length=1)
    system_prompt: str | None = Field(
        None, description="System message put in front of every conversation; null keeps the template's default.")
    max_prompt_chars: int = Field(4000, gt=0, description="Records with a longer prompt are quarantined.")
    max_response_chars: int = Field(4000, gt=0, description="Records with a longer response are quarantined.")
    max_quarantine_share: float = Field(
        0.1, ge=0, le=1, description="validate_data fails the run when more than this share of read records "
                                     "was quarantined.")
    use_feedback: bool = Field(
        True, description="Read the feedback store and turn user feedback into preference pairs and SFT records.")


class BaseModelConfig(_Strict):
    path: str = Field(description="Base model: a local save_pretrained folder, a hub id, or pkg://<python package> "
                                  "for weights shipped inside an installed package (read, never imported).")
    gguf_file: str | None = Field(
        None, description="A GGUF file inside `path`; it is converted once to a save_pretrained folder and cached.")
    name: str = Field(description="Short name used in tags and the model card, e.g. smollm2-135m-instruct.")


class LoraConfig(_Strict):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get a LoRA adapter.")


class _StageCommon(_Strict):
    enabled: bool = Field(True, description="Run this stage; a disabled stage passes its input adapter through.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 trains `epochs` epochs.")
    epochs: float = Field(1.0, gt=0, description="Epochs over the training records when max_steps is -1.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (linear decay, no warmup).")
    per_device_batch_size: int = Field(4, gt=0, description="Micro-batch size per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(256, gt=8, description="Tokens per training example (longer ones are truncated).")
    logging_steps: int = Field(5, gt=0, description="Log loss, learning rate and tokens/s every N steps.")


class SFTConfig(_StageCommon):
    pass


class DPOConfig(_StageCommon):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear decay, no warmup).")


class TrainConfig(_Strict):
    backend: Literal["local"] = Field(
        "local", description="local: torchrun on this host (CPU/gloo or GPUs/NCCL; on a cluster, inside the KFP "
                             "task's pod). Kubeflow Trainer TrainJob / PyTorchJob launchers are not built yet.")
    nproc_per_node: int = Field(2, gt=0, description="Training processes per node (GPUs per node on a cluster).")
    num_nodes: int = Field(1, gt=0, description="Nodes for a cluster training job; local runs use one.")
    deepspeed: Literal["zero3", "zero3_offload", "zero2", "none"] = Field(
        "zero3", description="DeepSpeed strategy: a checked-in JSON under train/deepspeed/, or none.")
    seed: int = Field(42, description="Seed for data order and adapter initialisation.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter trained by SFT and DPO.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning (TRL SFTTrainer).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference tuning (TRL DPOTrainer).")
    timeout_minutes: int = Field(120, gt=0, description="A training launch that runs longer is stopped and fails.")

    @model_validator(mode="after")
    def _fits(self) -> TrainConfig:
        if self.backend == "local" and self.num_nodes != 1:
            raise ValueError("train.num_nodes: the local backend runs on one node")
        if not (self.sft.enabled or self.dpo.enabled):
            raise ValueError("train.sft.enabled / train.dpo.enabled: at least one training stage must run")
        return self


class SliceConfig(_Strict):
    task: Literal["classification", "generation"] = Field(
        description="classification: the answer is one of `labels`; generation: free text against a reference.")
    labels: list[str] = Field(default_factory=list, description="Allowed answers of a classification slice.")

    @model_validator(mode="after")
    def _labels(self) -> SliceConfig:
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError("labels: a classification slice needs at least two labels")
        return self


class GateRule(_Strict):
    metric: Literal["accuracy", "macro_f1", "exact_match", "token_f1", "nll", "perplexity"] = Field(
        description="Metric from the evaluate stage. nll/perplexity are lower-is-better, the rest higher-is-better.")
    slice: str = Field(description="Slice name, or `all` for every evaluated record.")
    min: float | None = Field(None, description="Absolute floor for the candidate (higher-is-better metrics).")
    max: float | None = Field(None, description="Absolute ceiling for the candidate (lower-is-better metrics).")
    max_regression: float | None = Field(
        None, ge=0, description="Largest allowed change for the worse against the champion (absolute units of the "
                                "metric). With no champion yet, the base model stands in for it.")

    @model_validator(mode="after")
    def _one_kind(self) -> GateRule:
        set_ = [k for k in ("min", "max", "max_regression") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"gate on {self.metric}/{self.slice}: set exactly one of min, max, max_regression "
                             f"(got {set_ or 'none'})")
        hib = HIGHER_IS_BETTER[self.metric]
        if self.min is not None and not hib:
            raise ValueError(f"gate on {self.metric}: `min` on a lower-is-better metric; use `max`")
        if self.max is not None and hib:
            raise ValueError(f"gate on {self.metric}: `max` on a higher-is-better metric; use `min`")
        return self


class EvaluateConfig(_Strict):
    slices: dict[str, SliceConfig] = Field(description="Every slice that is evaluated, with its task type.")
    max_new_tokens: int = Field(16, gt=0, description="Generation budget per evaluation prompt.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation/scoring batch.")
    gates: list[GateRule] = Field(description="Rules a candidate must pass to be registered.", min_length=1)


class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null uses sqlite:///<state_dir>/mlflow.db (the embedded default).")
    experiment: str = Field("tuneloop", description="MLflow experiment of the pipeline runs.")
    model_name: str = Field(description="Registered model name in the MLflow registry.")


class CanaryConfig(_Strict):
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


class DeployConfig(_Strict):
    backend: Literal["local"] = Field(
        "local", description="local: the `tuneloop serve` gateway (the KServe backend is not built yet).")
    gateway_url: str = Field("http://127.0.0.1:8710", description="Where the local gateway listens.")
    namespace: str = Field("tuneloop", description="Kubernetes namespace of the InferenceService (kserve backend).")
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="Canary rollout and automatic analysis.")


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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("use letters, digits, - and _ only")
        return v

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        slices = set(self.evaluate.slices)
        for i, rule in enumerate(self.evaluate.gates):
            if rule.slice != "all" and rule.slice not in slices:
                raise ValueError(f"evaluate.gates[{i}].slice: {rule.slice!r} is not in evaluate.slices "
                                 f"({', '.join(sorted(slices))})")
            # `all` mixes every slice (and label set): the evaluate stage has no accuracy/macro_f1 for it
            if rule.metric in ("accuracy", "macro_f1") and (
                    rule.slice == "all" or self.evaluate.slices[rule.slice].task != "classification"):
                raise ValueError(f"evaluate.gates[{i}].metric: {rule.metric} needs a classification slice; "
                                 f"{rule.slice!r} is " + ("every slice" if rule.slice == "all" else "generation"))
        if self.deploy.backend == "local" and self.deploy.canary.traffic_file is None:
            raise ValueError("deploy.canary.traffic_file: the local backend replays traffic from a file; set it")
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
    def feedback_db(self) -> Path:
        return self.state_path / "feedback.db"


_PATH_FIELDS = [("data", "sources"), ("data", "eval")]


def _is_uri(p: str) -> bool:
    return "://" in p


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative data paths absolute against the config file's folder (in place)."""
    for section, key in _PATH_FIELDS:
        for src in (raw.get(section) or {}).get(key) or []:
            if isinstance(src, dict) and isinstance(src.get("path"), str) and not _is_uri(src["path"]):
                src["path"] = str((base / src["path"]).resolve())
    bm = raw.get("base_model") or {}
    if isinstance(bm.get("path"), str) and not _is_uri(bm["path"]) and (base / bm["path"]).exists():
        bm["path"] = str((base / bm["path"]).resolve())
    canary = ((raw.get("deploy") or {}).get("canary") or {})
    tf = canary.get("traffic_file")
    if isinstance(tf, str) and not _is_uri(tf):
        canary["traffic_file"] = str((base / tf).resolve())
    if isinstance(raw.get("state_dir"), str):
        raw["state_dir"] = str(Path(raw["state_dir"]).resolve())
    else:
        raw["state_dir"] = str(Path(os.environ.get("TUNELOOP_STATE_DIR", DEFAULT_STATE_DIR)).resolve())


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate an already-loaded mapping (paths must already be resolved)."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def load_config(path: str | Path, state_dir: str | None = None) -> RunConfig:
    """Load and validate a YAML run config; relative paths are resolved against its folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    if state_dir is not None:
        raw["state_dir"] = state_dir
    _resolve_paths(raw, path.resolve().parent)
    return parse_config(raw, str(path))


def demo_config_path() -> Path:
    """The embedded default: the demo config that ships inside the package."""
    return Path(__file__).parent / "demo" / "config.yaml"


def reference_markdown() -> str:
    """Every config key with its type, default and help text (the README's configuration reference)."""
    import typing

    out = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key, ann = f"{prefix}{name}", f.annotation
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            args = typing.get_args(ann)
            item = args[-1] if args else None
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.append(f"| `{key}` | section | | {f.description or ''} |")
                walk(ann, key + ".")
            elif isinstance(item, type) and issubclass(item, BaseModel):
                shape = "list" if typing.get_origin(ann) is list else "mapping of name ->"
                out.append(f"| `{key}` | {shape} {item.__name__} | {default} | {f.description or ''} |")
                walk(item, key + ("[]." if shape == "list" else ".<name>."))
            else:
                out.append(f"| `{key}` | {_type_name(ann)} | {default} | {f.description or ''} |")
    walk(RunConfig, "")
    return "\n".join(out)


def _type_name(ann: Any) -> str:
    s = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
    return s.replace("|", "\\|")
