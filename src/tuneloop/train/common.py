"""What SFT and DPO workers share: the job spec, distributed set-up, progress, saving.

A worker is started by `tuneloop.train.launch` (torchrun locally, a TrainJob or PyTorchJob
on a cluster) as `python -m tuneloop.train.sft SPEC.json` or `... .dpo SPEC.json`. The spec is
a small JSON file; datasets, models and adapters are paths in durable storage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneloop.train")

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


@dataclass
class JobSpec:
    """Everything one training worker needs; written by the launcher, read by every rank."""

    stage: str  # "sft" | "dpo"
    base_model_dir: str
    data_path: str
    output_dir: str
    hparams: dict[str, Any]  # the stage's section of the run config (SFTConfig / DPOConfig fields)
    lora: dict[str, Any]
    deepspeed: str = "zero3"
    seed: int = 42
    init_adapter_dir: str | None = None  # DPO continues the SFT adapter
    mlflow: dict[str, str] = field(default_factory=dict)  # tracking_uri, run_id: live metrics
    persistence_threshold_zero: bool = False  # tests: force ZeRO-3 to partition tiny models

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, path: str | Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))


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
    if spec.deepspeed == "none":
        return None
    cfg = json.loads((DEEPSPEED_DIR / f"{spec.deepspeed}.json").read_text())
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

    if torch.cuda.is_available() or spec.deepspeed == "none" or world_size() == 1:
        return {}
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    from accelerate import PartialState

    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def training_arguments(spec: JobSpec) -> dict[str, Any]:
    """Arguments shared by SFTConfig and DPOConfig, derived from the run config section."""
    import torch

    hp = spec.hparams
    args: dict[str, Any] = dict(
        output_dir=str(Path(spec.output_dir) / "trainer"),
        max_steps=hp["max_steps"],
        num_train_epochs=hp["epochs"],
        learning_rate=hp["learning_rate"],
        per_device_train_batch_size=hp["per_device_batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"],
        max_length=hp["max_length"],
        logging_steps=hp["logging_steps"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=spec.seed,
        data_seed=spec.seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        include_num_input_tokens_seen="all",
    )
    ds = deepspeed_config(spec)
    if ds is not None:
        args["deepspeed"] = ds
    args.update(prepare_cpu_distributed(spec))
    return args


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_callback(spec: JobSpec):
    """A TrainerCallback that logs step, loss, tokens/s and ETA, and streams them to MLflow."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.client = None
            if spec.mlflow.get("run_id") and rank() == 0:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(spec.mlflow["tracking_uri"])

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if rank() != 0 or not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.t0
            tokens = state.num_input_tokens_seen or 0
            tps = tokens / elapsed if elapsed > 0 else 0.0
            eta = (state.max_steps - state.global_step) * elapsed / max(state.global_step, 1)
            log.info("%s step %d/%d loss %.4f lr %.2e tokens/s %.0f eta %.0fs", spec.stage, state.global_step,
                     state.max_steps, logs["loss"], logs.get("learning_rate", 0.0), tps, eta)
            if self.client is not None:
                ts = int(time.time() * 1000)
                from mlflow.entities import Metric

                metrics = [Metric(f"{spec.stage}/{k}", float(v), ts, state.global_step)
                           for k, v in logs.items() if isinstance(v, (int, float))]
                metrics.append(Metric(f"{spec.stage}/tokens_per_s", tps, ts, state.global_step))
                self.client.log_batch(spec.mlflow["run_id"], metrics=metrics)

    return Progress()


def write_result(spec: JobSpec, trainer: Any, started: float) -> None:
    """Rank 0 writes OUTPUT/train_metrics.json: losses, steps, tokens/s, wall time."""
    if rank() != 0:
        return
    hist = [h for h in trainer.state.log_history if "loss" in h]
    elapsed = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    result = {
        "stage": spec.stage,
        "steps": trainer.state.global_step,
        "first_loss": hist[0]["loss"] if hist else None,
        "final_loss": hist[-1]["loss"] if hist else None,
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in hist],
        "train_tokens": tokens,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "wall_s": elapsed,
        "world_size": world_size(),
        "deepspeed": spec.deepspeed,
    }
    (Path(spec.output_dir) / "train_metrics.json").write_text(json.dumps(result, indent=2))


def save_adapter(trainer: Any, spec: JobSpec, tokenizer: Any) -> None:
    """Save the LoRA adapter (gathered from ZeRO-3 shards by the trainer) and the tokenizer."""
    out = Path(spec.output_dir) / "adapter"
    trainer.save_model(str(out))
    if rank() == 0:
        tokenizer.save_pretrained(str(out))
        for stray in out.glob("training_args.bin"):
            stray.unlink()


def worker_main(stage: str, train: Callable[[JobSpec], None], argv: list[str] | None = None) -> None:
    """`python -m tuneloop.train.<stage> SPEC.json` on every rank."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(f"usage: python -m tuneloop.train.{stage} SPEC.json")
    setup_logging()
    train(JobSpec.read(argv[0]))
