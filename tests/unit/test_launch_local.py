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
    from tuneloop.train.spec import JobSpec

    spec = JobSpec(stage="dpo", base_model_dir=str(tiny_model_dir), data_path="d.jsonl", output_dir=str(tmp_path))
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


KILLED = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
======================================================
tuneloop.train.sft FAILED
------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-28_05:12:01
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 7731)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 7731""".splitlines()


def test_a_rank_killed_by_the_kernel_is_reported_as_out_of_memory_and_not_retried(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    from conftest import tiny_config

    from tuneloop.config import load_config

    assert local.killed_rank(KILLED) == 1
    assert local.killed_rank(ABORTED) is None
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    spec = L.build_spec(cfg, "sft", tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out", pipeline_run="r1")
    calls: list[int] = []

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        raise local.OutOfMemory(f"sft: rank 1 was killed by the kernel's out-of-memory killer (SIGKILL); "
                                f"{local.oom_advice(spec)}")

    monkeypatch.setattr(L, "launch_local", killed)
    with pytest.raises(local.OutOfMemory, match="out-of-memory killer .*; estimated peak .* GiB per process"):
        L.launch(cfg, spec, "r1")
    with pytest.raises(local.OutOfMemory, match="not retried: an earlier attempt .* same training settings"):
        L.launch(cfg, spec, "r1")  # the task's retry: refused before anything starts
    assert len(calls) == 1
    smaller = L.build_spec(load_config(tiny_config(tmp_path, tiny_model_dir, train__sft__per_device_batch_size=1)),
                           "sft", tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out", pipeline_run="r1")
    with pytest.raises(local.OutOfMemory, match="out-of-memory killer"):  # other settings: tried again
        L.launch(cfg, smaller, "r1")
    assert len(calls) == 2


def test_a_sigkill_without_an_oom_kill_is_not_taken_for_one(tmp_path, monkeypatch):
    """The launcher reads the kernel's OOM-kill count around the run: a rank killed from outside (an operator,
    the resume test) while the count stayed put is a plain failure, and a rerun may resume."""
    import subprocess
    import sys

    from tuneloop.train.spec import JobSpec

    script = tmp_path / "fake_torchrun.py"
    script.write_text("import sys\nprint('\\n'.join(sys.argv[1:2]))\n" + "".join(
        f"print({line!r})\n" for line in KILLED) + "sys.exit(1)\n")
    real_popen = subprocess.Popen
    monkeypatch.setattr(local.subprocess, "Popen", lambda cmd, **kw: real_popen([sys.executable, str(script)], **kw))
    monkeypatch.setattr(local, "check_host", lambda spec: None)
    spec = JobSpec(stage="sft", base_model_dir=str(tmp_path), data_path="d.jsonl", output_dir=str(tmp_path / "o"))
    counts = iter([3, 3])
    monkeypatch.setattr(local, "oom_kills", lambda: next(counts))
    with pytest.raises(local.TrainingFailed, match="was killed .SIGKILL. from outside") as e:
        local.launch_local(spec, 2, tmp_path, 60)
    assert not isinstance(e.value, local.OutOfMemory)
    counts = iter([3, 4])  # the kernel counted an OOM kill meanwhile
    with pytest.raises(local.OutOfMemory, match="out-of-memory killer"):
        local.launch_local(spec, 2, tmp_path, 60)
