"""Supervise a training worker on this host: torchrun with one process per CPU core group or GPU.

CPU processes talk over gloo here (DeepSpeed's CPU accelerator), GPUs over NCCL on a GPU node. The
worker's output is streamed into this process's log, a failure raises `TrainingFailed` with the
worker's last lines, and a run past the configured timeout is stopped. SIGTERM to this process is
passed on, so the worker saves a checkpoint. A rank that dies of a native crash
(SIGABRT/SIGSEGV/SIGBUS, e.g. in gloo's teardown on CPU) raises `WorkerCrashed`; the dispatcher
(train/launch.py) relaunches once, resuming from the newest complete checkpoint.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tuneloop.train.checkpoints import PREEMPTED_LOG
from tuneloop.train.common import STOPPED_FILE, UnsupportedOnThisHost, check_host
from tuneloop.train.spec import JobSpec

log = logging.getLogger("tuneloop.launch")


class TrainingFailed(RuntimeError):
    pass


class Preempted(TrainingFailed):
    """The worker was stopped by SIGTERM after saving a checkpoint; a rerun resumes from it."""


class GuardStopped(TrainingFailed):
    """A guard in the worker stopped training (rl: reward hacking) and saved nothing to register; the message is
    the guard's reason, `details` what the worker wrote (stopped.json)."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def stopped_by_guard(out_dir: Path) -> GuardStopped | None:
    """The GuardStopped a worker left in out_dir (stopped.json), or None."""
    f = Path(out_dir) / STOPPED_FILE
    if not f.exists():
        return None
    details = json.loads(f.read_text())
    return GuardStopped(f"{details.get('stage', 'training')}: stopped by a guard: {details.get('reason')}", details)


class WorkerCrashed(TrainingFailed):
    """A rank died by a signal of its own (abort, segfault: native code in torch/gloo/DeepSpeed),
    not by an error of ours; a relaunch resumes from the newest complete checkpoint."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class OutOfMemory(TrainingFailed):
    """A rank was killed by the kernel's out-of-memory killer (a SIGKILL while the kernel's OOM-kill count
    rose): the host ran out of memory. Not transient: the same settings would be killed again."""


def oom_kills() -> int:
    """The kernel's count of out-of-memory kills (/proc/vmstat, Linux >= 4.13); -1 where it cannot be read."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def oom_advice(spec: JobSpec) -> str:
    """The memory estimate of this stage and the settings that would fit this host (train/memory.py)."""
    from tuneloop.train.memory import ModelShape, available_bytes, estimate, what_would_fit

    try:
        shape = ModelShape.from_config(spec.base_model_dir)
    except (OSError, KeyError, ValueError):
        return "lower the batch size or max_length, or set train.gradient_checkpointing: true"
    n = spec.train.nproc_per_node
    est = estimate(spec.train, spec.stage, shape, n, cuda=False)
    return (f"estimated peak {est.describe()}; "
            + what_would_fit(spec.train, spec.stage, shape, n, False, min(available_bytes(), est.bytes_per_process * n)
                             * 0.8))


CRASH_SIGNALS = {int(signal.SIGABRT): "SIGABRT", int(signal.SIGBUS): "SIGBUS", int(signal.SIGSEGV): "SIGSEGV"}
_EXITCODE = re.compile(r"exitcode\s*:\s*-(\d+)")


def crash_signal(torchrun_output: list[str]) -> str | None:
    """The crash signal a rank died of, from torchrun's failure report; None for other failures."""
    for line in torchrun_output:
        m = _EXITCODE.search(line)
        if m and int(m.group(1)) in CRASH_SIGNALS:
            return CRASH_SIGNALS[int(m.group(1))]
    return None


def killed_rank(torchrun_output: list[str]) -> int | None:
    """The rank torchrun reports as killed by SIGKILL (exitcode -9), None if none was."""
    text = "\n".join(torchrun_output)
    for block in re.split(r"\[\d+\]:", text)[1:]:
        if re.search(r"exitcode\s*:\s*-9\b", block):
            m = re.search(r"rank\s*:\s*(\d+)", block)
            return int(m.group(1)) if m else 0
    if re.search(r"exitcode\s*:\s*-9\b", text):
        return 0
    return None


