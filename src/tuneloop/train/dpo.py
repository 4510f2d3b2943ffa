"""Preference-tuning worker: TRL DPOTrainer continuing the SFT LoRA adapter.

The reference model is the base with the adapter disabled (TRL does this when it is given a
PeftModel and no ref_model), so there is no second copy of the weights in memory; with
`precompute_ref_log_probs` the reference log-probs are computed once before training instead of
in every step. TRL 1.16 has no padding-free DPO (its `padding_free` falls back to padding).
Run by the launcher on every rank: `python -m tuneloop.train.dpo SPEC.json`.
"""

from __future__ import annotations

from typing import Any

from tuneloop.train.common import (load_jsonl, load_model, lora_config, records_dataset, run_training, trainer_arguments,
                                   worker_main)
from tuneloop.train.spec import JobSpec


def build_dpo_trainer(spec: JobSpec, callbacks: list[Any]) -> tuple[Any, Any]:
    """The configured DPOTrainer and its tokenizer (also used by bench/train_throughput.py)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**trainer_arguments(spec))
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    model = load_model(spec)
    if spec.train.method != "full":
        if spec.init_adapter_dir:
            model = PeftModel.from_pretrained(model, spec.init_adapter_dir, is_trainable=True)
        else:
            model = get_peft_model(model, lora_config(spec))
    records = load_jsonl(spec.data_path)
    dataset = records_dataset(spec, [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                     for r in records])
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=callbacks)
    return trainer, tokenizer


def train_dpo(spec: JobSpec) -> None:
    run_training(spec, build_dpo_trainer)


if __name__ == "__main__":
    worker_main("dpo", train_dpo)
