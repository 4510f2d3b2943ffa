"""Start a training worker (tuneloop.train.sft / .dpo) and wait for it.

`local`: torchrun on this host - CPU processes over gloo here (DeepSpeed's CPU accelerator),
GPUs over NCCL on a GPU node. The worker's output is streamed into this process's log, a
failure raises `TrainingFailed` with the worker's last lines, and a run past the configured
timeout is stopped.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.train.common import JobSpec

log = logging.getLogger("tuneloop.launch")


class TrainingFailed(RuntimeError):
    pass


def worker_env(state_dir: Path) -> dict[str, str]:
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # small matmuls on CPU: 2 threads per rank was ~14x slower
    env.setdefault("TORCH_EXTENSIONS_DIR", str(state_dir / "torch_extensions"))  # DeepSpeed's CPU op, built once
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def build_spec(cfg: RunConfig, stage: str, base_dir: Path, data_path: Path, out_dir: Path,
               init_adapter: Path | None = None, mlflow_run: dict[str, str] | None = None) -> JobSpec:
    section = cfg.train.sft if stage == "sft" else cfg.train.dpo
    return JobSpec(stage=stage, base_model_dir=str(base_dir), data_path=str(data_path), output_dir=str(out_dir),
                   hparams=section.model_dump(), lora=cfg.train.lora.model_dump(), deepspeed=cfg.train.deepspeed,
                   seed=cfg.train.seed, init_adapter_dir=str(init_adapter) if init_adapter else None,
                   mlflow=mlflow_run or {},
                   persistence_threshold_zero=os.environ.get("TUNELOOP_ZERO3_PARTITION_ALL") == "1")


def launch_local(spec: JobSpec, nproc: int, state_dir: Path, timeout_s: float) -> dict[str, Any]:
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = spec.write(out / "job_spec.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", f"tuneloop.train.{spec.stage}", str(spec_path)]
    log.info("launching %s: %s", spec.stage, " ".join(cmd[2:]))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=worker_env(state_dir), start_new_session=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if "tuneloop." in line or "Error" in line or "error:" in line:
                print(line, flush=True)
            if time.monotonic() - started > timeout_s:
                raise TrainingFailed(f"{spec.stage}: stopped after the {timeout_s:.0f}s timeout")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    if rc != 0:
        raise TrainingFailed(f"{spec.stage} worker exited with {rc}; last lines:\n" + "\n".join(tail))
    metrics = out / "train_metrics.json"
    if not (out / "adapter" / "adapter_model.safetensors").exists() or not metrics.exists():
        raise TrainingFailed(f"{spec.stage}: worker exited 0 but wrote no adapter in {out}")
    return json.loads(metrics.read_text())


def launch(cfg: RunConfig, spec: JobSpec) -> dict[str, Any]:
    """Run one training stage with the configured backend; returns the worker's train_metrics."""
    return launch_local(spec, cfg.train.nproc_per_node, cfg.state_path, cfg.train.timeout_minutes * 60)
