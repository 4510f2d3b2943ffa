"""Training throughput: tuneloop's SFT, DPO, reward and RL paths against plain TRL with its default settings.

    python bench/train_throughput.py                                  # CPU, tiny random Llama, all four stages
    python bench/train_throughput.py --device cuda --model-size 1b    # one GPU, random-init ~1B Llama
    python bench/train_throughput.py --stages reward,rl               # a subset of the stages

Same model config, same data, same LoRA (r, alpha = 2r, no dropout, q/k/v/o), same micro-batch size,
learning rate, max_length and step count on both sides; each variant runs in a fresh process (so peak
memory is its own), one process per variant, no DeepSpeed (TRL's default; one device). What differs is
what each side does by default:
  tuneloop: the trainer built by tuneloop.train.sft/dpo/reward/rl (build_*_trainer) from a JobSpec with the
            config defaults: SFT packing (best-fit, padding-free), no gradient checkpointing, bf16 weights on
            GPU (fp32 on CPU), flash-attention 2 when installed else SDPA; Liger kernels on GPU when installed
            for SFT and DPO (reward and RL keep the config default, off).
  TRL:      SFTTrainer / DPOTrainer / RewardTrainer / RLOOTrainer given the model path: fp32 weights with
            bf16 autocast, gradient checkpointing on, SDPA, no packing (each batch padded to its longest
            example).
Per stage:
  sft     tokens: prompt + completion. tuneloop packs, TRL pads.
  dpo     tokens: prompt + chosen and prompt + rejected, policy and reference forward on both sides.
  reward  the preference pairs, a LoRA (task SEQ_CLS) plus the 1-output score head on
          AutoModelForSequenceClassification(num_labels=1), learning rate 1e-4 (both defaults). Both sides pad
          each batch of chosen + rejected rows to its longest and drop pairs over max_length (TRL's collator and
          filter; TRL 1.16 has no padding-free reward path). tuneloop also centres the rewards
          (center_rewards_coefficient 0.01, TRL's default none): a negligible extra term in the loss.
  rl      RLOO on the unique preference prompts: per step one generation batch of `micro-batch` completions
          (micro-batch / num_generations prompts x num_generations), sampled at temperature 1 up to
          max_completion_length new tokens, scored by a reward model, a reference forward (beta 0.05) and the
          policy's forward and backward; learning rate 1e-5 (tuneloop's default; TRL's is 1e-6), num_generations
          and max_completion_length as RL_SIZES says (TRL's defaults 2 and 512 are overridden to match).
          tuneloop: the policy is the base plus an SFT-stage LoRA adapter (a saved adapter with peft's own
          initialisation, B = 0, so it starts as the base model, like TRL's fresh LoRA), retrained; the
          reference is that adapter copied as `ref`; rollouts through vLLM (colocated) when CUDA and vllm are
          present, else transformers' generate (`--rl-generation` forces one); bf16/flash-attention as above.
          TRL: the base with a fresh LoRA from peft_config, the reference is the base (adapter disabled),
          rollouts through transformers' generate (use_vllm off), fp32 weights with bf16 autocast, gradient
          checkpointing on. The reward model is the same weights on both sides, fp32 on both: the base as
          AutoModelForSequenceClassification(num_labels=1) with a random SEQ_CLS LoRA and score head, saved once;
          tuneloop gets that adapter folder (train/rl.py load_reward_model merges it onto the base), TRL the
          merged model saved as a folder (reward_funcs=path, which TRL loads in its saved dtype, fp32).
Throughput: sft, dpo and reward count non-padding input tokens (Trainer's
`include_num_input_tokens_seen="non_padding"`; for reward that is the chosen and the rejected rows); rl counts
completion tokens (the tokens generated per step, to EOS or max_completion_length, from the completion lengths
TRL records per generation batch; on a random-init model nearly every completion runs to the limit, and the
clipped share is printed). Each is over the steps after the warm-up: work / (steps x median step time), so that
a step slowed down by another process does not count; on CPU both sides run with the same torch thread count
(1 by default, as tuneloop's CPU ranks do) and the variants run interleaved, best round counts. MFU counts
model FLOPs (no recompute): per token 2N forward + 2N backward through the frozen weights + 2N_trainable for
weight grads + causal attention, plus a reference forward for DPO; for reward N has the 1-output score head
instead of the LM head. It is against the device's peak (bf16 dense tensor-core peak on GPU; on CPU a measured
fp32 matmul peak with the same threads). RL has no MFU ("-"): its step is mostly token-by-token generation, whose
FLOPs per completion token do not say how busy the device was.
The last line is `sft_speedup=<x> dpo_speedup=<y> reward_speedup=<z> rl_speedup=<w>` (tuneloop / TRL, in each
stage's unit; only the stages run), plus ` mfu=<z>` (tuneloop SFT) on CUDA when SFT ran.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # as PYTHONWARNINGS below does for the variants' processes
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

STAGES = ("sft", "dpo", "reward", "rl")
VARIANTS = tuple(f"{stage}-{side}" for stage in STAGES for side in ("tuneloop", "trl"))
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "L4": 121e12}
SIZES = {  # (hidden, layers, heads, kv heads, intermediate, max_length, per-device batch, steps, LoRA r)
    "tiny": (64, 2, 4, 2, 128, 128, 8, 30, 8),
    "1b": (2048, 16, 32, 8, 8192, 2048, 8, 20, 16),
}
RL_SIZES = {  # (num_generations, max_completion_length, steps); the micro-batch (completions per step) is SIZES'
    "tiny": (4, 32, 30),
    "1b": (4, 256, 10),
}
LR = {"sft": 2e-4, "dpo": 5e-5, "reward": 1e-4, "rl": 1e-5}  # tuneloop's defaults (TRL's: 2e-5, 1e-6, 1e-4, 1e-6)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RL_BETA = 0.05  # tuneloop's and TRL's default
UNITS = {"sft": "tokens", "dpo": "tokens", "reward": "tokens", "rl": "compl. tokens"}


def build_model(out: Path, size: str) -> Path:
    """A random-init Llama of the size (nothing downloaded) with tuneloop's tiny BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneloop.tiny import build_tiny_model

    build_tiny_model(out)
    if size == "tiny":
        return out
    hidden, layers, heads, kv, inter, max_len, *_ = SIZES[size]
    cfg = json.loads((out / "config.json").read_text())
    config = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=max(4096, max_len), eos_token_id=cfg["eos_token_id"],
                         pad_token_id=cfg["pad_token_id"], bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)  # fp32 on disk: each side loads it in the dtype its defaults choose
    return out


