"""Supervised fine-tuning worker: TRL SFTTrainer + a peft LoRA adapter (or QLoRA / full), DeepSpeed via HF.

Run by the launcher on every rank: `python -m tuneloop.train.sft SPEC.json`.
Input records (from ingest) are chat-template-formatted `prompt` / `completion` strings, so
the loss is on the completion only. With `packing` (the default) examples are packed best-fit
into rows of `max_length` tokens and run padding-free: position ids restart at each example, so
attention (flash-attention's varlen kernel, or SDPA with a block-diagonal mask) stays inside it.

With an init adapter in the spec (`train.sft.init: champion`: the champion's adapter, or its EWC anchor
folder) SFT continues that adapter instead of training a fresh one. With `train.sft.ewc.lambda_ > 0`
the trainer is `EWCSFTTrainer`: TRL's SFTTrainer whose loss adds the EWC penalty toward that adapter
(train/ewc.py: formula, reference, and how it is split over ZeRO-3 partitions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.train.common import (load_jsonl, load_model, lora_config, records_dataset, run_training, trainer_arguments,
                                   worker_main)
from tuneloop.train.spec import JobSpec


def ewc_trainer_class() -> type:
    """TRL's SFTTrainer with the EWC penalty added to the training loss (built lazily: trl is heavy)."""
    from trl import SFTTrainer

    from tuneloop.train.ewc import EWCPenalty

    class EWCSFTTrainer(SFTTrainer):
        """compute_loss = SFT loss + lambda/2 * sum_i F_i (theta_i - theta*_i)^2 (train/ewc.py).

        The penalty is built at the first training step, when the DeepSpeed engine exists (ZeRO-3 has
        partitioned the LoRA parameters by then). It must count once per optimizer step: the Trainer divides
        a loss by the gradient-accumulation steps unless it was already normalized by the number of items
        in the whole accumulated batch; in that case the penalty is divided here instead."""

        def __init__(self, *args: Any, ewc_anchor: str, ewc_lambda: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ewc_anchor, self.ewc_lambda = ewc_anchor, ewc_lambda
            self.ewc: EWCPenalty | None = None
            self.ewc_history: list[tuple[int, float]] = []

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if self.model.training:
                import torch.distributed as dist

                if self.ewc is None:
                    self.ewc = EWCPenalty(self.model, self.ewc_anchor, self.ewc_lambda)
                term, local = self.ewc()
                scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
                    (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)
                loss = loss + (term / self.current_gradient_accumulation_steps if scaled else term).to(loss.dtype)
                full = local.clone()
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(full)  # sum of the ranks' local penalties = the full penalty
                self._metrics["train"]["ewc_penalty"].append(float(full))
                self.ewc_history.append((self.state.global_step, float(full)))
            return (loss, outputs) if return_outputs else loss

    return EWCSFTTrainer


def ewc_report_callback(spec: JobSpec) -> Any:
    """Rank 0 writes OUTPUT/ewc.json when training ends: the penalty's settings, how it was split over the
    ranks, and its value over the steps (first, last, history)."""
    from transformers import TrainerCallback

    from tuneloop.train.common import rank

    class EWCReport(TrainerCallback):
        trainer: Any = None

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            t = self.trainer
            if rank() != 0 or t is None or t.ewc is None:
                return
            hist = t.ewc_history
            anchor_info = Path(spec.init_adapter_dir or "") / "ewc.json"
            (Path(spec.output_dir) / "ewc.json").write_text(json.dumps({
                **t.ewc.describe(), "anchor": spec.init_adapter_dir,
                "fisher": json.loads(anchor_info.read_text()).get("fisher") if anchor_info.exists() else None,
                "first_penalty": hist[0][1] if hist else None, "last_penalty": hist[-1][1] if hist else None,
                "history": hist}, indent=2))

    return EWCReport()


def build_sft_trainer(spec: JobSpec, callbacks: list[Any]) -> tuple[Any, Any]:
    """The configured SFTTrainer and its tokenizer (also used by bench/train_throughput.py)."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # Build the arguments before loading the model: with ZeRO-3 that activates zero.Init,
    # so the weights are partitioned as they load.
    args = SFTConfig(**trainer_arguments(spec))
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    model = load_model(spec)
    peft_config = lora_config(spec)
    if spec.init_adapter_dir and spec.train.method != "full":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.init_adapter_dir, is_trainable=True)  # continue it
        peft_config = None
    records = load_jsonl(spec.data_path)
    dataset = records_dataset(spec, [{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    ewc = spec.train.sft.ewc
    if ewc.lambda_ > 0:
        if not spec.init_adapter_dir:
            raise ValueError("train.sft.ewc.lambda_ > 0: the SFT job has no init adapter (the champion's EWC anchor)")
        report = ewc_report_callback(spec)
        trainer = ewc_trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                      peft_config=peft_config, callbacks=[*callbacks, report],
                                      ewc_anchor=spec.init_adapter_dir, ewc_lambda=ewc.lambda_)
        report.trainer = trainer
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=callbacks)
    return trainer, tokenizer


def train_sft(spec: JobSpec) -> None:
    run_training(spec, build_sft_trainer)


if __name__ == "__main__":
    worker_main("sft", train_sft)
