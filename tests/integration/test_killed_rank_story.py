"""A training rank killed mid-run: the sft stage run closes FAILED with the reason and the worker's last
lines (description and `failure/error.txt`), and the exit handler closes the pipeline run FAILED with
"failed at sft: rank 1 was killed ..." in its tags and its description (the run summary). Real ZeRO-3 SFT
in 2 CPU processes on the tiny model, a real sqlite MLflow; test_train_resume covers what the launcher
does with the kill (resume), this covers what MLflow shows of it."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_config

pytestmark = pytest.mark.integration


def _rank(n: int) -> psutil.Process | None:
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "tuneloop.train.sft" in cmd and "torch.distributed.run" not in cmd and p.environ().get("RANK") == str(n):
                return p
        except psutil.NoSuchProcess:
            pass
    return None


def test_a_killed_rank_fails_the_run_and_mlflow_says_why(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    from tuneloop import stages
    from tuneloop.config import load_config
    from tuneloop.registry import NOTE, Registry
    from tuneloop.tiny import tiny_training_files
    from tuneloop.train.local import TrainingFailed

    monkeypatch.setenv("TUNELOOP_ZERO3_PARTITION_ALL", "1")
    sft, _ = tiny_training_files(tmp_path / "data", tiny_model_dir)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "sft.jsonl").write_text(sft.read_text())
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, train__sft={
        "max_steps": 400, "per_device_batch_size": 2, "learning_rate": 5e-3, "logging_steps": 1, "max_length": 128}))
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("killed-1", "kfp-killed-1", {})

    box: dict = {}

    def run() -> None:
        try:
            box["result"] = stages.sft_stage(cfg, parent, dataset, tmp_path / "sft")
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 400
    while True:  # mid-run: the stage run has live training loss and rank 1 is alive
        assert time.monotonic() < deadline and t.is_alive(), f"training did not start: {box}"
        runs = reg.stage_runs(parent, "sft")
        if runs and "sft/loss" in reg.client.get_run(runs[0].info.run_id).data.metrics:
            rank1 = _rank(1)
            if rank1 is not None:
                break
        time.sleep(0.2)
    rank1.send_signal(signal.SIGKILL)
    t.join(300)
    assert isinstance(box.get("error"), TrainingFailed), box
    assert "rank 1 was killed" in str(box["error"])

    # the stage run: FAILED, the reason, the worker's last lines in its description and artifacts
    sft_run = reg.client.get_run(reg.stage_runs(parent, "sft")[0].info.run_id)
    assert sft_run.info.status == "FAILED"
    assert "rank 1 was killed" in sft_run.data.tags["tuneloop.error"]
    assert "last lines" in sft_run.data.tags[NOTE] and "exitcode" in sft_run.data.tags[NOTE]
    error_txt = reg.download_run_artifact(sft_run.info.run_id, "failure/error.txt").read_text()
    assert "sft worker exited with" in error_txt and "last lines:" in error_txt
    assert "-9" in error_txt, "torchrun's report of the SIGKILL is among the worker's last lines"

    # the exit handler: the pipeline run FAILED with the reason in its tags and its description
    out = stages.finalize_stage(cfg, "kfp-killed-1", "FAILED", "")
    assert out["outcome"].startswith("failed at sft: rank 1 was killed"), out
    run = reg.client.get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["tuneloop.outcome"] == out["outcome"]
    assert run.data.tags["tuneloop.failed_stage"] == "sft" and "rank 1 was killed" in run.data.tags["tuneloop.error"]
    story = run.data.tags[NOTE]
    assert story.startswith(f"### Pipeline run killed-1: {out['outcome'][:60]}")
    assert "| sft | FAILED |" in story and "#### sft: FAILED" in story and "exitcode" in story
