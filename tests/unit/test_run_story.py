"""MLflow tells the story (a real MLflow on a sqlite store in tmp_path): stage descriptions say what each
stage decided and why, verdicts are tags and metrics of the stage and the pipeline run, the pipeline run's
description is the run summary, numbers are rounded for people, and a new run closes the runs an earlier
killed process left RUNNING."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from tuneloop.config import load_config

pytestmark = pytest.mark.unit

GATE_PASSED = {"passed": True, "reference": "base model", "rules": [
    {"slice": "ticket_routing", "metric": "nll", "kind": "max_regression", "candidate": 1.1666666666666667,
     "champion": 12.263012345, "threshold": 112.263012345, "passed": True,
     "why": "candidate 1.1667 vs base model 12.2630: change -11.0963, allowed +100.0"}]}
GATE_BLOCKED = {"passed": False, "reference": "champion v1", "rules": [
    {"slice": "ticket_routing", "metric": "accuracy", "kind": "min", "candidate": 0.6666666666666666,
     "champion": 0.75, "threshold": 0.99, "passed": False, "why": "candidate 0.6667 < floor 0.99"}]}
METRICS = {who: {"ticket_routing": {"n": 8, "accuracy": acc, "nll": nll, "perplexity": ppl}}
           for who, acc, nll, ppl in (("candidate", 0.6666666666666666, 1.1666666666666667, 3.2111111),
                                      ("champion", 0.0, 12.263012345, 211797.12345),
                                      ("base", 0.0, 12.263012345, 211797.12345))}
VALIDATION = {"passed": True, "checks": [{"table": "sft", "expectation": "not_null", "column": "prompt", "passed": True,
                                          "observed": 0, "message": "", "config_key": None}] * 37, "failed": []}


def _canary_rows() -> list[dict[str, Any]]:
    def side(variant: str, n: int, good: int) -> list[dict[str, Any]]:
        return [{"request_id": f"{variant}-{i}", "variant": variant, "status": "ok", "latency_ms": 100.0 + i % 5,
                 "score": 1.0 if i < good else 0.0, "created": float(i)} for i in range(n)]
    return side("champion", 30, 24) + side("canary", 30, 20)


@pytest.fixture()
def env(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A config on a fresh sqlite store, with the stages' heavy insides (GX suite, drift, model evaluation,
    canary replay, serving) replaced by fixed results: the MLflow side is real."""
    import tuneloop.data.drift
    import tuneloop.data.validate
    import tuneloop.evaluate.run
    from tuneloop.deploy import canary

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))

    def validate_dataset(cfg: Any, dataset: Path, tok: Any, out: Path) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(VALIDATION))
        return VALIDATION

    gate = {"now": GATE_PASSED}

    def evaluate_models(*args: Any) -> dict[str, Any]:
        out = args[6]
        out.mkdir(parents=True, exist_ok=True)
        (out / "gate.json").write_text(json.dumps(gate["now"]))
        return {"metrics": METRICS, "gate": gate["now"]}

    monkeypatch.setattr(tuneloop.data.validate, "validate_dataset", validate_dataset)
    monkeypatch.setattr(tuneloop.data.drift, "drift_report",
                        lambda *a, **k: {"computed": False, "reference": None, "note": "no champion yet"})
    monkeypatch.setattr(tuneloop.evaluate.run, "evaluate_models", evaluate_models)
    monkeypatch.setattr(canary, "analyze_canary", lambda cfg, deployed_at: canary.compare(_canary_rows(), cfg))
    monkeypatch.setattr(canary, "_apply", lambda cfg, step, version, champion=None: {})
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "sft.jsonl").write_text("")
    return cfg, gate, tmp_path



