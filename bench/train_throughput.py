"""Training throughput: tuneloop's SFT and DPO paths against plain TRL with its default settings.

    python bench/train_throughput.py                                  # CPU, tiny random Llama
    python bench/train_throughput.py --device cuda --model-size 1b    # one GPU, random-init ~1B Llama

Same model config, same data, same LoRA, same micro-batch size, learning rate, max_length and step
count on both sides; each variant runs in a fresh process (so peak memory is its own), one
process per variant, no DeepSpeed (TRL's default; one device). What differs is what each side
does by default:
  tuneloop: the trainer built by tuneloop.train.sft/dpo (build_*_trainer) from a JobSpec with the
            config defaults: SFT packing (best-fit, padding-free), no gradient checkpointing,
            bf16 weights on GPU (fp32 on CPU), flash-attention 2 when installed else SDPA, Liger
            kernels on GPU when installed.
  TRL:      SFTTrainer / DPOTrainer given the model path: fp32 weights with bf16 autocast,
            gradient checkpointing on, no packing (each batch padded to its longest example).
Tokens are non-padding input tokens (Trainer's `include_num_input_tokens_seen="non_padding"`),
over the steps after the warm-up: tokens / (steps x median step time), so that a step slowed down by
another process does not count; on CPU both sides run with the same torch thread count (1 by
default, as tuneloop's CPU ranks do) and the variants run interleaved, best round counts. MFU counts model FLOPs (no recompute):
per token 2N forward + 2N backward through the frozen weights + 2N_trainable for weight grads +
causal attention, plus a reference forward for DPO, against the device's peak (bf16 dense
tensor-core peak on GPU; on CPU a measured fp32 matmul peak with the same threads).
The last line is `sft_speedup=<x> dpo_speedup=<y>` (tuneloop tokens/s / TRL tokens/s), plus
` mfu=<z>` (tuneloop SFT) on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

VARIANTS = ("sft-tuneloop", "sft-trl", "dpo-tuneloop", "dpo-trl")
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "L4": 121e12}
SIZES = {  # (hidden, layers, heads, kv heads, intermediate, max_length, per-device batch, steps, LoRA r)
    "tiny": (64, 2, 4, 2, 128, 128, 8, 30, 8),
    "1b": (2048, 16, 32, 8, 8192, 2048, 8, 20, 16),
}


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


def build_data(out: Path, model_dir: Path, size: str, n: int) -> tuple[Path, Path]:
    """Prompt/completion and preference records of varied length, chat-formatted like ingest's."""
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
    sft, pref = out / "sft.jsonl", out / "preference.jsonl"
    write_jsonl(sft, ({"prompt": prompt(text(3 * reps)), "completion": text(2 * reps) + "<|im_end|>\n"}
                      for _ in range(n)))
    write_jsonl(pref, ({"prompt": prompt(text(2 * reps)), "chosen": text(reps) + "<|im_end|>\n",
                        "rejected": text(reps) + "<|im_end|>\n"} for _ in range(n)))
    return sft, pref


def timer_callback(warmup: int):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        marks: list[tuple[int, float, int]] = []

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen or 0)))

        def rate(self) -> tuple[float, int, float]:
            """Tokens of the timed steps over (steps x median step time): a step slowed down by another
            process on a shared machine does not drag the figure down."""
            import statistics

            marks = self.marks[warmup - 1:]
            tokens = marks[-1][2] - marks[0][2]
            step_s = statistics.median(b[1] - a[1] for a, b in zip(marks, marks[1:]))
            return tokens / (step_s * (len(marks) - 1)), tokens, marks[-1][1] - marks[0][1]

    return Timer()


def flops_per_token(model_dir: Path, seq: float, trainable: int, dpo: bool) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    d, L, inter, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    n_matmul = L * (2 * d * d + 2 * d * kv + 3 * d * inter) + V * d  # linear layers + LM head
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