def build_data(out: Path, model_dir: Path, size: str, n: int) -> tuple[Path, Path, Path]:
    """Prompt/completion and preference records of varied length, chat-formatted like ingest's, and the
    preference prompts once each (sorted, as tuneloop's rl worker reads them) for RL."""
    from transformers import AutoTokenizer

    from tuneloop.jsonl import write_jsonl
    from tuneloop.tiny import demo_texts

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [t for t in demo_texts() if t.strip()]
    rng = random.Random(0)
    reps = 1 if size == "tiny" else 24  # the 1b run needs long examples (hundreds to ~1.5k tokens)

    def text(k: int) -> str:
        return " ".join(rng.choice(texts) for _ in range(rng.randint(1, k)))

    def prompt(t: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)

    out.mkdir(parents=True, exist_ok=True)
    sft, pref, prompts = out / "sft.jsonl", out / "preference.jsonl", out / "prompts.jsonl"
    write_jsonl(sft, ({"prompt": prompt(text(3 * reps)), "completion": text(2 * reps) + "<|im_end|>\n"}
                      for _ in range(n)))
    pairs = [{"prompt": prompt(text(2 * reps)), "chosen": text(reps) + "<|im_end|>\n",
              "rejected": text(reps) + "<|im_end|>\n"} for _ in range(n)]
    write_jsonl(pref, pairs)
    write_jsonl(prompts, ({"prompt": p} for p in sorted({r["prompt"] for r in pairs})))
    return sft, pref, prompts


