"""Reward-model worker: TRL RewardTrainer, a LoRA adapter (task SEQ_CLS) plus a 1-output score head on the base.

Run by the launcher on every rank: `python -m tuneloop.train.reward SPEC.json`. The data file (written by
stages/train.py reward_stage) holds preference pairs {prompt, chosen, rejected, slice, split}: the run's
preference.jsonl and the safety pairs (data/safety_pairs.py), each marked `train` or `eval`. Training uses the
`train` ones; afterwards every rank scores the held-out `eval` pairs together (under ZeRO-3 a forward pass needs
every rank) and rank 0 writes the pairwise accuracy per slice into train_metrics.json (`reward_eval`): the share
of pairs whose chosen answer gets the higher reward. The stage gates on it.

The adapter folder (adapter_model.safetensors with the LoRA weights and the score head, peft's modules_to_save)
is what the rl stage loads onto AutoModelForSequenceClassification(base, num_labels=1).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tuneloop.train.common import (load_jsonl, load_model, log, lora_config, rank, records_dataset, run_training,
                                   trainer_arguments, worker_main)
from tuneloop.train.spec import JobSpec

FIELDS = ("prompt", "chosen", "rejected")


def build_reward_trainer(spec: JobSpec, callbacks: list[Any]) -> tuple[Any, Any]:
    """The configured RewardTrainer and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**trainer_arguments(spec))  # before the model: ZeRO-3 partitions it as it loads
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(spec, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [r for r in load_jsonl(spec.data_path) if r.get("split", "train") == "train"]
    if not rows:
        raise ValueError(f"reward: no training pairs in {spec.data_path}")
    dataset = records_dataset(spec, [{k: r[k] for k in FIELDS} for r in rows])
    peft_config = lora_config(spec, task_type="SEQ_CLS") if spec.train.method != "full" else None
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=callbacks)
    return trainer, tokenizer


def pairwise_accuracy(spec: JobSpec, trainer: Any) -> dict[str, Any]:
    """Held-out pairwise accuracy per slice and overall; every rank runs the same forward passes (ZeRO-3)."""
    import torch

    held = [r for r in load_jsonl(spec.data_path) if r.get("split") == "eval"]
    if not held:
        return {"reward_eval": {"pairs": 0, "accuracy": None, "slices": {}}}
    from datasets import Dataset

    ds = trainer._prepare_dataset(Dataset.from_list([{"idx": i, **{k: r[k] for k in FIELDS}}
                                                     for i, r in enumerate(held)]),
                                  trainer.processing_class, trainer.args, "heldout")  # tokenized as in training
    kept = [held[i] for i in ds["idx"]]  # TRL drops pairs longer than max_length
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    model.eval()
    device = trainer.args.device
    bs = spec.train.reward.per_device_batch_size
    margins: list[float] = []
    with torch.no_grad():
        for i in range(0, len(ds), bs):
            batch = trainer.data_collator([{"chosen_ids": ds[j]["chosen_ids"], "rejected_ids": ds[j]["rejected_ids"]}
                                           for j in range(i, min(i + bs, len(ds)))])
            batch = {k: v.to(device) for k, v in batch.items() if hasattr(v, "to")}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            chosen, rejected = torch.chunk(out.logits.squeeze(-1).float(), chunks=2)
            margins += (chosen - rejected).tolist()
    per: dict[str, list[bool]] = defaultdict(list)
    for r, m in zip(kept, margins, strict=True):
        per[r.get("slice") or "preference"].append(m > 0)
    wins = [w for v in per.values() for w in v]
    result = {"pairs": len(wins), "accuracy": sum(wins) / len(wins) if wins else None,
              "mean_margin": sum(margins) / len(margins) if margins else None,
              "slices": {s: {"pairs": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(per.items())}}
    if rank() == 0:
        log.info("reward held-out pairwise accuracy %.3f over %d pairs; %s", result["accuracy"] or 0.0, len(wins),
                 ", ".join(f"{s} {v['accuracy']:.3f} ({v['pairs']})" for s, v in result["slices"].items()))
    return {"reward_eval": result}


def train_reward(spec: JobSpec) -> None:
    run_training(spec, build_reward_trainer, lambda trainer: pairwise_accuracy(spec, trainer))


if __name__ == "__main__":
    worker_main("reward", train_reward)
