"""Supervised fine-tuning worker: TRL SFTTrainer + a peft LoRA adapter, DeepSpeed via HF.

Run by the launcher on every rank: `python -m tuneloop.train.sft SPEC.json`.
Input records (from ingest) are chat-template-formatted `prompt` / `completion` strings, so
the loss is on the completion only.
"""

from __future__ import annotations

import time

from tuneloop.train.common import (JobSpec, load_jsonl, progress_callback, save_adapter, training_arguments,
                                   worker_main, write_result)


def train_sft(spec: JobSpec) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    # Build the arguments before loading the model: with ZeRO-3 that activates zero.Init,
    # so the weights are partitioned as they load.
    args = SFTConfig(**training_arguments(spec), completion_only_loss=True, packing=False)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model_dir, dtype=torch.float32)
    records = load_jsonl(spec.data_path)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    lora = LoraConfig(r=spec.lora["r"], lora_alpha=spec.lora["alpha"], lora_dropout=spec.lora["dropout"],
                      target_modules=spec.lora["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[progress_callback(spec)])
    trainer.train()
    save_adapter(trainer, spec, tokenizer)
    write_result(spec, trainer, started)


if __name__ == "__main__":
    worker_main("sft", train_sft)
