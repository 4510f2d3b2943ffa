"""What the SFT, DPO, reward and RL workers share: distributed set-up, trainer arguments, progress, saving.

A worker is started by `tuneloop.train.launch` (torchrun locally, a TrainJob or PyTorchJob
on a cluster) as `python -m tuneloop.train.<stage> SPEC.json` (sft, dpo, reward, rl); the spec
(train/spec.py) carries the run config's validated `train` section.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.train.spec import JobSpec

log = logging.getLogger("tuneloop.train")

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_logging() -> None:
    level = logging.INFO if rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank()}] %(name)s: %(message)s", force=True)
    for noisy in ("transformers", "datasets", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def deepspeed_config(spec: JobSpec) -> dict[str, Any] | None:
    """Load the checked-in strategy JSON; tests may force real partitioning of tiny models."""
    if spec.train.deepspeed == "none":
        return None
    cfg = json.loads((DEEPSPEED_DIR / f"{spec.train.deepspeed}.json").read_text())
    if spec.persistence_threshold_zero and cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        cfg["zero_optimization"]["stage3_model_persistence_threshold"] = 0
    return cfg


def prepare_cpu_distributed(spec: JobSpec) -> dict[str, Any]:
    """The CPU-only DeepSpeed fix (see README): accelerate must share deepspeed's gloo world.

    Without it accelerate's PartialState finds no backend, believes it is one process and the
    batch-size check fails with `4 != 4 * 1 * 2`. Returns extra training arguments.
    """
    import torch

    if torch.cuda.is_available() or spec.train.deepspeed == "none" or world_size() == 1:
        return {}
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    from accelerate import PartialState

    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def work_dir(spec: JobSpec) -> Path:
    """The trainer's folder, shared by the ranks: checkpoints (durable when spec.checkpoint_dir is set)."""
    return Path(spec.checkpoint_dir) if spec.checkpoint_dir else Path(spec.output_dir) / "trainer"


def records_dataset(spec: JobSpec, rows: list[dict[str, Any]]) -> Any:
    """A datasets.Dataset backed by an Arrow file in the shared work dir. In-memory datasets cache in a
    temporary folder of each process, and TRL's precomputed reference log-probs are written by rank 0
    next to the dataset's own files for every rank to read."""
    from datasets import Dataset

    cache = work_dir(spec) / "datasets"
    cache.mkdir(parents=True, exist_ok=True)
    return Dataset.from_list(rows).map(lambda batch: batch, batched=True, load_from_cache_file=False,
                                       cache_file_name=str(cache / f"{spec.stage}-records-rank{rank()}.arrow"))


def trainer_arguments(spec: JobSpec) -> dict[str, Any]:
    """The stage's trainer arguments (trl.SFTConfig / trl.DPOConfig) from the run config: the one place
    where config fields are renamed to HF/TRL's names. A new training option is a config field plus
    one line here."""
    import torch
    from transformers.integrations.integration_utils import is_kubeflow_available

    t, hp = spec.train, spec.section
    args: dict[str, Any] = dict(
        output_dir=str(work_dir(spec)),
        max_steps=hp.max_steps,
        num_train_epochs=hp.epochs,
        learning_rate=hp.learning_rate,
        warmup_steps=hp.warmup_ratio,  # transformers 5: a warmup_steps below 1 is a share of the steps
        per_device_train_batch_size=hp.per_device_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        max_length=getattr(hp, "max_length", None),  # rl has max_completion_length instead
        logging_steps=hp.logging_steps,
        lr_scheduler_type="linear",
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps" if t.checkpoint.every_steps > 0 else "no",  # SIGTERM saves either way
        save_steps=max(t.checkpoint.every_steps, 1),
        save_total_limit=t.checkpoint.keep,
        # MLflow gets its metrics from the Progress callback below; in a TrainJob whose runtime status is on,
        # the controller sets KUBEFLOW_TRAINER_SERVER_URL and transformers' callback reports progress, ETA and
        # metrics into the TrainJob's status (trainerStatus), where `kubectl get trainjob -o yaml` shows them
        report_to=["kubeflow"] if is_kubeflow_available() else "none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=use_bf16(spec),
        gradient_checkpointing=t.gradient_checkpointing,  # TRL's default is on; here it is an option
        use_liger_kernel=t.liger_kernels,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )
    if spec.stage == "sft":
        args.update(completion_only_loss=True, packing=t.sft.packing, packing_strategy="bfd")
    elif spec.stage == "dpo":
        args.update(beta=t.dpo.beta, precompute_ref_log_probs=t.dpo.precompute_ref_log_probs)
    elif spec.stage == "reward":
        args.update(center_rewards_coefficient=t.reward.center_rewards_coefficient or None,
                    per_device_eval_batch_size=t.reward.per_device_batch_size)
    else:  # rl: trl.RLOOConfig / trl.GRPOConfig
        rl = t.rl
        del args["max_length"]
        args.update(num_generations=rl.num_generations, max_completion_length=rl.max_completion_length,
                    beta=rl.beta, temperature=rl.temperature, use_vllm=use_vllm(spec), log_completions=False,
                    # TRL counts an RL step's prompt and completion tokens itself; a batch of prompts has no
                    # input_ids for transformers to count (it warned at every step)
                    include_num_input_tokens_seen="no")
        if args["use_vllm"]:
            args.update(vllm_mode="colocate")
    ds = deepspeed_config(spec)
    if ds is not None:
        args["deepspeed"] = ds
    args.update(prepare_cpu_distributed(spec))
    return args


