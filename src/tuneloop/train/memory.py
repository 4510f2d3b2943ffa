"""How much memory one training process will need, before anything is launched.

An estimate from the model's config (parameter count from its shapes, hidden size, layers, vocabulary)
and the training settings (method, batch, length, precision, DeepSpeed stage, gradient checkpointing):

  weights       parameters x bytes per parameter (fp32 on CPU, bf16 with CUDA, 4-bit for qlora),
                divided over the processes under ZeRO-3 (plus the largest layer, gathered for compute)
  trainable     LoRA (or all) parameters x 16 bytes: weight, gradient and two Adam moments in fp32,
                divided over the processes under ZeRO-2/3
  activations   per layer 34 x batch x length x hidden values kept for the backward pass (the
                transformer estimate of Korthikanti et al., 2022, "Reducing Activation Recomputation
                in Large Transformer Models", without the attention-score term that SDPA and
                flash-attention do not store); with gradient checkpointing a measured share of it
  logits        batch x length x vocabulary x 4 bytes, three copies (logits, log-softmax, gradient)
  runtime       what the process holds before training (torch, transformers, DeepSpeed, the tokenizer)

DPO runs chosen and rejected together (twice the sequences). The per-token parts are scaled by a factor
measured on this stack (PER_TOKEN_CALIBRATION); the figures decide one thing: whether a local run can
fit, and which settings would make it fit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config.train import TrainConfig

GiB = 1024 ** 3
RUNTIME_BYTES = 1.6 * GiB  # torch + transformers + TRL + DeepSpeed imported, tokenizer loaded, gloo buffers
# The textbook activation and logit figures are a lower bound for this stack: measured on CPU (fp32, SDPA,
# packed rows, TRL 1.16 computing entropy and token accuracy over the full logits) the per-token memory was
# 2.0-2.2x them (bench/memory_estimate.py: SmolLM2-135M, 8x160 and 4x256 tokens per step; 8x384 was
# killed for memory at 11.5 GB, as the calibrated estimate of 12.6 GiB foresees). Calibrated so that the
# check refuses rather than lets a rank be killed: it reads 5-10% above the measured peaks.
PER_TOKEN_CALIBRATION = 2.1
CHECKPOINTED_SHARE = 0.3  # activations kept with gradient checkpointing, of the full figure (measured 0.26 at 8x384)


@dataclass
class ModelShape:
    params: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int

    @classmethod
    def from_config(cls, model_dir: str | Path) -> ModelShape:
        """Shapes from a save_pretrained folder's config.json (Llama-family field names)."""
        c = json.loads((Path(model_dir) / "config.json").read_text())
        h, layers, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inter = c.get("intermediate_size", 4 * h)
        heads = c.get("num_attention_heads", 1)
        kv = c.get("num_key_value_heads", heads)
        head_dim = c.get("head_dim", h // heads)
        attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
        per_layer = attn + 3 * h * inter + 2 * h
        embed = v * h * (1 if c.get("tie_word_embeddings", False) else 2)
        return cls(params=layers * per_layer + embed + h, hidden=h, layers=layers, vocab=v, intermediate=inter)

    def lora_params(self, r: int, targets: list[str]) -> int:
        h, i = self.hidden, self.intermediate
        dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return self.layers * sum(r * (a + b) for name, (a, b) in dims.items() if name in targets)


@dataclass
class MemoryEstimate:
    bytes_per_process: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def gib(self) -> float:
        return self.bytes_per_process / GiB

    def describe(self) -> str:
        return f"{self.gib:.1f} GiB per process (" + ", ".join(
            f"{k} {v / GiB:.1f}" for k, v in self.parts.items()) + ")"


def estimate(train: TrainConfig, stage: str, shape: ModelShape, processes: int, cuda: bool) -> MemoryEstimate:
    """Peak memory of one training process of `stage` (sft or dpo) under `train`."""
    section = train.sft if stage == "sft" else train.dpo
    bf16 = train.bf16 == "on" or (train.bf16 == "auto" and cuda)
    weight_bytes = 0.55 if train.method == "qlora" else 2 if bf16 else 4
    zero3 = train.deepspeed in ("zero3", "zero3_offload")
    sharded_states = train.deepspeed in ("zero2", "zero3", "zero3_offload")
    n = max(processes, 1)
    layer = shape.params / max(shape.layers, 1) * weight_bytes
    weights = shape.params * weight_bytes / (n if zero3 else 1) + (layer if zero3 else 0)
    trainable = shape.params if train.method == "full" else shape.lora_params(train.lora.r,
                                                                                 train.lora.target_modules)
    states = trainable * 16 / (n if sharded_states else 1)
    if train.deepspeed == "zero3_offload":
        states = trainable * 2  # the optimizer lives in host memory: counted there on a CPU host, not on the GPU
    sequences = section.per_device_batch_size * (2 if stage == "dpo" else 1)
    tokens = sequences * section.max_length
    act_bytes = 2 if bf16 or cuda else 4
    per_layer_full = 34 * tokens * shape.hidden * act_bytes / 2  # the estimate counts fp16 values as 2 bytes
    activations = shape.layers * per_layer_full
    if train.gradient_checkpointing:  # measured: 26% of the full figure (boundaries kept, layers recomputed)
        activations *= CHECKPOINTED_SHARE
    logits = 3 * tokens * shape.vocab * 4
    activations, logits = activations * PER_TOKEN_CALIBRATION, logits * PER_TOKEN_CALIBRATION
    parts = {"weights": weights, "optimizer": states, "activations": activations, "logits": logits,
             "runtime": RUNTIME_BYTES if not cuda else 0.0}
    return MemoryEstimate(sum(parts.values()), parts)


def available_bytes() -> float:
    """Memory this host (or container) can still give: MemAvailable, capped by the cgroup's limit."""
    avail = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - current)
    except (OSError, ValueError):
        pass
    return avail


