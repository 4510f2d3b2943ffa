"""`base_model` and `train`: what is fine-tuned and how (LoRA, SFT, DPO, DeepSpeed, checkpoints, the
cluster launchers' pods)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.align import RewardConfig, RLConfig
from tuneloop.config.base import _Strict
from tuneloop.config.kubernetes import SecretEnv, TrainPodResources
from tuneloop.config.secrets import plain_env

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
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (linear warmup, then linear decay).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the optimizer steps spent warming the learning "
                                                            "rate up linearly from 0; 0 starts at the peak.")
    per_device_batch_size: int = Field(4, gt=0, description="Micro-batch size per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(256, gt=8, description="Tokens per training example (longer ones are truncated).")
    logging_steps: int = Field(5, gt=0, description="Log loss, learning rate and tokens/s every N steps.")


class EWCConfig(_Strict):
    lambda_: float = Field(
        0.0, ge=0, description="Elastic weight consolidation (Kirkpatrick et al. 2017): adds lambda/2 * sum_i F_i * "
                               "(theta_i - theta*_i)^2 over the LoRA parameters to the SFT loss, pulling them toward "
                               "the champion's adapter theta*, weighted by F, the diagonal Fisher information "
                               "estimated on the champion's training data (tuneloop.train.ewc). 0 turns it off; above "
                               "0 needs train.sft.init: champion.")
    fisher_samples: int = Field(
        64, gt=0, description="Records of the champion's training data the diagonal Fisher is averaged over (the "
                              "same records on every run: chosen by a hash of their id).")


class SFTConfig(_StageCommon):
    packing: bool = Field(
        True, description="Pack several examples into each row of `max_length` tokens (TRL best-fit decreasing, "
                          "padding-free: no pad tokens are computed, attention stays within each example).")
    init: Literal["fresh", "champion"] = Field(
        "fresh", description="fresh: train a new LoRA adapter on the base model; champion: continue training the "
                             "champion's adapter (continual fine-tuning: the old skills are the starting point, "
                             "which is what a lower learning rate and EWC then protect; the champion's LoRA rank "
                             "and target modules are kept). With no champion yet a fresh adapter is trained.")
    ewc: EWCConfig = Field(default_factory=EWCConfig,
                           description="EWC penalty toward the champion's adapter (needs init: champion).")
    safety_demos: int = Field(
        0, ge=0, description="Refusal demonstrations added to the SFT records (safety SFT, as in Llama 2's safety "
                             "fine-tuning): this many harmful prompts of train.reward.safety.prompt_files, each with a "
                             "refusal as its answer, made as the reward stage makes its safety pairs (the same "
                             "seeded prompts and refusal templates; only prompts on the pairs' train side, none from "
                             "evaluate.safety.prompt_files). A model that never refuses gives online RL nothing to "
                             "reinforce; these make refusals likely enough to sample. 0: none.")


class DPOConfig(_StageCommon):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear warmup, then linear decay).")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference model's log-probs for every pair once before training instead "
                           "of a reference forward pass in every step (TRL 1.16 has no padding-free DPO).")




class ClusterConfig(_Strict):
    image: str | None = Field(
        None, description="Training image; null uses the tuneloop-train image of this package version "
                          "(tuneloop.images.TRAIN_IMAGE, built from docker/Dockerfile.train).")
    runtime: str = Field(
        "tuneloop-deepspeed", description="trainjob: the training runtime the TrainJob references; the chart "
                                          "installs the hardened `tuneloop-deepspeed` TrainingRuntime in the release "
                                          "namespace.")
    runtime_kind: Literal["TrainingRuntime", "ClusterTrainingRuntime"] = Field(
        "TrainingRuntime", description="trainjob: a namespaced TrainingRuntime (the chart's) or a "
                                       "ClusterTrainingRuntime such as Kubeflow Trainer's `torch-distributed`.")
    resources: TrainPodResources = Field(
        default_factory=TrainPodResources,
        description="Each training pod (one per node): cpu, memory, GPUs (null: train.nproc_per_node, one process "
                    "per GPU; 0 runs CPU pods), node selector, tolerations. Namespace, state volume and Secrets come "
                    "from the `kubernetes` section.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Plain environment variables for the training container. Secret values "
                                          "are refused here: list them in `kubernetes.secrets`.")
    service_account: str | None = Field(None, description="Service account of the training pods; null: the "
                                                           "namespace default.")
    secrets: list[SecretEnv] = Field(
        default_factory=list, description="Secrets for the training pods only (e.g. their own MLflow user); an "
                                          "entry replaces the kubernetes.secrets entry of the same name.")
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

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        return plain_env(v)

    def gpus_per_node(self, nproc_per_node: int) -> int:
        """GPUs each training pod asks for (0: CPU pods)."""
        return self.resources.accelerator_count(nproc_per_node)


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


class MergeConfig(_Strict):
    enabled: bool = Field(
        False, description="After training, merge the candidate's adapter with the champion's (peft "
                           "add_weighted_adapter) and evaluate the merge as the candidate. Method and weights are "
                           "chosen on a tuning split held out from the training data of this run and of the "
                           "champion, never on the evaluation set (tuneloop.train.merge). With no champion yet "
                           "nothing is merged.")
    methods: list[Literal["linear", "ties", "dare_ties"]] = Field(
        default_factory=lambda: ["linear", "ties", "dare_ties"],
        description="Merges tried. linear: w_cand * dW_cand + w_champ * dW_champ exactly (peft `cat`, rank r_cand + "
                    "r_champ); ties: TIES-merging (keep the largest `density` share of each delta, elect the sign, "
                    "average what agrees) on the full weight deltas; dare_ties: DARE (drop at random to `density`, "
                    "rescale) then TIES; both brought back to rank r_cand + r_champ by SVD (peft `ties_svd`, "
                    "`dare_ties_svd`).")
    weights: list[tuple[float, float]] = Field(
        default_factory=lambda: [(1.0, 1.0), (0.7, 0.7), (0.5, 0.5), (0.7, 0.3), (0.3, 0.7)],
        description="(candidate, champion) weight pairs, each tried with every method.")
    density: float = Field(0.5, gt=0, le=1, description="ties / dare_ties: the share of each delta's values kept.")
    tuning_share: float = Field(
        0.2, gt=0, lt=1, description="Share of the training records (this run's and the champion's) held out as the "
                                     "tuning split, by a hash of the record id; records that share an id or a prompt "
                                     "with an evaluation record are never in it.")
    tuning_max_per_slice: int = Field(32, gt=0, description="At most this many tuning records per slice (the "
                                                            "smallest id hashes).")
    seed: int = Field(0, description="Seed of DARE's random drop.")


class RepairConfig(_Strict):
    enabled: bool = Field(
        True, description="The forgetting repair ladder: when the evaluation gate fails only on regression rules "
                          "of old slices (slices the champion knows that this run's training data lacks), try "
                          "`mitigations` in order, each candidate gated exactly like the first, and stop at the "
                          "first that passes (tuneloop.repair).")
    mitigations: list[Literal["merge", "replay", "ewc", "lower_lr"]] = Field(
        default_factory=lambda: ["merge", "replay", "ewc", "lower_lr"],
        description="In order. merge: train.merge with the champion (no training); replay: retrain with "
                    "data.replay_share raised to `replay_share`; ewc: continue the champion's adapter with the EWC "
                    "penalty `ewc_lambda`; lower_lr: continue the champion's adapter at train.sft.learning_rate x "
                    "`lr_factor`. With method full only replay applies (the others work on adapters).")
    max_attempts: int = Field(4, gt=0, description="At most this many repaired candidates are trained and gated.")
    max_wall_minutes: float = Field(
        120.0, gt=0, description="No attempt starts after the ladder has run this long (one that started finishes).")
    old_slice_max_share: float = Field(
        0.05, ge=0, lt=1, description="A slice the champion was trained or evaluated on is old when it makes up at "
                                      "most this share of this run's SFT records (none at all always counts).")
    replay_share: float = Field(0.5, gt=0, lt=1, description="replay: data.replay_share of the retrained candidate.")
    ewc_lambda: float = Field(
        1e7, gt=0, description="ewc: train.sft.ewc.lambda_ of the retrained candidate. The right scale goes with "
                               "1 / the Fisher's size, which depends on the model (an EWC run's ewc.json reports its "
                               "mean); 1e7 was measured on the tiny test model (Fisher mean ~2e-5).")
    lr_factor: float = Field(0.3, gt=0, lt=1, description="lower_lr: train.sft.learning_rate is multiplied by this.")

    @field_validator("mitigations")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        twice = sorted({m for m in v if v.count(m) > 1})
        if twice:
            raise ValueError(f"listed more than once: {', '.join(twice)}")
        return v


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
    alignment: Literal["dpo", "reward+rl", "none"] = Field(
        "dpo", description="The alignment path after SFT: dpo (offline, TRL DPOTrainer), reward+rl (a reward model "
                           "trained on the preference and safety pairs, then online RL against it: train.reward, "
                           "train.rl), or none (the SFT adapter goes to evaluation).")
    reward: RewardConfig = Field(default_factory=RewardConfig,
                                 description="The reward model of alignment reward+rl (TRL RewardTrainer, LoRA).")
    rl: RLConfig = Field(default_factory=RLConfig,
                         description="Online RL of alignment reward+rl (TRL RLOOTrainer or GRPOTrainer).")
    timeout_minutes: int = Field(120, gt=0, description="A training launch that runs longer is stopped and fails.")
    merge: MergeConfig = Field(default_factory=MergeConfig,
                               description="Merge the candidate's adapter with the champion's (forgetting mitigation).")
    repair: RepairConfig = Field(default_factory=RepairConfig,
                                 description="The forgetting repair ladder run when the gate blocks a candidate that "
                                             "forgot an old slice.")

    @model_validator(mode="after")
    def _fits(self) -> TrainConfig:
        cluster = self.backend != "local"
        if not cluster and self.num_nodes != 1:
            raise ValueError("train.num_nodes: the local backend runs on one node; use backend trainjob or "
                             "pytorchjob for several")
        if not (self.sft.enabled or self.dpo.enabled):
            raise ValueError("train.sft.enabled / train.dpo.enabled: at least one training stage must run")
        gpus = self.cluster.gpus_per_node(self.nproc_per_node)
        if cluster and gpus > 0 and self.nproc_per_node != gpus:
            raise ValueError(f"train.nproc_per_node: one process per GPU; set it to cluster.resources.accelerators "
                             f"({gpus})")
        for what, on in (("method qlora", self.method == "qlora"), ("liger_kernels", self.liger_kernels),
                         ("attention flash_attention_2", self.attention == "flash_attention_2"),
                         ("bf16 on", self.bf16 == "on")):
            if on and cluster and gpus == 0:
                raise ValueError(f"train: {what} needs CUDA GPUs; cluster.resources.accelerators is 0")
        if self.method == "qlora" and self.deepspeed == "zero3_offload":
            raise ValueError("train.deepspeed: zero3_offload cannot offload 4-bit (qlora) weights; use zero3, zero2 "
                             "or none")
        if self.method == "full" and self.save_merged_model:
            raise ValueError("train.save_merged_model: a full fine-tune already writes a full model")
        if self.sft.ewc.lambda_ > 0 and self.sft.init != "champion":
            raise ValueError("train.sft.ewc.lambda_: EWC pulls the adapter toward the champion's, so SFT must start "
                             "from it; set train.sft.init: champion")
        if self.method == "full":
            adapters = [k for k, on in (("train.sft.init: champion", self.sft.init == "champion"),
                                        ("train.merge.enabled", self.merge.enabled)) if on]
            if adapters:
                raise ValueError(f"{', '.join(adapters)}: works on LoRA adapters; method full has none")
        return self


