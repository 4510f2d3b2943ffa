"""Supervised fine-tuning worker: TRL SFTTrainer + a peft LoRA adapter (or QLoRA / full), DeepSpeed via HF.

Run by the launcher on every rank: `python -m tuneloop.train.sft SPEC.json`.
Input records (from ingest) are chat-template-formatted `prompt` / `completion` strings, so
the loss is on the completion only. With `packing` (the default) examples are packed best-fit
into rows of `max_length` tokens and run padding-free: position ids restart at each example, so
attention (flash-attention's varlen kernel, or SDPA with a block-diagonal mask) stays inside it.
"""

from __future__ import annotations

from typing import Any

from tuneloop.train.common import (load_jsonl, load_model, lora_config, records_dataset, run_training, trainer_arguments,
                                   worker_main)
from tuneloop.train.spec import JobSpec


def build_sft_trainer(spec: JobSpec, callbacks: list[Any]) -> tuple[Any, Any]:
    """The configured SFTTrainer and its tokenizer (also used by bench/train_throughput.py)."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # Build the arguments before loading the model: with ZeRO-3 that activates zero.Init,
    # so the weights are partitioned as they load.
    args = SFTConfig(**trainer_arguments(spec))
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    model = load_model(spec)
    records = load_jsonl(spec.data_path)
    dataset = records_dataset(spec, [{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(spec), callbacks=callbacks)
    return trainer, tokenizer


def train_sft(spec: JobSpec) -> None:
    run_training(spec, build_sft_trainer)


if __name__ == "__main__":
    worker_main("sft", train_sft)
