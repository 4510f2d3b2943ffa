"""Preference-tuning worker: TRL DPOTrainer continuing the SFT LoRA adapter.

The reference model is the base with the adapter disabled (TRL does this when it is given a
PeftModel and no ref_model), so there is no second copy of the weights in memory.
Run by the launcher on every rank: `python -m tuneloop.train.dpo SPEC.json`.
"""

from __future__ import annotations

import time

from tuneloop.train.common import (JobSpec, load_jsonl, progress_callback, save_adapter, training_arguments,
                                   worker_main, write_result)


def train_dpo(spec: JobSpec) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    args = DPOConfig(**training_arguments(spec), beta=spec.hparams["beta"])
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model_dir, dtype=torch.float32)
    if spec.init_adapter_dir:
        model = PeftModel.from_pretrained(model, spec.init_adapter_dir, is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(
            r=spec.lora["r"], lora_alpha=spec.lora["alpha"], lora_dropout=spec.lora["dropout"],
            target_modules=spec.lora["target_modules"], task_type="CAUSAL_LM"))
    records = load_jsonl(spec.data_path)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                 for r in records])
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[progress_callback(spec)])
    trainer.train()
    save_adapter(trainer, spec, tokenizer)
    write_result(spec, trainer, started)


if __name__ == "__main__":
    worker_main("dpo", train_dpo)
