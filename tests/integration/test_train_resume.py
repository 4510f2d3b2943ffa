"""Kill and resume: real ZeRO-3 SFT in 2 CPU processes (tiny model, every parameter partitioned).

One uninterrupted run is the reference. A second run of another pipeline run loses rank 1 to
SIGKILL after its first complete checkpoint; its rerun starts from that checkpoint (a planted
half-written checkpoint with a higher step is discarded, never picked), is stopped by SIGTERM
(what a pod eviction sends) and saves a checkpoint at that step before exiting; the last rerun
finishes. Its adapter must equal the reference's: |difference| <= ATOL on every weight.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.tiny import tiny_training_files
from tuneloop.train.checkpoints import MARKER, newest_complete, step_of
from tuneloop.train.launch import build_spec, launch
from tuneloop.train.local import Preempted, TrainingFailed

pytestmark = [pytest.mark.integration, pytest.mark.resume]

STEPS, EVERY = 16, 4
# fp32 on CPU; the resumed run restores optimizer, scheduler, RNG and data position, so only the order
# of floating-point reductions could differ. Measured difference here: 0.0 (bit-identical).
ATOL = 1e-6


def _workers(stage: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if f"tuneloop.train.{stage}" in " ".join(p.cmdline()) and "RANK" in p.environ() \
                    and "torch.distributed.run" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_for(cond, timeout: float = 240.0, what: str = "") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _in_background(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_sigkill_one_rank_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.setenv("TUNELOOP_ZERO3_PARTITION_ALL", "1")
    sft, _ = tiny_training_files(tmp_path / "data", tiny_model_dir)
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, train__checkpoint={"every_steps": EVERY, "keep": 2},
                                  train__sft={"max_steps": STEPS, "per_device_batch_size": 2, "learning_rate": 5e-3,
                                              "logging_steps": 1, "max_length": 128}))

    def spec(run: str, out: str):
        return build_spec(cfg, "sft", tiny_model_dir, sft, tmp_path / out, pipeline_run=run)

    # 1. the reference: no interruption
    reference = launch(cfg, spec("straight", "straight"), "straight")
    assert reference["steps"] == STEPS and reference["resumed_from_step"] is None
    assert reference["zero"]["partitioned_params"] == reference["zero"]["params"], "ZeRO-3 must partition all"

    # 2. SIGKILL rank 1 once the first checkpoint is complete
    s = spec("killed", "killed")
    ckpts = Path(s.checkpoint_dir)
    t, box = _in_background(lambda: launch(cfg, s, "killed"))
    _wait_for(lambda: newest_complete(ckpts), what="the first complete checkpoint")
    rank1 = [p for p in _workers("sft") if p.environ().get("RANK") == "1"]
    assert rank1, "rank 1 not found"
    rank1[0].send_signal(signal.SIGKILL)
    t.join(120)
    assert isinstance(box.get("error"), TrainingFailed), box
    assert not (tmp_path / "killed" / "adapter").exists(), "the killed run must not have finished"
    first = newest_complete(ckpts)
    assert first is not None and step_of(first) < STEPS
    # a checkpoint that was being written when a process died: higher step, no completion marker
    half = ckpts / f"checkpoint-{STEPS - 1}"
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_step": 1')  # truncated
    assert not (half / MARKER).exists()

    # 3. rerun: resumes from the complete checkpoint; SIGTERM (an eviction) makes it checkpoint and stop
    capfd.readouterr()
    t, box = _in_background(lambda: launch(cfg, s, "killed"))
    later = _wait_for(lambda: (c := newest_complete(ckpts)) is not None and step_of(c) > step_of(first) and c,
                      what="a checkpoint after the resume")
    torchrun = [p for p in psutil.Process().children(recursive=True)
                if "torch.distributed.run" in " ".join(p.cmdline())]
    os.killpg(torchrun[0].pid, signal.SIGTERM)
    t.join(300)
    assert isinstance(box.get("error"), Preempted), box
    shown = capfd.readouterr().out
    assert f"resuming from {first}" in shown, shown[-3000:]
    assert f"checkpoint-{STEPS - 1}" in shown and "discarded incomplete" in shown
    assert "SIGTERM: saving a checkpoint at step" in shown
    on_sigterm = newest_complete(ckpts)
    assert step_of(later) < step_of(on_sigterm) < STEPS

    # 4. the last rerun finishes; its adapter equals the reference's
    resumed = launch(cfg, s, "killed")
    assert resumed["steps"] == STEPS and resumed["resumed_from_step"] == step_of(on_sigterm)
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resume: max |resumed - uninterrupted| over {len(a)} adapter tensors = {worst:.3e}")
    assert worst <= ATOL, f"resumed adapter differs from the uninterrupted one by {worst:.2e}"
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)
    assert not ckpts.exists(), "a finished stage drops its checkpoints"