def build_rl_models(out: Path, model_dir: Path, r: int) -> None:
    """What the rl variants start from, made once and shared by both sides:
    out/sft_adapter: an SFT-stage LoRA adapter (the variants' r, alpha, targets) with peft's own initialisation
      (B = 0): tuneloop's rl stage continues such an adapter; as B = 0 its policy starts as the base model, as
      TRL's fresh LoRA does, so both sides sample from the same model at the start.
    out/reward_adapter: a reward-stage adapter (task SEQ_CLS, random LoRA weights and score head) with the
      tokenizer, as tuneloop's reward stage saves it; its rl worker merges it onto the base.
    out/reward_model: the same merged (base + adapter, score head) as one save_pretrained folder for TRL's
      reward_funcs=path. Both sides score with the same fp32 weights."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the score head is new: not worth a load report
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(1)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    policy.save_pretrained(str(out / "sft_adapter"))
    tok.save_pretrained(str(out / "sft_adapter"))
    del policy
    rm = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    rm = get_peft_model(rm, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS,
                                       task_type="SEQ_CLS", init_lora_weights=False))
    rm.save_pretrained(str(out / "reward_adapter"))
    tok.save_pretrained(str(out / "reward_adapter"))
    merged = rm.merge_and_unload()
    merged.save_pretrained(str(out / "reward_model"))
    tok.save_pretrained(str(out / "reward_model"))


def timer_callback(warmup: int):
    """Marks (step, time, work so far) at every step end. The work is Trainer's input-token count, or, with
    `.completion_tokens_of` set to an RLOO trainer, the completion tokens generated so far."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[int, float, int]] = []
            self.completion_tokens_of = None  # an RLOOTrainer / GRPOTrainer
            self.completion_tokens = 0.0
            self.lengths_seen = 0
            self.clipped: list[float] = []

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def work(self, state) -> int:  # noqa: ANN001
            trainer = self.completion_tokens_of
            if trainer is None:
                return int(state.num_input_tokens_seen or 0)
            # TRL appends the mean completion length of each generation batch to this list (cleared only when it
            # logs, which the variants never do before the end)
            metrics = trainer._metrics["train"]
            lengths = metrics["completions/mean_length"]
            new = lengths[self.lengths_seen:] if len(lengths) >= self.lengths_seen else lengths
            self.completion_tokens += sum(new) * trainer.args.generation_batch_size
            self.lengths_seen = len(lengths)
            self.clipped = list(metrics["completions/clipped_ratio"])
            return round(self.completion_tokens)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), self.work(state)))

        def rate(self) -> tuple[float, int, float, float]:
            """Work of the timed steps over (steps x median step time): a step slowed down by another process on
            a shared machine does not drag the figure down. Also the work, wall time and median step time."""
            import statistics

            marks = self.marks[warmup - 1:]
            work = marks[-1][2] - marks[0][2]
            step_s = statistics.median(b[1] - a[1] for a, b in zip(marks, marks[1:]))
            return work / (step_s * (len(marks) - 1)), work, marks[-1][1] - marks[0][1], step_s

    return Timer()


def flops_per_token(model_dir: Path, seq: float, trainable: int, dpo: bool, score_head: bool = False) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    d, L, inter, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    head = d if score_head else V * d  # reward: the 1-output score head instead of the LM head
    n_matmul = L * (2 * d * d + 2 * d * kv + 3 * d * inter) + head  # linear layers + head
    attn_fwd = 2 * L * d * seq  # QK^T and AV, 2 flops per MAC, causal half
    per_token = 2 * n_matmul + attn_fwd + 2 * n_matmul + 2 * attn_fwd + 2 * trainable
    if dpo:
        per_token += 2 * n_matmul + attn_fwd  # the reference forward
    return per_token


def device_peak(device: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name}, bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
        raise SystemExit(f"unknown GPU {name!r}: add its bf16 peak to GPU_PEAK_BF16")
    a = torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(20):  # best of 20: the machine may be shared
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    peak = 2 * 1024 ** 3 / best
    return peak, f"CPU, measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s with {torch.get_num_threads()} thread(s)"


