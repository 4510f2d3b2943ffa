"""Online RL worker: TRL RLOOTrainer (default) or GRPOTrainer from the SFT adapter against the reward model.

Run by the launcher on every rank: `python -m tuneloop.train.rl SPEC.json`. The data file holds the prompts
({prompt}, chat-formatted as ingest writes them). The policy is the base with the SFT adapter (trainable); the
reference for the KL term (`train.rl.beta`) is the same SFT adapter loaded a second time, frozen, under the
adapter name `ref` (TRL does this for a PeftModel it retrains) and switched to for the reference log-probs: the
KL is to the SFT policy, and there is no second copy of the base weights. The
reward model is AutoModelForSequenceClassification(base, num_labels=1) with the reward stage's adapter merged in,
given to TRL as `reward_funcs` with its tokenizer as `reward_processing_classes`; TRL scores prompt + completion.
Rollouts: vLLM (colocated) where CUDA and vllm are present, transformers' generate otherwise (common.use_vllm).

Watching (RLWatch, a TrainerCallback): at every logging step it reads what TRL logged - `reward`, `reward_std`,
`kl`, `completions/mean_length`, `completions/clipped_ratio` - and adds, from the step's completions (TRL keeps
the last generation batch, gathered over the ranks, in `trainer._logs["completion"]`), `distinct_2` (distinct
word bigrams / word bigrams), `empty_share` and `empty_or_clipped_share`, and `length_growth` (mean length
over the first logged step's). The Progress callback streams them to MLflow with the loss. The guards
(`train.rl.guards`) are checked on the same values; the logs are identical on every rank, so every rank sees a
breach at the same step, stops, and raises StageStopped before anything is saved: the launcher reports the reason
and no adapter reaches evaluation or the registry. The watch's state (the length baseline, the history) is saved
in every checkpoint, so a resumed run keeps judging growth against the first step of the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.train.common import (StageStopped, load_jsonl, load_model, log, rank, records_dataset, run_training,
                                   trainer_arguments, worker_main)
from tuneloop.train.spec import JobSpec

WATCH_FILE = "rl_watch.json"
OWN_KEYS = ("distinct_2", "empty_share", "empty_or_clipped_share", "length_growth")  # not among TRL's logs


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    """Distinct word n-grams over all word n-grams of the texts. A non-empty text shorter than n words counts as
    one n-gram, itself: a policy collapsing onto one-word answers ("Sorry." x 8: 1/8) must not leave the
    diversity guard blind. None only when every text is empty (the empty-share guard watches those)."""
    grams = []
    for words in (t.split() for t in texts):
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)] or ([tuple(words)] if words else [])
    return len(set(grams)) / len(grams) if grams else None


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return " ".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def watched(logs: dict[str, Any], completions: list[str], first_length: float | None) -> dict[str, float]:
    """The values the guards look at, from TRL's logs of one step and that step's completions."""
    out: dict[str, float] = {}
    for ours, trl_key in (("reward_mean", "reward"), ("reward_std", "reward_std"), ("kl", "kl"),
                          ("mean_length", "completions/mean_length"), ("clipped_share", "completions/clipped_ratio")):
        if isinstance(logs.get(trl_key), (int, float)):
            out[ours] = float(logs[trl_key])
    if completions:
        d2 = distinct_n(completions, 2)
        if d2 is not None:
            out["distinct_2"] = d2
        out["empty_share"] = sum(not c.strip() for c in completions) / len(completions)
        # an empty completion ended at once (EOS), a clipped one ran to max_completion_length: they do not overlap
        out["empty_or_clipped_share"] = min(1.0, out["empty_share"] + out.get("clipped_share", 0.0))
    if first_length and "mean_length" in out:
        out["length_growth"] = out["mean_length"] / first_length
    return out


def breach(values: dict[str, float], guards: Any, step: int) -> str | None:
    """The first guard these values break, as one line; None if none (or before guards.start_step)."""
    if step < guards.start_step:
        return None
    checks = (  # (value, threshold, side, reason); a threshold of 0 switches the KL and length guards off
        ("kl", guards.max_kl or None, "above", "KL to the reference {v:.4f} is above train.rl.guards.max_kl {t}: the policy "
                                       "has drifted away from the SFT model (raise beta or lower the learning rate)"),
        ("length_growth", guards.max_length_growth or None, "above",
         "mean completion length grew {v:.2f}x since the first step, above train.rl.guards.max_length_growth {t}: "
         "length hacking of the reward model"),
        ("distinct_2", guards.min_distinct_2, "below",
         "distinct-2 of the completions {v:.3f} is below train.rl.guards.min_distinct_2 {t}: diversity collapsed "
         "(mode collapse onto a few phrasings)"),
        ("empty_or_clipped_share", guards.max_empty_or_clipped_share, "above",
         "{v:.2f} of the completions are empty or clipped, above train.rl.guards.max_empty_or_clipped_share {t}"),
    )
    for key, threshold, side, why in checks:
        if key not in values or threshold is None:
            continue
        v = values[key]
        if (side == "above" and v > threshold) or (side == "below" and v < threshold):
            return f"step {step}: " + why.format(v=v, t=threshold)
    return None


def watch_callback(spec: JobSpec) -> Any:
    """The RLWatch TrainerCallback (see the module docstring); `.trainer` is set once the trainer exists."""
    from transformers import TrainerCallback

    guards = spec.train.rl.guards

    class RLWatch(TrainerCallback):
        def __init__(self) -> None:
            self.trainer: Any = None
            self.first_length: float | None = None
            self.history: list[dict[str, float]] = []
            self.stopped: str | None = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            # resumed: the length baseline and the history come back with the checkpoint (see on_save)
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / WATCH_FILE
            if state.global_step > 0 and saved.exists():
                back = json.loads(saved.read_text())
                self.first_length, self.history = back["first_length"], back["history"]

        def on_save(self, args, state, control, **kw):  # noqa: ANN001 - runs before the checkpoint is marked complete
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if rank() == 0 and ckpt.is_dir():
                (ckpt / WATCH_FILE).write_text(json.dumps(self.state()))

        def state(self) -> dict[str, Any]:
            return {"guards": guards.model_dump(), "stopped": self.stopped, "first_length": self.first_length,
                    "history": self.history}

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if not logs or "loss" not in logs or self.stopped:
                return
            texts = [_text(c) for c in (self.trainer._logs.get("completion", []) if self.trainer else [])]
            values = watched(logs, texts, self.first_length)
            if self.first_length is None and values.get("mean_length"):
                self.first_length = values["mean_length"]
                values["length_growth"] = 1.0
            # Progress (after this one) streams the logs to MLflow as rl/<key>: TRL's own keys (reward, reward_std,
            # kl, completions/...) are there already; ours are added under their names
            logs.update({k: values[k] for k in OWN_KEYS if k in values})
            self.history.append({"step": state.global_step, **values})
            if rank() == 0:
                log.info("rl step %d: reward %.3f +- %.3f, kl %.4f, length %.1f (x%.2f), distinct-2 %.3f, "
                         "empty or clipped %.2f", state.global_step, values.get("reward_mean", float("nan")),
                         values.get("reward_std", float("nan")), values.get("kl", float("nan")),
                         values.get("mean_length", float("nan")), values.get("length_growth", float("nan")),
                         values.get("distinct_2", float("nan")), values.get("empty_or_clipped_share", float("nan")))
            reason = breach(values, guards, state.global_step)
            if reason is not None:
                self.stopped = reason
                control.should_training_stop = True
                control.should_save = False

        def write(self) -> None:
            if rank() == 0:
                (Path(spec.output_dir) / WATCH_FILE).write_text(json.dumps(self.state(), indent=2))

    return RLWatch()


def load_reward_model(spec: JobSpec) -> tuple[Any, Any]:
    """The reward model (base + reward adapter, merged) and its tokenizer. Loaded before the training arguments
    exist, so it is a whole model on every rank; TRL then wraps it for DeepSpeed like a reference model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not spec.reward_adapter_dir:
        raise ValueError("rl: the job spec names no reward model (reward_adapter_dir)")
    tok = AutoTokenizer.from_pretrained(spec.reward_adapter_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rm = AutoModelForSequenceClassification.from_pretrained(spec.base_model_dir, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    if (Path(spec.reward_adapter_dir) / "adapter_config.json").exists():
        rm = PeftModel.from_pretrained(rm, spec.reward_adapter_dir).merge_and_unload()
    rm.eval()
    return rm, tok


def build_rl_trainer(spec: JobSpec, callbacks: list[Any]) -> tuple[Any, Any]:
    """The configured RLOOTrainer / GRPOTrainer and the policy's tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    rl = spec.train.rl
    if rl.trainer == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    if spec.train.method == "full" or not spec.init_adapter_dir:
        raise ValueError("rl: starts from the SFT LoRA adapter (train.method lora/qlora and an init adapter)")
    reward_model, reward_tok = load_reward_model(spec)
    args = Config(**trainer_arguments(spec))  # before the policy: ZeRO-3 partitions it as it loads
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # TRL loads a frozen copy of this adapter as `ref` (the KL reference) when it is given a PeftModel to retrain
    model = PeftModel.from_pretrained(load_model(spec), spec.init_adapter_dir, is_trainable=True)
    prompts = sorted({r["prompt"] for r in load_jsonl(spec.data_path)})
    if not prompts:
        raise ValueError(f"rl: no prompts in {spec.data_path}")
    dataset = records_dataset(spec, [{"prompt": p} for p in prompts])
    watch = watch_callback(spec)
    trainer = Trainer(model=model, reward_funcs=reward_model, args=args, train_dataset=dataset,
                      processing_class=tokenizer, reward_processing_classes=reward_tok,
                      callbacks=[watch, *callbacks])  # watch first: it adds its values to the logs Progress streams
    watch.trainer = trainer
    trainer.rl_watch = watch
    return trainer, tokenizer


def after_rl(spec: JobSpec, trainer: Any) -> dict[str, Any]:
    """Write the watched history; a guard breach raises StageStopped (nothing is saved)."""
    watch = trainer.rl_watch
    watch.write()
    if watch.stopped:
        raise StageStopped(watch.stopped, {"last": watch.history[-1] if watch.history else {}})
    last = watch.history[-1] if watch.history else {}
    return {"rl_final": last, "rl_first": watch.history[0] if watch.history else {}}


def train_rl(spec: JobSpec) -> None:
    run_training(spec, build_rl_trainer, lambda trainer: after_rl(spec, trainer))


if __name__ == "__main__":
    worker_main("rl", train_rl)
