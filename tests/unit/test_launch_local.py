"""The local launcher's reading of torchrun's failure report, and its one relaunch after a native
crash (the report below is the one torchrun printed when a DPO rank aborted in CI)."""

from __future__ import annotations

import logging

import pytest

from tuneloop.train import launch as L
from tuneloop.train import local

pytestmark = pytest.mark.unit

ABORTED = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
======================================================
tuneloop.train.dpo FAILED
------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-21_09:09:58
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 5358)  (SIGTERM)
  traceback : Signal 15 (SIGTERM) received by PID 5358
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 5359)  (SIGABRT)
  traceback : Signal 6 (SIGABRT) received by PID 5359""".splitlines()


def test_a_native_crash_is_told_apart_from_an_error():
    assert local.crash_signal(ABORTED) == "SIGABRT"
    python_error = [line.replace("-6 (pid: 5359)  (SIGABRT)", "1 (pid: 5359)") for line in ABORTED]
    assert local.crash_signal(python_error) is None  # rank 0 was only SIGTERMed by torchrun
    assert local.crash_signal(["ValueError: bad dataset row 3"]) is None


def test_one_relaunch_after_a_crash_then_the_crash_is_reported(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from conftest import tiny_config

    from tuneloop.config import load_config

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    spec = type("Spec", (), {"stage": "dpo"})()
    calls: list[int] = []

    def crashes_first(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise local.WorkerCrashed("dpo worker exited with 1", "SIGABRT")
        return {"steps": 2}

    monkeypatch.setattr(L, "launch_local", crashes_first)
    with caplog.at_level(logging.WARNING, logger="tuneloop.launch"):
        assert L.launch(cfg, spec) == {"steps": 2}
    assert len(calls) == 2 and "dpo: a rank died of SIGABRT; relaunching once" in caplog.text

    def always_crashes(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise local.WorkerCrashed("dpo worker exited with 1", "SIGSEGV")

    monkeypatch.setattr(L, "launch_local", always_crashes)
    with pytest.raises(local.WorkerCrashed):
        L.launch(cfg, spec)

    def fails(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        raise local.TrainingFailed("dpo worker exited with 1: ValueError")

    calls.clear()
    monkeypatch.setattr(L, "launch_local", fails)
    with pytest.raises(local.TrainingFailed):
        L.launch(cfg, spec)
    assert len(calls) == 1, "an error of ours is not retried"