def worker_env(state_dir: Path) -> dict[str, str]:
    import torch

    from tuneloop.env import apply_defaults

    env = apply_defaults(dict(os.environ))
    env.setdefault("OMP_NUM_THREADS", "1")  # small matmuls on CPU: 2 threads per rank was ~14x slower
    env.setdefault("TORCH_EXTENSIONS_DIR", str(state_dir / "torch_extensions"))  # DeepSpeed's CPU op, built once
    env.setdefault("PYTHONWARNINGS", "ignore")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def worth_showing(line: str) -> bool:
    return "tuneloop." in line or "Error" in line or "error:" in line or any(
        s in line for s in ("terminate called", "what():", "Fatal Python error", "Segmentation fault", "Aborted"))


def _output_of(spec: JobSpec) -> Path:
    return Path(spec.output_dir) / ("model" if spec.train.method == "full" else "adapter")


def read_result(spec: JobSpec) -> dict[str, Any]:
    out = Path(spec.output_dir)
    metrics = out / "train_metrics.json"
    if not any(_output_of(spec).glob("*.safetensors")) or not metrics.exists():
        raise TrainingFailed(f"{spec.stage}: worker exited 0 but wrote no {_output_of(spec).name} in {out}")
    return json.loads(metrics.read_text())


def launch_local(spec: JobSpec, nproc: int, state_dir: Path, timeout_s: float,
                 grace_s: int = 300) -> dict[str, Any]:
    try:
        check_host(spec)
    except UnsupportedOnThisHost as e:
        raise TrainingFailed(f"{spec.stage}: {e}") from None
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STOPPED_FILE).unlink(missing_ok=True)
    spec_path = spec.write(out / "job_spec.json")
    ooms_before = oom_kills()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--shutdown_timeout={grace_s}", "-m", f"tuneloop.train.{spec.stage}", str(spec_path)]
    log.info("launching %s: %s", spec.stage, " ".join(cmd[2:]))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=worker_env(state_dir), start_new_session=True)
    terminated = threading.Event()

    def forward_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001 - preemption of this task: pass it on
        terminated.set()
        os.killpg(proc.pid, signal.SIGTERM)

    previous = install_signal(signal.SIGTERM, forward_sigterm)
    assert proc.stdout is not None
    checkpointed_on_sigterm = False
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            checkpointed_on_sigterm = checkpointed_on_sigterm or PREEMPTED_LOG in line
            if worth_showing(line):
                print(line, flush=True)
            if time.monotonic() - started > timeout_s:
                raise TrainingFailed(f"{spec.stage}: stopped after the {timeout_s:.0f}s timeout")
        rc = proc.wait()
    finally:
        install_signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the worker checkpoints, torchrun waits grace_s for it
            try:
                proc.wait(grace_s + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if terminated.is_set() or (rc != 0 and checkpointed_on_sigterm):
        raise Preempted(f"{spec.stage}: stopped by SIGTERM; the newest complete checkpoint in "
                        f"{spec.checkpoint_dir} is resumed by a rerun")
    if rc != 0 and (stopped := stopped_by_guard(out)) is not None:
        raise stopped
    if rc != 0:
        message = f"{spec.stage} worker exited with {rc}; last lines:\n" + "\n".join(tail)
        killed = killed_rank(list(tail))
        if killed is not None and oom_kills() > ooms_before:
            raise OutOfMemory(f"{spec.stage}: rank {killed} was killed by the kernel's out-of-memory killer "
                              f"(SIGKILL); {oom_advice(spec)}\n{message}")
        if killed is not None:  # no OOM kill counted: an operator, the node, a test - a rerun may resume
            raise TrainingFailed(f"{spec.stage}: rank {killed} was killed (SIGKILL) from outside; if the host ran "
                                 f"out of memory: {oom_advice(spec)}\n{message}")
        crashed = crash_signal(list(tail))
        raise WorkerCrashed(message, crashed) if crashed else TrainingFailed(message)
    return read_result(spec)


def install_signal(sig: int, handler: Any) -> Any:
    """signal.signal where allowed (main thread); returns the previous handler."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(sig, handler)