STOPPED_FILE = "stopped.json"  # written by rank 0 of a worker whose guard stopped it, next to train_metrics.json
STOPPED_EXIT = 3


class StageStopped(RuntimeError):
    """A guard stopped training (rl: reward hacking); the stage fails with the reason and registers nothing."""

    def __init__(self, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.details = details or {}


class UnsupportedOnThisHost(RuntimeError):
    """An option that needs hardware this host lacks (qlora, Liger, flash-attention without CUDA)."""


def check_host(spec: JobSpec) -> None:
    """Refuse GPU-only options on a CPU host with one clear line, before anything is loaded."""
    import importlib.util

    import torch

    if torch.cuda.is_available():
        missing = [(opt, pkg) for opt, pkg, on in (("method qlora", "bitsandbytes", spec.train.method == "qlora"),
                                                    ("liger_kernels", "liger_kernel", spec.train.liger_kernels),
                                                    ("attention flash_attention_2", "flash_attn",
                                                     spec.train.attention == "flash_attention_2"))
                   if on and importlib.util.find_spec(pkg) is None]
        if missing:
            raise UnsupportedOnThisHost("; ".join(f"train.{o} needs the {p} package (install tuneloop[gpu])"
                                                  for o, p in missing))
        return
    wanted = [o for o, on in (("method: qlora (4-bit bitsandbytes)", spec.train.method == "qlora"),
                              ("liger_kernels: true", spec.train.liger_kernels),
                              ("attention: flash_attention_2", spec.train.attention == "flash_attention_2"),
                              ("bf16: on", spec.train.bf16 == "on"),
                              ("rl.generation: vllm", spec.stage == "rl" and spec.train.rl.generation == "vllm"))
              if on]
    if wanted:
        raise UnsupportedOnThisHost(f"train.{', train.'.join(wanted)}: needs a CUDA GPU and this host has none "
                                    "(use method lora / the defaults on CPU)")


def use_vllm(spec: JobSpec) -> bool:
    """rl rollouts through vLLM (TRL use_vllm, colocated with training): `generation` vllm, or auto where CUDA and the
    vllm package are present; transformers' generate otherwise."""
    import importlib.util

    import torch

    g = spec.train.rl.generation
    if g != "auto":
        return g == "vllm"
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def use_bf16(spec: JobSpec) -> bool:
    import torch

    if spec.train.bf16 != "auto":
        return spec.train.bf16 == "on"
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def attention_impl(spec: JobSpec) -> str:
    import importlib.util

    import torch

    if spec.train.attention != "auto":
        return spec.train.attention
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(spec: JobSpec, auto_class: Any = None, **extra: Any) -> Any:
    """The base model as the method needs it: bf16 on GPU (fp32 master weights stay with the optimizer /
    DeepSpeed), 4-bit NF4 for qlora, the chosen attention kernel. Call after the training arguments
    exist, so that ZeRO-3 partitions the weights as they load."""
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = use_bf16(spec)
    # a full fine-tune without DeepSpeed keeps fp32 weights (AdamW on bf16 weights loses the updates)
    dtype = torch.bfloat16 if bf16 and (spec.train.method != "full" or spec.train.deepspeed != "none") else torch.float32
    kw: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention_impl(spec)}
    if spec.train.method == "qlora":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)  # storage dtype: ZeRO-3
        if spec.train.deepspeed in ("none", "zero2"):
            kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return (auto_class or AutoModelForCausalLM).from_pretrained(spec.base_model_dir, **kw, **extra)