def run_variant(variant: str, model_dir: Path, data_dir: Path, size: str, device: str, steps: int,
                rl_dir: Path | None = None, rl_generation: str = "auto") -> dict:
    import torch

    from tuneloop.jsonl import read_jsonl

    stage, side = variant.split("-")
    _, _, _, _, _, max_len, batch, _, r = SIZES[size]
    num_generations, completion_len, _ = RL_SIZES[size]
    warmup = max(2, steps // 5)
    timer = timer_callback(warmup)
    data = data_dir / {"sft": "sft.jsonl", "dpo": "preference.jsonl", "reward": "preference.jsonl",
                       "rl": "prompts.jsonl"}[stage]
    lr = LR[stage]
    task = "SEQ_CLS" if stage == "reward" else "CAUSAL_LM"
    lora = {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": TARGETS}
    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    if side == "tuneloop":
        import importlib.util

        from tuneloop.config import TrainConfig
        from tuneloop.train.spec import JobSpec

        hp = {"max_steps": steps, "epochs": 1.0, "learning_rate": lr, "per_device_batch_size": batch,
              "gradient_accumulation_steps": 1, "logging_steps": 10 ** 6}
        extra: dict = {}
        if stage == "sft":
            from tuneloop.train.sft import build_sft_trainer as build

            hp.update(packing=True, max_length=max_len)
        elif stage == "dpo":
            from tuneloop.train.dpo import build_dpo_trainer as build

            hp.update(beta=0.1, precompute_ref_log_probs=False, max_length=max_len)
        elif stage == "reward":
            from tuneloop.train.reward import build_reward_trainer as build

            hp["max_length"] = max_len
        else:
            from tuneloop.train.rl import build_rl_trainer as build

            hp.update(trainer="rloo", num_generations=num_generations, max_completion_length=completion_len,
                      beta=RL_BETA, temperature=1.0, generation=rl_generation)
            extra = {"init_adapter_dir": str(rl_dir / "sft_adapter"),
                     "reward_adapter_dir": str(rl_dir / "reward_adapter")}
        liger = (stage in ("sft", "dpo") and device == "cuda" and importlib.util.find_spec("liger_kernel") is not None)
        train = TrainConfig.model_validate({stage: hp, "lora": lora, "deepspeed": "none", "liger_kernels": liger})
        spec = JobSpec(stage=stage, base_model_dir=str(model_dir), data_path=str(data), output_dir=str(out),
                       train=train, **extra)
        trainer, _ = build(spec, [timer])
    else:
        from datasets import load_dataset
        from peft import LoraConfig

        peft_config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, task_type=task)
        common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                      report_to="none", logging_steps=10 ** 6, save_strategy="no", disable_tqdm=True, seed=42,
                      use_cpu=device == "cpu")  # TRL's default bf16=True refuses a CPU host without it
        if stage != "rl":  # RLOO counts its prompt and completion tokens itself
            common.update(max_length=max_len, include_num_input_tokens_seen="non_padding")
        dataset = load_dataset("json", data_files=str(data), split="train")
        if stage == "sft":
            from trl import SFTConfig, SFTTrainer

            trainer = SFTTrainer(model=str(model_dir), args=SFTConfig(**common), train_dataset=dataset,
                                 peft_config=peft_config, callbacks=[timer])
        elif stage == "dpo":
            from trl import DPOConfig, DPOTrainer

            trainer = DPOTrainer(model=str(model_dir), args=DPOConfig(**common), train_dataset=dataset,
                                 peft_config=peft_config, callbacks=[timer])
        elif stage == "reward":
            from trl import RewardConfig, RewardTrainer

            trainer = RewardTrainer(model=str(model_dir), args=RewardConfig(**common), train_dataset=dataset,
                                    peft_config=peft_config, callbacks=[timer])
        else:
            from trl import RLOOConfig, RLOOTrainer

            args = RLOOConfig(**common, num_generations=num_generations, max_completion_length=completion_len,
                              beta=RL_BETA, temperature=1.0)
            trainer = RLOOTrainer(model=str(model_dir), reward_funcs=str(rl_dir / "reward_model"), args=args,
                                  train_dataset=dataset, peft_config=peft_config, callbacks=[timer])
    if stage == "rl":
        timer.completion_tokens_of = trainer
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    rate, work, seconds, step_s = timer.rate()
    row = {"variant": variant, "stage": stage, "unit": UNITS[stage], "rate": rate, "work": work, "seconds": seconds,
           "median_step_s": step_s, "steps": steps, "warmup_steps": warmup, "trainable": trainable,
           "gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "bf16": bool(trainer.args.bf16),
           "packing": bool(getattr(trainer.args, "packing", False)),
           "attention": trainer.model.config._attn_implementation,
           "peak_memory_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    if stage == "rl":
        gen_batch = trainer.args.generation_batch_size
        row.update(flops_per_token=None, completions_per_s=gen_batch / step_s, generation_batch=gen_batch,
                   num_generations=num_generations, max_completion_length=completion_len,
                   generation="vllm" if trainer.args.use_vllm else "transformers",
                   mean_completion_length=work / (gen_batch * (len(timer.marks) - warmup)),
                   clipped_share=sum(timer.clipped) / len(timer.clipped) if timer.clipped else None)
    else:
        examples = read_jsonl(data)
        tok = trainer.processing_class
        keys = ("prompt", "completion") if stage == "sft" else ("prompt", "chosen")
        seq = sum(min(max_len, sum(len(tok(e[k])["input_ids"]) for k in keys))
                  for e in examples[:64]) / min(64, len(examples))
        row["flops_per_token"] = flops_per_token(model_dir, seq, trainable, stage == "dpo", stage == "reward")
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where every variant trains: cpu (default) or cuda (one GPU, the first visible)")
    ap.add_argument("--model-size", choices=sorted(SIZES), default=None,
                    help="random-init Llama: tiny (2 layers, hidden 64, max_length 128) or 1b (16 layers, hidden "
                         "2048, max_length 2048); default: tiny on cpu, 1b on cuda")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated stages to compare, each as a tuneloop and a TRL variant: "
                         + ", ".join(STAGES) + " (default: all)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps per sft, dpo and reward variant (default: 30 tiny, 20 1b)")
    ap.add_argument("--rl-steps", type=int, default=None,
                    help="optimizer steps per rl variant, one generation batch each (default: "
                         + ", ".join(f"{RL_SIZES[s][2]} {s}" for s in RL_SIZES) + "); rl uses "
                         + "; ".join(f"{s}: num_generations {RL_SIZES[s][0]}, max_completion_length {RL_SIZES[s][1]}"
                                     for s in RL_SIZES))
    ap.add_argument("--rl-generation", choices=["auto", "transformers", "vllm"], default="auto",
                    help="rollout engine of the rl-tuneloop variant (train.rl.generation): auto is tuneloop's "
                         "default, vLLM colocated where CUDA and vllm are present, else transformers' generate; "
                         "TRL's side always uses its default, transformers' generate (default: auto)")
    ap.add_argument("--examples", type=int, default=None,
                    help="records in each synthetic data set (default: 4 x steps x micro-batch)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write every figure (each variant's best round, with every round's rate) to this "
                         "JSON file")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds over the variants, interleaved; the best round of each counts (default: 2 on "
                         "CPU, 1 on CUDA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads per process, the same for both sides (tuneloop runs 1 per rank; "
                         "default: 1)")
    ap.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rl-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    size = a.model_size or ("tiny" if a.device == "cpu" else "1b")
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        ap.error(f"--stages: {', '.join(unknown) or 'none given'}; choose from {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    steps = a.steps or SIZES[size][7]
    rl_steps = a.rl_steps or RL_SIZES[size][2]
    if a.run:  # one variant, in its own process
        import logging

        logging.basicConfig(level=logging.WARNING)
        for noisy in ("transformers", "datasets", "trl", "tuneloop", "peft"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        if a.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            import torch

            torch.set_num_threads(a.threads)
        own_steps = rl_steps if a.run.startswith("rl-") else steps
        row = run_variant(a.run, a.model_dir, a.data_dir, size, a.device, own_steps, a.rl_dir, a.rl_generation)
        a.out.write_text(json.dumps(row))
        return

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    work = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    model_dir = build_model(work / "model", size)
    n = a.examples or steps * SIZES[size][6] * 4
    data_dir = work / "data"
    build_data(data_dir, model_dir, size, n)
    rl_dir = work / "rl"
    if "rl" in stages:
        build_rl_models(rl_dir, model_dir, SIZES[size][8])
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    peak, peak_desc = device_peak(a.device)
    repeats = a.repeats or (2 if a.device == "cpu" else 1)
    variants = [v for v in VARIANTS if v.split("-")[0] in stages]
    by: dict[str, dict] = {}
    for _ in range(repeats):
        for variant in variants:
            out = work / f"{variant}.json"
            cmd = [sys.executable, __file__, "--run", variant, "--device", a.device, "--model-size", size,
                   "--steps", str(steps), "--rl-steps", str(rl_steps), "--model-dir", str(model_dir),
                   "--data-dir", str(data_dir), "--rl-dir", str(rl_dir), "--rl-generation", a.rl_generation,
                   "--out", str(out), "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"{variant} failed (exit {proc.returncode})")
            row = json.loads(out.read_text())
            row["mfu"] = row["rate"] * row["flops_per_token"] / peak if row["flops_per_token"] else None
            row["rounds"] = [*by.get(variant, {}).get("rounds", []), round(row["rate"])]
            if variant not in by or row["rate"] > by[variant]["rate"]:
                by[variant] = row
            else:
                by[variant]["rounds"] = row["rounds"]
    rows = [by[v] for v in variants]
    head = [f"device: {peak_desc}; model: {size} random-init Llama; micro-batch {SIZES[size][6]}, "
            f"max_length {SIZES[size][5]}; best of {repeats} interleaved round(s)"]
    if set(stages) - {"rl"}:
        head.append(f"{'/'.join(s for s in stages if s != 'rl')}: {steps} steps per variant "
                    f"({max(2, steps // 5)} warm-up)")
    if "rl" in stages:
        g, c, _ = RL_SIZES[size]
        head.append(f"rl: {rl_steps} steps per variant ({max(2, rl_steps // 5)} warm-up), RLOO, "
                    f"{SIZES[size][6] // g} prompts x {g} generations per step, max_completion_length {c}")
    print("; ".join(head))
    print(f"{'variant':<16}{'per s':>10} {'unit':<14}{'MFU':>8}{'peak mem':>11}  settings (per s of each round)")
    for r in rows:
        mem = r["peak_memory_bytes"] / 2 ** 30
        mfu = f"{100 * r['mfu']:>7.2f}%" if r["mfu"] is not None else f"{'-':>8}"
        settings = (f"packing={r['packing']} grad_ckpt={r['gradient_checkpointing']} bf16={r['bf16']} "
                    f"attn={r['attention']}")
        if r["stage"] == "rl":
            clipped = "-" if r["clipped_share"] is None else f"{r['clipped_share']:.2f}"
            settings += (f" gen={r['generation']} completions/s={r['completions_per_s']:.2f} "
                         f"mean_len={r['mean_completion_length']:.1f} clipped={clipped}")
        print(f"{r['variant']:<16}{r['rate']:>10.0f} {r['unit']:<14}{mfu}{mem:>9.2f}GiB  {settings} {r['rounds']}")
    speedups = {s: by[f"{s}-tuneloop"]["rate"] / by[f"{s}-trl"]["rate"] for s in stages}
    if a.json:
        a.json.write_text(json.dumps({"device": peak_desc, "size": size, "rows": rows,
                                      **{f"{s}_speedup": v for s, v in speedups.items()}}, indent=2))
    last = " ".join(f"{s}_speedup={v:.2f}" for s, v in speedups.items())
    if a.device == "cuda" and "sft" in stages:
        last += f" mfu={by['sft-tuneloop']['mfu']:.3f}"
    shutil.rmtree(work, ignore_errors=True)  # the models: ~4 GB each at 1b
    print(last)


if __name__ == "__main__":
    main()
