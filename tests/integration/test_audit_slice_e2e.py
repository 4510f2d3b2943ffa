"""Rated production requests flow into the next run's evaluation: `tuneloop labels import --source audit`,
then the real ingest and validate stages (MLflow, Great Expectations) and the evaluation of the tiny model,
which scores slice `ticket_routing-audit` and gates it against the champion."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import tiny_config
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


def test_the_audit_sample_becomes_a_gated_eval_slice(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneloop.cli import app
    from tuneloop.config import load_config
    from tuneloop.evaluate.run import evaluate_models
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.registry import Registry
    from tuneloop.stages import ingest_stage, validate_stage

    path = tiny_config(tmp_path, tiny_model_dir)
    cfg = load_config(path)
    store = FeedbackStore(cfg.feedback_db)
    now = time.time()
    issues = ["my card was charged twice", "the parcel never arrived", "I cannot log in since Monday",
              "the app crashes on start", "refund for order 88 is missing", "package left at wrong door"]
    truth = ["billing", "shipping", "account", "technical", "billing", "shipping"]
    for i, text in enumerate(issues):
        store.log_request(request_id=f"req{i}", user_id=f"u{i}", model_version="1", variant="champion",
                          slice="ticket_routing", prompt=f"Route this support ticket: {text}", output="billing",
                          status="ok", latency_ms=4.0, created=now - 100 + i)
    store.flush()
    # two raters; they disagree on req5 (a tie, left out); a user also corrected req1 - a training record
    # whose prompt is now held-out evaluation, so it is quarantined as an eval leak
    lines = ["request_id,rater,label"] + [f"req{i},ana,{t}" for i, t in enumerate(truth)]
    lines += [f"req{i},bo,{t}" for i, t in enumerate(truth[:5])] + ["req5,bo,billing"]
    (tmp_path / "audit.csv").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["labels", "import", str(tmp_path / "audit.csv"), "--source", "audit",
                                   "--config", str(path)])
    assert res.exit_code == 0, res.output
    assert store.add_feedback("req1", correction="shipping")
    store.flush()

    reg = Registry(cfg)
    parent = reg.start_pipeline_run("run-audit", "kfp-audit", {})
    report = ingest_stage(cfg, parent, tmp_path / "ds")
    assert report["audit"]["rated"] == 6 and report["audit"]["tied"] == 1
    assert report["audit"]["examples"] == 5 and report["audit"]["accepted"] == 5
    evals = [json.loads(x) for x in (tmp_path / "ds" / "eval.jsonl").read_text().splitlines()]
    audited = {r["id"]: r for r in evals if r["slice"] == "ticket_routing-audit"}
    assert set(audited) == {f"audit-req{i}" for i in range(5)}
    assert audited["audit-req1"]["response"] == "shipping" and audited["audit-req1"]["source"] == "audit-labels"
    assert "the parcel never arrived" in audited["audit-req1"]["user_text"]
    quarantine = [json.loads(x) for x in (tmp_path / "ds" / "quarantine.jsonl").read_text().splitlines()]
    leak = [q for q in quarantine if q["source"] == "feedback-store"]
    assert leak and all("eval leak" in q["reason"] and "audit-req1" in q["reason"] for q in leak)
    assert json.loads((tmp_path / "ds" / "report.json").read_text())["audit"]["tied"] == 1
    runs = reg.client.search_runs([reg.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert runs[0].data.metrics["audit_eval_records"] == 5
    assert "audited production requests in the eval set: 5 (1 left out: raters tied)" in \
        runs[0].data.tags["mlflow.note.content"]

    v = validate_stage(cfg, parent, tmp_path / "ds", tmp_path / "v")
    assert v["passed"], v["failed"]

    result = evaluate_models(cfg.evaluate, tiny_model_dir, tmp_path / "ds" / "eval.jsonl", None, None, "base model",
                             tmp_path / "eval", cfg.data.system_prompt)
    m = result["metrics"]["candidate"]["ticket_routing-audit"]
    assert m["n"] == 5 and "accuracy" in m and m["confusion"]["labels"][:4] == \
        cfg.evaluate.slices["ticket_routing"].labels
    [rule] = [r for r in result["gate"]["rules"] if r["slice"] == "ticket_routing-audit"]
    assert rule["metric"] == "accuracy" and rule["kind"] == "max_regression@0.9" and rule["passed"]
    assert "ticket_routing-audit" in (tmp_path / "eval" / "report.md").read_text()
    store.close()