def test_the_sequential_canary_tells_its_test_boundary_and_sample_size(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default canary test is sequential: its always-valid p-value, boundaries and n reach the runs table."""
    from tuneloop import stages
    from tuneloop.deploy import canary
    from tuneloop.registry import NOTE, Registry

    cfg, _, tmp = env
    cfg.deploy.canary.min_requests = 10
    monkeypatch.setattr(canary, "analyze_canary", lambda cfg, deployed_at: {
        **canary.sequential_compare(_canary_rows(), cfg, final=True), "test": "sequential"})
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("story-seq", "kfp-story-seq", {})
    r = stages.analyze_canary_stage(cfg, parent, "1", time.time(), tmp / "canary-seq")
    run = reg.client.get_run(parent)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["tuneloop.canary_decision"] == r["decision"]
    assert "error_rate: e-value" in tags["tuneloop.canary_tests"] and "(savvi)" in tags["tuneloop.canary_tests"]
    assert metrics["canary.n_canary"] == 30 and metrics["canary.n_champion"] == 30
    assert metrics["canary.error_rate.rollback_at"] == 60 and metrics["canary.error_rate.promote_at"] == 20
    assert 0 < metrics["canary.feedback.p_value"] <= 1
    note = reg.stage_runs(parent, "analyze_canary")[0].data.tags[NOTE]
    assert "sequential, 1 looks, n canary 30 / champion 30" in note and "rollback at e >= 60" in note


def _register(reg: Any, parent: str, tmp_path: Path) -> str:
    from tuneloop.registry import TAG_PIPELINE_RUN

    adapter = tmp_path / f"adapter-{parent}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with reg.stage_run(parent, "register") as rid:
        version = str(reg.register(rid, adapter, {TAG_PIPELINE_RUN: parent}).version)
    reg.set_tag(parent, "tuneloop.model_version", version)
    return version


def test_a_promoted_run_tells_its_story(env: Any) -> None:
    from tuneloop import stages
    from tuneloop.registry import NOTE, Registry

    cfg, _, tmp = env
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("story-1", "kfp-story-1", {})
    assert stages.validate_stage(cfg, parent, tmp / "ds", tmp / "val")["passed"]
    assert stages.evaluate_stage(cfg, parent, tmp / "ds", tmp / "cand", tmp / "eval")["passed"]
    version = _register(reg, parent, tmp)
    reg.set_alias("canary", version)
    assert stages.analyze_canary_stage(cfg, parent, version, time.time(), tmp / "canary")["decision"] == "promote"
    stages.promote_stage(cfg, parent, version)

    run = reg.client.get_run(parent)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags["tuneloop.outcome"] == f"promoted v{version}"
    # verdicts a runs table shows: tags and metrics of the pipeline run
    assert tags["tuneloop.data_gate"] == "passed" and metrics["data_gate_passed"] == 1
    assert tags["tuneloop.gate"] == "passed" and metrics["gate_passed"] == 1
    assert tags["tuneloop.canary"] == "promoted" and metrics["canary_promoted"] == 1
    assert tags["tuneloop.canary_decision"] == "promote"
    assert "feedback: Welch's t-test (one-sided) p=" in tags["tuneloop.canary_tests"]
    assert "error_rate: Fisher's exact test (one-sided) p=1" in tags["tuneloop.canary_tests"]
    assert 0 < metrics["canary.feedback.p_value"] < 1 and metrics["canary.feedback.statistic"] < 0
    # the pipeline run's description is the run summary
    story = tags[NOTE]
    assert story.startswith("### Pipeline run story-1: promoted v1")
    for stage in ("validate_data", "evaluate", "register", "analyze_canary", "promote"):
        assert re.search(rf"\| {stage} \| FINISHED \| [0-9.]+ s \|", story), stage
    assert "#### Data gate" in story and "**Data gate: PASSED** - 37/37 checks passed" in story
    assert "#### Evaluation gate" in story and "**Evaluation gate: PASSED** - 1/1 rules passed" in story
    assert "| ticket_routing | nll | 1.17 | 12.3 | max_regression 112 | pass |" in story
    assert "#### Canary" in story and "Welch's t-test (one-sided)" in story and "p-value" in story
    assert "delta >= -0.1, or p >= 0.05" in story, "the canary's thresholds"
    assert f"**Model version**: tiny-model v{version} (champion)" in story
    assert 'mlflow.pyfunc.load_model("models:/tiny-model/1")' in story
    assert not re.search(r"\d\.\d{5,}", story), "numbers rounded for people"
    assert re.search(r"Started 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC, ended 20\d\d-", story)
    # each stage run's description says what it decided and why
    ev = reg.stage_runs(parent, "evaluate")[0]
    assert ev.data.tags["tuneloop.gate"] == "passed" and ev.data.metrics["gate_passed"] == 1
    assert "211,797" in ev.data.tags[NOTE] and "never saw" in ev.data.tags[NOTE]
    assert ev.data.metrics["candidate.ticket_routing.accuracy"] == 0.666667, "metrics rounded to 6 digits"
    assert ev.data.metrics["base.ticket_routing.perplexity"] == 211797.0
    promote = reg.stage_runs(parent, "promote")[0]
    assert promote.data.tags[NOTE].startswith(f"**promoted v{version}**") and "champion=v1" in promote.data.tags[NOTE]
    # the version: its source run is the pipeline run, its promotion a date
    mv = reg.model_version(version)
    assert mv.run_id == parent
    assert re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC", mv.tags["tuneloop.promoted_at_utc"])


def test_a_blocked_gate_is_a_verdict_and_the_reason_to_stop(env: Any) -> None:
    from tuneloop import stages
    from tuneloop.registry import NOTE, Registry

    cfg, gate, tmp = env
    gate["now"] = GATE_BLOCKED
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("story-2", "kfp-story-2", {})
    assert not stages.evaluate_stage(cfg, parent, tmp / "ds", tmp / "cand", tmp / "eval")["passed"]
    stages.stop_stage(cfg, parent, "rejected by the evaluation gate")
    run = reg.client.get_run(parent)
    assert run.data.tags["tuneloop.gate"] == "blocked" and run.data.metrics["gate_passed"] == 0
    assert run.data.metrics["gate_rules_failed"] == 1
    story = run.data.tags[NOTE]
    assert story.startswith("### Pipeline run story-2: rejected by the evaluation gate")
    assert "**Evaluation gate: BLOCKED** - 0/1 rules passed (reference: champion v1)" in story
    assert "| ticket_routing | accuracy | 0.667 | 0.75 | min 0.99 | **FAIL** | candidate 0.667 < floor 0.99 |" in story
    assert "**Model version**: none registered by this run." in story


def test_a_failed_stage_and_the_exit_handler_tell_why(env: Any) -> None:
    from tuneloop import stages
    from tuneloop.registry import NOTE, Registry

    cfg, _, _ = env
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("story-3", "kfp-story-3", {})
    worker = "\n".join(f"[rank1] step {i}" for i in range(30))
    with pytest.raises(RuntimeError), reg.stage_run(parent, "sft"):
        raise RuntimeError("sft: rank 1 was killed (SIGKILL) from outside\n"
                           f"sft worker exited with 1; last lines:\n{worker}")
    r = stages.finalize_stage(cfg, "kfp-story-3", "FAILED", "")
    assert r["outcome"] == "failed at sft: rank 1 was killed (SIGKILL) from outside"
    run = reg.client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["tuneloop.failed_stage"] == "sft"
    assert run.data.tags["tuneloop.error"] == "rank 1 was killed (SIGKILL) from outside"
    story = run.data.tags[NOTE]
    assert story.startswith("### Pipeline run story-3: failed at sft: rank 1 was killed (SIGKILL) from outside")
    assert "#### sft: FAILED" in story and "[rank1] step 29" in story, "the worker's last lines"
    sft = reg.stage_runs(parent, "sft")[0]
    assert "[rank1] step 29" in sft.data.tags[NOTE] and "[rank1] step 14" not in sft.data.tags[NOTE]


def test_rounding_dates_and_the_model_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneloop.evaluate.model_card import duration, model_card, num, run_story, when
    from tuneloop.registry import _round

    assert [num(x) for x in (0.6666666666666666, 211797.12345, 12, None, 0.000123456, 7.4912)] == \
        ["0.667", "211,797", "12", "-", "0.000123", "7.49"]
    assert num(-0.01234, signed=True) == "-0.0123" and num(0.5, signed=True) == "+0.5"
    assert _round(0.6666666666666666) == 0.666667 and _round(404) == 404 and _round(1795853833.0) == 1795853833.0
    assert duration(12.34) == "12.3 s" and duration(373) == "6 min 13 s" and duration(7300) == "2 h 01 min"
    assert when(0) == "1970-01-01 00:00:00 UTC"
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    report = {"by_kind": {"sft": {"accepted": 36, "read": 36, "per_slice": {"ticket_routing": 24}},
                          "preference": {"accepted": 12, "read": 12, "per_slice": {}}},
              "feedback": {"sft": 0, "preference": 0}, "quarantined": 0, "per_reason": {}}
    card = model_card(cfg, "1", {}, report, METRICS, GATE_PASSED)
    assert "| slice | n | metric | this version | base model |" in card, "the base model column once"
    assert card.count("base model |") == 1
    assert "| ticket_routing | 8 | perplexity | 3.21 | 211,797 |" in card
    assert "perplexity of 211,797" in card and "never saw" in card
    # MLflow keeps 8,000 characters of a description: long sections are shortened, never the stage table
    stages = [{"stage": f"stage{i}", "status": "FINISHED", "wall_s": 1.0, "outcome": "ok"} for i in range(10)]
    story = run_story("Pipeline run r", "failed at sft: x", stages, [("sft: FAILED", "line\n" * 3000),
                                                                      ("Evaluation gate", "g" * 300)], ["footer"])
    assert len(story) <= 8000 and "| stage9 | FINISHED |" in story and "g" * 300 in story and story.endswith("footer\n")


def _stale_parent(reg: Any, name: str, tags: dict[str, str], start_ms: int | None = None) -> str:
    run = reg.client.create_run(reg.experiment_id(), run_name=name, start_time=start_ms,
                                tags={"tuneloop.kfp_run_id": name, **tags})
    return run.info.run_id


def _stage(reg: Any, parent: str, stage: str, tags: dict[str, str], start_ms: int | None = None,
           end_ms: int | None = None) -> str:
    rid = reg.client.create_run(reg.experiment_id(), run_name=stage, start_time=start_ms, tags={
        "mlflow.parentRunId": parent, "tuneloop.stage": stage, "tuneloop.kfp_run_id": "", **tags}).info.run_id
    if end_ms is not None:
        reg.client.set_terminated(rid, "FINISHED", end_time=end_ms)
    return rid


def test_a_new_run_closes_runs_an_earlier_killed_process_left_running(env: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import tuneloop.deploy.canary
    from tuneloop import stages
    from tuneloop.registry import NOTE, Registry, process_id

    cfg, _, tmp = env
    reg = Registry(cfg)
    host, me = socket.gethostname(), process_id()
    dead = f"{os.getpid()}:0"  # this pid with another start time: the process that had it is gone (pid reused)
    hours_ago = int((time.time() - 10 * 3600) * 1000)
    here = {"tuneloop.host": host}
    # A: this host, its driver and its sft task gone; a canary of it still live
    a = _stale_parent(reg, "killed-here", {**here, "tuneloop.driver": dead, "tuneloop.process": dead})
    a_sft = _stage(reg, a, "sft", {**here, "tuneloop.process": dead})
    version = _register(reg, a, tmp)
    reg.client.set_terminated(a_sft, "RUNNING")  # _register closed nothing of sft; make sure it reads RUNNING
    reg.set_alias("canary", version)
    # B: alive on this host (driver and task are this process)
    b = _stale_parent(reg, "alive-here", {**here, "tuneloop.driver": me, "tuneloop.process": me})
    b_sft = _stage(reg, b, "sft", {**here, "tuneloop.process": me})
    # C: another host, nothing happened for 10 hours
    c = _stale_parent(reg, "quiet-elsewhere", {"tuneloop.host": "pod-x"}, hours_ago)
    _stage(reg, c, "ingest", {"tuneloop.host": "pod-x"}, hours_ago, hours_ago + 60_000)
    # D: another host, busy a minute ago
    d = _stale_parent(reg, "busy-elsewhere", {"tuneloop.host": "pod-y"}, hours_ago)
    d_sft = _stage(reg, d, "sft", {"tuneloop.host": "pod-y"}, int((time.time() - 60) * 1000))
    # E: another host, its evaluate task open for 10 hours (KFP's timeout ended it long ago)
    e = _stale_parent(reg, "timed-out-elsewhere", {"tuneloop.host": "pod-z"}, hours_ago)
    e_eval = _stage(reg, e, "evaluate", {"tuneloop.host": "pod-z"}, hours_ago)
    # a run that is not tuneloop's
    foreign = reg.client.create_run(reg.experiment_id(), run_name="someone-else").info.run_id

    monkeypatch.setattr(tuneloop.deploy.canary, "gateway_alive", lambda url: True)
    r = stages.check_prerequisites(cfg, "new-run", "kfp-new")

    status = {k: reg.client.get_run(v).info.status for k, v in dict(
        a=a, a_sft=a_sft, b=b, b_sft=b_sft, c=c, d=d, d_sft=d_sft, e=e, e_eval=e_eval, foreign=foreign).items()}
    assert status == {"a": "KILLED", "a_sft": "KILLED", "b": "RUNNING", "b_sft": "RUNNING", "c": "KILLED",
                      "d": "RUNNING", "d_sft": "RUNNING", "e": "KILLED", "e_eval": "KILLED", "foreign": "RUNNING"}
    assert sorted(r["closed"]) == sorted(["sft", "evaluate", "killed-here", "quiet-elsewhere", "timed-out-elsewhere"])
    ta = reg.client.get_run(a).data.tags
    assert ta["tuneloop.outcome"].startswith(f"abandoned at sft: the process that ran it ({os.getpid()} on {host}) "
                                             "is gone; closed by run new-run")
    assert ta["tuneloop.outcome"].endswith(f"; canary v{version} rolled back")
    assert "canary" not in reg.aliases(), "a dead run's canary does not stay live"
    assert ta[NOTE].startswith("### Pipeline run killed-here: abandoned at sft") and "| sft | KILLED |" in ta[NOTE]
    sft_tags = reg.client.get_run(a_sft).data.tags
    assert sft_tags["tuneloop.error"] == f"abandoned: its process ({os.getpid()} on {host}) is gone"
    assert re.match(r"abandoned: nothing happened in it for 59\d min",
                    reg.client.get_run(c).data.tags["tuneloop.outcome"])
    assert "longer than its task's timeout" in reg.client.get_run(e_eval).data.tags["tuneloop.outcome"]
    new = reg.pipeline_run_of_kfp("kfp-new")
    check = reg.stage_runs(new.info.run_id, "check_prerequisites")[0]
    assert check.data.metrics["abandoned_runs_closed"] == 5 and "killed-here" in check.data.tags[NOTE]
    # the new run records who runs it, so the next run can tell
    assert new.data.tags["tuneloop.host"] == host and new.data.tags["tuneloop.driver"] == me
    assert stages.close_abandoned_runs(cfg, reg, "kfp-other") == [], "nothing left to close; the new run is alive"