def run_variant(variant: str, model_dir: Path, data_dir: Path, size: str, device: str, steps: int) -> dict:
    import torch

    from tuneloop.jsonl import read_jsonl

    stage, side = variant.split("-")
    _, _, _, _, _, max_len, batch, _, r = SIZES[size]
    warmup = max(2, steps // 5)
    timer = timer_callback(warmup)
    data = data_dir / ("sft.jsonl" if stage == "sft" else "preference.jsonl")
    lr = 2e-4 if stage == "sft" else 5e-5
    lora = {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    if side == "tuneloop":
        from tuneloop.config import TrainConfig
        from tuneloop.train.spec import JobSpec

        hp = {"max_steps": steps, "epochs": 1.0, "learning_rate": lr, "per_device_batch_size": batch,
              "gradient_accumulation_steps": 1, "max_length": max_len, "logging_steps": 10 ** 6}
        if stage == "sft":
            from tuneloop.train.sft import build_sft_trainer as build

            hp["packing"] = True
        else:
            from tuneloop.train.dpo import build_dpo_trainer as build

            hp.update(beta=0.1, precompute_ref_log_probs=False)
        import importlib.util

        train = TrainConfig.model_validate({stage: hp, "lora": lora, "deepspeed": "none",
                                            "liger_kernels": device == "cuda"
                                            and importlib.util.find_spec("liger_kernel") is not None})
        spec = JobSpec(stage=stage, base_model_dir=str(model_dir), data_path=str(data), output_dir=str(out),
                       train=train)
        trainer, _ = build(spec, [timer])
    else:
        from datasets import load_dataset
        from peft import LoraConfig

        peft_config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=lora["target_modules"],
                                 task_type="CAUSAL_LM")
        common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                      max_length=max_len, report_to="none", logging_steps=10 ** 6, save_strategy="no",
                      disable_tqdm=True, include_num_input_tokens_seen="non_padding", seed=42,
                      use_cpu=device == "cpu")  # TRL's default bf16=True refuses a CPU host without it
        dataset = load_dataset("json", data_files=str(data), split="train")
        if stage == "sft":
            from trl import SFTConfig, SFTTrainer

            trainer = SFTTrainer(model=str(model_dir), args=SFTConfig(**common), train_dataset=dataset,
                                 peft_config=peft_config, callbacks=[timer])
        else:
            from trl import DPOConfig, DPOTrainer

            trainer = DPOTrainer(model=str(model_dir), args=DPOConfig(**common), train_dataset=dataset,
                                 peft_config=peft_config, callbacks=[timer])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    tps, tokens, seconds = timer.rate()
    examples = read_jsonl(data)
    tok = trainer.processing_class
    keys = ("prompt", "completion") if stage == "sft" else ("prompt", "chosen")
    seq = sum(min(max_len, sum(len(tok(e[k])["input_ids"]) for k in keys)) for e in examples[:64]) / min(64, len(examples))
    peak_mem = (torch.cuda.max_memory_allocated() if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "tokens_per_s": tps, "tokens": tokens, "seconds": seconds, "steps": steps,
            "warmup_steps": warmup, "peak_memory_bytes": peak_mem, "trainable": trainable,
            "flops_per_token": flops_per_token(model_dir, seq, trainable, stage == "dpo"),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "bf16": bool(trainer.args.bf16),
            "packing": bool(getattr(trainer.args, "packing", False)),
            "attention": trainer.model.config._attn_implementation}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model-size", choices=sorted(SIZES), default=None, help="default: tiny on cpu, 1b on cuda")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant")
    ap.add_argument("--examples", type=int, default=None, help="records in the synthetic data set")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds over the variants, interleaved; the best round of each counts (default: 2 on "
                         "CPU, 1 on CUDA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads per process, the same for both sides (tuneloop runs 1 per rank)")
    ap.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    size = a.model_size or ("tiny" if a.device == "cpu" else "1b")
    steps = a.steps or SIZES[size][7]
    if a.run:  # one variant, in its own process
        import logging

        logging.basicConfig(level=logging.WARNING)
        for noisy in ("transformers", "datasets", "trl", "tuneloop"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        if a.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            import torch

            torch.set_num_threads(a.threads)
        a.out.write_text(json.dumps(run_variant(a.run, a.model_dir, a.data_dir, size, a.device, steps)))
        return

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    work = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    model_dir = build_model(work / "model", size)
    n = a.examples or steps * SIZES[size][6] * 4
    data_dir = work / "data"
    build_data(data_dir, model_dir, size, n)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    peak, peak_desc = device_peak(a.device)
    repeats = a.repeats or (2 if a.device == "cpu" else 1)
    by: dict[str, dict] = {}
    for _ in range(repeats):
        for variant in VARIANTS:
            out = work / f"{variant}.json"
            cmd = [sys.executable, __file__, "--run", variant, "--device", a.device, "--model-size", size,
                   "--steps", str(steps), "--model-dir", str(model_dir), "--data-dir", str(data_dir),
                   "--out", str(out), "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"{variant} failed (exit {proc.returncode})")
            row = json.loads(out.read_text())
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
            row["rounds"] = [*by.get(variant, {}).get("rounds", []), round(row["tokens_per_s"])]
            if variant not in by or row["tokens_per_s"] > by[variant]["tokens_per_s"]:
                by[variant] = {**row, "rounds": row["rounds"]}
            else:
                by[variant]["rounds"] = row["rounds"]
    rows = [by[v] for v in VARIANTS]
    print(f"device: {peak_desc}; model: {size} random-init Llama; {steps} steps per variant "
          f"({rows[0]['warmup_steps']} warm-up), micro-batch {SIZES[size][6]}, max_length {SIZES[size][5]}; "
          f"best of {repeats} interleaved round(s)")
    print(f"{'variant':<14}{'tokens/s':>12}{'MFU':>9}{'peak mem':>11}  settings (tokens/s of each round)")
    for r in rows:
        mem = r["peak_memory_bytes"] / 2 ** 30
        print(f"{r['variant']:<14}{r['tokens_per_s']:>12.0f}{100 * r['mfu']:>8.2f}%{mem:>9.2f}GiB  "
              f"packing={r['packing']} grad_ckpt={r['gradient_checkpointing']} bf16={r['bf16']} "
              f"attn={r['attention']} {r['rounds']}")
    sft = by["sft-tuneloop"]["tokens_per_s"] / by["sft-trl"]["tokens_per_s"]
    dpo = by["dpo-tuneloop"]["tokens_per_s"] / by["dpo-trl"]["tokens_per_s"]
    if a.json:
        a.json.write_text(json.dumps({"device": peak_desc, "size": size, "rows": rows, "sft_speedup": sft,
                                      "dpo_speedup": dpo}, indent=2))
    last = f"sft_speedup={sft:.2f} dpo_speedup={dpo:.2f}"
    if a.device == "cuda":
        last += f" mfu={by['sft-tuneloop']['mfu']:.3f}"
    print(last)


if __name__ == "__main__":
    main()