def what_would_fit(train: TrainConfig, stage: str, shape: ModelShape, processes: int, cuda: bool,
                   budget: float) -> str:
    """The usual levers, applied one after another (gradient checkpointing, then halving the batch while
    keeping the effective batch with gradient accumulation, then halving the row length) until the
    estimate fits `budget`: the config keys to set; or the smallest estimate reached."""
    key = f"train.{stage}"
    trial = train.model_copy(deep=True)
    changes: dict[str, str] = {}

    def section() -> Any:
        return trial.sft if stage == "sft" else trial.dpo

    def levers() -> Any:
        if not trial.gradient_checkpointing:
            trial.gradient_checkpointing = True
            changes["gradient_checkpointing"] = "train.gradient_checkpointing: true"
            yield
        while section().per_device_batch_size > 1:
            s = section()
            s.gradient_accumulation_steps *= 2
            s.per_device_batch_size //= 2
            changes["batch"] = (f"{key}.per_device_batch_size: {s.per_device_batch_size} with "
                                f"{key}.gradient_accumulation_steps: {s.gradient_accumulation_steps} (same effective "
                                "batch)")
            yield
        while section().max_length > 128:
            section().max_length //= 2
            changes["length"] = f"{key}.max_length: {section().max_length}"
            yield

    best = estimate(trial, stage, shape, processes, cuda)
    for _ in levers():
        best = estimate(trial, stage, shape, processes, cuda)
        if best.bytes_per_process * processes <= budget:
            return f"fits with {'; '.join(changes.values())} (estimate {best.gib:.1f} GiB per process)"
    return f"even with all of them the estimate is {best.gib:.1f} GiB per process; use a machine with more memory"


def check_local_fit(train: TrainConfig, base_model_dir: str | Path, stages: list[str],
                    cuda: bool | None = None) -> list[str]:
    """Problems (one line each) for training stages of a local run whose estimate exceeds the memory
    available here; empty when everything fits. GPU memory is checked per device on CUDA hosts."""
    if cuda is None:  # without importing torch (seconds): a GPU node has the driver's device files
        cuda = Path("/dev/nvidiactl").exists()
    shape = ModelShape.from_config(base_model_dir)
    n = train.nproc_per_node
    if cuda:
        import torch

        budget, where = float(torch.cuda.mem_get_info()[0]) * n, "free GPU memory"
    else:
        budget, where = available_bytes(), "available memory"
    if os.environ.get("TUNELOOP_MEMORY_BUDGET_GIB"):  # tests and operators: pretend this much is free
        budget = float(os.environ["TUNELOOP_MEMORY_BUDGET_GIB"]) * GiB
    problems = []
    for stage in stages:
        est = estimate(train, stage, shape, n, cuda)
        if est.bytes_per_process * n > budget:
            problems.append(f"train.{stage}: estimated peak {est.describe()} x {n} processes = "
                            f"{est.gib * n:.1f} GiB, more than the {budget / GiB:.1f} GiB {where} here; "
                            + what_would_fit(train, stage, shape, n, cuda, budget))
    return problems