def lora_config(spec: JobSpec, task_type: str = "CAUSAL_LM") -> Any:
    """The peft LoraConfig of the spec, or None for a full fine-tune."""
    if spec.train.method == "full":
        return None
    from peft import LoraConfig

    lora = spec.train.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type=task_type)


def partition_stats(model: Any) -> dict[str, Any]:
    """How the parameters are laid out on this rank: under ZeRO-3 each parameter holds only its shard."""
    n = partitioned = numel = local = 0
    for p in model.parameters():
        n += 1
        if hasattr(p, "ds_numel"):
            partitioned += 1
            numel += p.ds_numel
            local += p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else 0
        else:
            numel += p.numel()
            local += p.numel()
    return {"params": n, "partitioned_params": partitioned, "numel": numel, "local_numel": local,
            "local_fraction": local / numel if numel else 0.0}


def partition_callback(spec: JobSpec):
    """Records partition_stats of rank 0 once the engine is built (train_metrics.json: `zero`)."""
    from transformers import TrainerCallback

    class Partition(TrainerCallback):
        stats: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
            if model is not None:
                Partition.stats = partition_stats(model)
                if rank() == 0:
                    log.info("%s parameters: %d of %d partitioned, this rank holds %.1f%% of %d values", spec.stage,
                             self.stats["partitioned_params"], self.stats["params"],
                             100 * self.stats["local_fraction"], self.stats["numel"])

    return Partition()


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_callback(spec: JobSpec):
    """A TrainerCallback that logs step, loss, tokens/s and ETA, and streams them to MLflow.

    Rates and the ETA count only what this process did: after a resume the restored step and token
    counters are the starting point, not zero."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.step0 = 0
            self.tokens0 = 0
            self.client = None
            if spec.mlflow.get("run_id") and rank() == 0:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(spec.mlflow["tracking_uri"])

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0 = time.perf_counter()
            self.step0 = state.global_step
            self.tokens0 = state.num_input_tokens_seen or 0

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if rank() != 0 or not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.t0
            tokens = (state.num_input_tokens_seen or 0) - self.tokens0
            tps = tokens / elapsed if elapsed > 0 else 0.0
            eta = (state.max_steps - state.global_step) * elapsed / max(state.global_step - self.step0, 1)
            log.info("%s step %d/%d loss %.4f lr %.2e tokens/s %.0f eta %.0fs", spec.stage, state.global_step,
                     state.max_steps, logs["loss"], logs.get("learning_rate", 0.0), tps, eta)
            if self.client is not None:
                ts = int(time.time() * 1000)
                from mlflow.entities import Metric

                metrics = [Metric(f"{spec.stage}/{k}", float(v), ts, state.global_step)
                           for k, v in logs.items() if isinstance(v, (int, float))]
                metrics += [Metric(f"{spec.stage}/tokens_per_s", tps, ts, state.global_step),
                            Metric(f"{spec.stage}/eta_s", eta, ts, state.global_step)]
                self.client.log_batch(spec.mlflow["run_id"], metrics=metrics)

    return Progress()


def write_result(spec: JobSpec, trainer: Any, started: float, extra: dict[str, Any] | None = None) -> None:
    """Rank 0 writes OUTPUT/train_metrics.json: losses, steps, tokens/s, wall time."""
    if rank() != 0:
        return
    hist = [h for h in trainer.state.log_history if "loss" in h]
    elapsed = time.perf_counter() - started
    extra = dict(extra or {})
    tokens = int(trainer.state.num_input_tokens_seen or 0) - extra.pop("tokens_before_resume", 0)
    train_s = extra.get("train_s") or elapsed
    result = {
        "stage": spec.stage,
        "method": spec.train.method,
        "steps": trainer.state.global_step,
        "first_loss": hist[0]["loss"] if hist else None,
        "final_loss": hist[-1]["loss"] if hist else None,
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in hist],
        "train_tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,  # while training, start-up excluded
        "wall_s": elapsed,
        "world_size": world_size(),
        "deepspeed": spec.train.deepspeed,
        **extra,
    }
    (Path(spec.output_dir) / "train_metrics.json").write_text(json.dumps(result, indent=2))


def peak_rss_mb_all_ranks() -> float:
    """The largest peak resident memory of any rank so far, in MB (collective: every rank calls it)."""
    import resource

    import torch
    import torch.distributed as dist

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def save_adapter(trainer: Any, spec: JobSpec, tokenizer: Any) -> Path:
    """Save the LoRA adapter (gathered from ZeRO-3 shards by the trainer) and the tokenizer; a full
    fine-tune saves the whole model to `model/` instead (16-bit gather on save, see zero3.json)."""
    out = Path(spec.output_dir) / ("model" if spec.train.method == "full" else "adapter")
    trainer.save_model(str(out))
    if rank() == 0:
        tokenizer.save_pretrained(str(out))
        for stray in out.glob("training_args.bin"):
            stray.unlink()
    return out


def save_merged(spec: JobSpec, adapter_dir: Path, tokenizer: Any) -> Path:
    """Rank 0 writes base + adapter merged as one save_pretrained folder (`merged/`).

    Under ZeRO-3 a from_pretrained on one rank hangs while the HF DeepSpeed config is active, so it
    is unset first (every rank has saved by then: barrier)."""
    import torch

    out = Path(spec.output_dir) / "merged"
    from tuneloop.train.checkpoints import barrier

    barrier()
    if rank() == 0:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        dtype = torch.bfloat16 if use_bf16(spec) else torch.float32
        base = AutoModelForCausalLM.from_pretrained(spec.base_model_dir, dtype=dtype)
        PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return out


def run_training(spec: JobSpec, build: Callable[[JobSpec, list[Any]], tuple[Any, Any]],
                 after_train: Callable[[Any], dict[str, Any]] | None = None) -> None:
    """What every worker does around its trainer: refuse what this host cannot do, resume from the
    newest complete checkpoint, train, on SIGTERM checkpoint and exit PREEMPTED_EXIT, else save the
    adapter (and merged model), the metrics, and drop the checkpoints of the finished stage.

    `after_train(trainer)` runs on every rank before anything is saved (a held-out evaluation, a guard that
    raises); what it returns goes into train_metrics.json."""
    import shutil

    import torch

    from tuneloop.train.checkpoints import (PREEMPTED_EXIT, PREEMPTED_LOG, barrier, preemption_callback, prepare_resume,
                                           step_of)

    check_host(spec)
    started = time.perf_counter()
    torch.manual_seed(spec.train.seed)
    progress, preempt, part = progress_callback(spec), preemption_callback(spec.checkpoint_mirror), \
        partition_callback(spec)
    trainer, tokenizer = build(spec, [progress, preempt, part])
    ckpt_root = Path(trainer.args.output_dir)
    resume = prepare_resume(ckpt_root, spec.checkpoint_mirror)
    if resume is not None:
        log.info("%s: resuming from %s", spec.stage, resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_s = time.perf_counter() - progress.t0
    if preempt.preempted:
        log.warning("%s: %s; a rerun resumes from it", spec.stage, PREEMPTED_LOG)
        sys.exit(PREEMPTED_EXIT)
    checked = after_train(trainer) if after_train is not None else {}
    saved = save_adapter(trainer, spec, tokenizer)
    if spec.train.save_merged_model and spec.train.method != "full" and spec.stage != "reward":
        save_merged(spec, saved, tokenizer)  # a policy; the reward model's score head is no causal LM
    write_result(spec, trainer, started, {"zero": part.stats, "resumed_from_step": step_of(resume) if resume else None,
                                          "tokens_before_resume": progress.tokens0, "train_s": train_s,
                                          "peak_rss_mb": peak_rss_mb_all_ranks(), **checked})
    barrier()
    if rank() == 0 and spec.checkpoint_dir:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the stage is done; its adapter is the output


def worker_main(stage: str, train: Callable[[JobSpec], None], argv: list[str] | None = None) -> None:
    """`python -m tuneloop.train.<stage> SPEC.json` on every rank."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(f"usage: python -m tuneloop.train.{stage} SPEC.json")
    setup_logging()
    try:
        train(JobSpec.read(argv[0]))
    except UnsupportedOnThisHost as e:
        log.error("%s", e)
        sys.exit(2)
    except StageStopped as e:  # a guard: nothing was saved for registration; the launcher reads stopped.json
        log.error("%s: stopped: %s", stage, e)
        if rank() == 0 and len(argv) == 1:
            out = Path(JobSpec.read(argv[0]).output_dir)
            (out / STOPPED_FILE).write_text(json.dumps({"stage": stage, "reason": str(e), **e.details}, indent=2))
        sys.exit(STOPPED_EXIT)
