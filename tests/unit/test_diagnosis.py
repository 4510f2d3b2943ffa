"""The diagnosis of a blocked candidate (evaluate/diagnosis.py), built from files as a run leaves them:
a sentiment model retrained on new clothing reviews only, which forgot the electronics slice the
champion was trained on. And `tuneloop diagnose RUN_ID` reading the same files from an MLflow store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.forgetting]

LABELS = ["positive", "negative", "neutral"]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(rid: str, sl: str, text: str, label: str, source: str) -> dict[str, Any]:
    return {"id": rid, "slice": sl, "source": source, "user_text": text, "response": label,
            "prompt": f"<user>{text}</user>", "completion": f"{label}<end>"}


@pytest.fixture
def run_files(tmp_path: Path) -> dict[str, Path]:
    # the champion: electronics and clothing reviews, balanced labels
    champ = [_sft(f"el-{i}", "electronics", f"the charger {i} works", LABELS[i % 3], "/data/electronics.jsonl")
             for i in range(60)]
    champ += [_sft(f"cl-{i}", "clothing", f"the shirt {i} fits", LABELS[i % 3], "/data/clothing.jsonl")
              for i in range(60)]
    # this run: clothing only, mostly positive, plus feedback corrections of which 3 users sent most
    run = [_sft(f"cl2-{i}", "clothing", f"the dress {i} is lovely", "positive" if i % 5 else "negative",
                "/data/clothing-2025.jsonl") for i in range(80)]
    run += [_sft(f"fb-req{i}-sft", "clothing", f"my jacket {i}", "positive", "feedback-store") for i in range(20)]
    users = {f"req{i}": ("u1", "u2", "u3")[i % 3] if i < 16 else f"u{i}" for i in range(20)}
    evaluation = tmp_path / "evaluation"
    gate = {"passed": False, "reference": "champion v3", "rules": [
        {"slice": "electronics", "metric": "accuracy", "kind": "max_regression@0.9", "candidate": 0.55,
         "champion": 0.85, "threshold": 0.8, "ci": [-0.42, -0.18], "verdict": "fail", "passed": False,
         "why": "candidate 0.5500 vs champion v3 0.8500: change -0.3000, allowed -0.05; 90% CI [-0.42, -0.18] -> fail"},
        {"slice": "clothing", "metric": "accuracy", "kind": "max_regression@0.9", "candidate": 0.9, "champion": 0.8,
         "threshold": 0.75, "ci": [0.02, 0.18], "verdict": "pass", "passed": True, "why": "..."}]}
    (evaluation).mkdir(parents=True)
    (evaluation / "gate.json").write_text(json.dumps(gate))
    preds = []
    for i in range(20):
        ref = LABELS[i % 3]
        champ_ans = ref if i < 17 else "neutral"
        cand_ans = ref if i < 11 else "positive"  # 11, 13, 14, 16, 17 flip right -> wrong
        for who, ans, nll in (("champion", champ_ans, 1.0), ("candidate", cand_ans, 1.0 + i / 10)):
            preds.append({"model": who, "id": f"ev-el-{i}", "slice": "electronics",
                          "prompt": f"the headphones {i} broke", "prediction": ans, "reference": ref,
                          "nll_sum": nll * 2, "n_tokens": 2})
        preds += [{"model": who, "id": f"ev-cl-{i}", "slice": "clothing", "prompt": f"the coat {i}",
                   "prediction": "positive", "reference": "positive", "nll_sum": 1.0, "n_tokens": 2}
                  for who in ("champion", "candidate")]
    _write(evaluation / "predictions.jsonl", preds)
    dataset = tmp_path / "dataset"
    _write(dataset / "sft.jsonl", run)
    (dataset / "report.json").write_text(json.dumps({"replay": {"share": 0.0, "accepted": 0,
                                                                "note": "replay is off (data.replay_share = 0)"}}))
    drift = tmp_path / "drift.json"
    drift.write_text(json.dumps({"summary": {"computed": True, "reference": "champion v3 training data",
                                             "descriptors": {"prompt_words": {"drifted": True},
                                                             "answer_words": {"drifted": False}},
                                             "embedding_drift_score": 0.81}}))
    return {"evaluation": evaluation, "dataset": dataset, "champion": _write(tmp_path / "champ" / "sft.jsonl", champ),
            "drift": drift, "users": users}


def _cfg():
    from tuneloop.config import EvaluateConfig

    return EvaluateConfig.model_validate({"slices": {sl: {"task": "classification", "labels": LABELS}
                                                     for sl in ("electronics", "clothing")},
                                          "gates": [{"metric": "accuracy", "slice": sl, "max_regression": 0.05,
                                                     "confidence": 0.9} for sl in ("electronics", "clothing")]})


def test_diagnosis_names_the_missing_slice_lists_flips_and_ranks_causes(run_files: dict[str, Any]) -> None:
    from tuneloop.evaluate.diagnosis import diagnose, to_markdown

    d = diagnose(run_files["evaluation"], run_files["dataset"], run_files["champion"], run_files["drift"], _cfg(),
                 feedback_users=run_files["users"])
    # what regressed, with its interval
    assert [(r["slice"], r["metric"], r["ci"]) for r in d["regressions"]] == [("electronics", "accuracy",
                                                                                [-0.42, -0.18])]
    assert d["regressions"][0]["change"] == pytest.approx(-0.30)
    # the missing slice is the first cause, in plain words
    causes = [c["cause"] for c in d["causes"]]
    assert causes[0] == "slice electronics had no training records in this run (the champion's training data had " \
                        "60, 50%)"
    scores = [c["score"] for c in d["causes"]]
    assert scores == sorted(scores, reverse=True)
    assert any("nothing of the champion's training data was replayed" in c for c in causes)
    assert any(c.startswith("label mix of slice clothing shifted") or "label positive of slice clothing" in c
               for c in causes), causes
    assert "80% of feedback came from 3 users (of 7)" in causes, causes
    assert any("drifted from the champion's" in c and "embedding drift score 0.81" in c for c in causes)
    # flipped records with before/after answers
    fl = d["flipped"]
    assert fl["reference_model"] == "champion" and fl["counts"]["electronics"]["right_to_wrong"] == 5
    assert fl["counts"]["clothing"]["right_to_wrong"] == 0
    first = fl["right_to_wrong"][0]
    assert first["slice"] == "electronics" and first["before"] == first["reference"] != first["after"]
    assert fl["nll_increase"]["electronics"][0]["id"] == "ev-el-19"
    # composition: slices, labels, sources, feedback share and users
    run, champ = d["composition"]["run"], d["composition"]["champion"]
    assert "electronics" not in run["per_slice"] and champ["per_slice"]["electronics"]["records"] == 60
    assert run["labels"]["clothing"]["positive"] > run["labels"]["clothing"]["negative"]
    assert run["feedback"] == {**run["feedback"], "records": 20, "share": 0.2, "users": 7}
    assert run["per_source"]["feedback-store"] == 20 and run["per_source"]["clothing-2025.jsonl"] == 80
    assert d["attributions"]["records"] == [] and "not requested" in d["attributions"]["note"]
    md = to_markdown(d)
    for needle in ("# Diagnosis: candidate blocked", "| electronics | accuracy | 0.5500 | 0.8500 | -0.3000 | "
                   "[-0.4200, -0.1800] | fail |", "1. slice electronics had no training records",
                   "| ev-el-11 | electronics |", "| slice electronics | 0 (0%) | 60 (50%) |",
                   "1 of 2 descriptors drifted"):
        assert needle in md, needle
    json.dumps(d)  # JSON-able as it is


def test_diagnosis_without_champion_data_or_model_still_explains(run_files: dict[str, Any], tmp_path: Path) -> None:
    from tuneloop.evaluate.diagnosis import diagnose, write_diagnosis

    d = diagnose(run_files["evaluation"], run_files["dataset"], None, None, None, base_dir=tmp_path / "no-model",
                 candidate=tmp_path / "no-adapter")
    assert d["causes"][0]["cause"] == "slice electronics had no training records in this run"
    assert d["composition"]["champion"] is None and any("champion's training data" in n for n in d["notes"])
    assert d["attributions"]["records"] == [] and "could not be loaded" in d["attributions"]["note"]
    md = write_diagnosis(d, tmp_path / "out")
    assert md.read_text().startswith("# Diagnosis") and json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    # the evaluate stage's report (its KFP Markdown output) gets the diagnosis appended
    from tuneloop.evaluate.diagnosis import write_blocked_report

    (run_files["evaluation"] / "report.md").write_text("# Evaluation\n\n**Gate: FAILED**\n")
    write_blocked_report(d, run_files["evaluation"])
    report = (run_files["evaluation"] / "report.md").read_text()
    assert report.startswith("# Evaluation") and "# Diagnosis: candidate blocked" in report
    assert (run_files["evaluation"] / "diagnosis.json").exists()


def test_token_attributions_of_flipped_answers_on_the_candidate(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneloop.evaluate.diagnosis import token_attributions
    from tuneloop.tiny import build_random_adapter

    adapter = build_random_adapter(tiny_model_dir, tmp_path / "cand", seed=3)
    recs = [{"id": f"r{i}", "slice": "ticket_routing", "prompt": f"I was charged twice for order {i}",
             "reference": "billing", "before": "billing", "after": "shipping"} for i in range(4)]
    out = token_attributions(tiny_model_dir, adapter, recs, max_records=3, max_seconds=120)
    assert [r["id"] for r in out["records"]] == ["r0", "r1", "r2"]
    top = out["records"][0]["top_tokens"]
    assert top and all(isinstance(t["attribution"], float) for t in top) and out["records"][0]["target"] == "shipping"
    assert abs(top[0]["attribution"]) >= abs(top[-1]["attribution"])
    bounded = token_attributions(tiny_model_dir, adapter, recs, max_records=3, max_seconds=0.0)
    assert bounded["records"] == [] and "stopped after" in bounded["note"]


def test_cli_diagnose_prints_the_diagnosis_of_a_finished_run(run_files: dict[str, Any], tmp_path: Path) -> None:
    """A pipeline run in an MLflow store (sqlite) with the artifacts its stages log; `tuneloop diagnose`
    computes the diagnosis from them, and prints a stored one as it is."""
    import shutil

    from typer.testing import CliRunner

    from tuneloop.cli import app
    from tuneloop.config import load_config
    from tuneloop.registry import Registry
    from tuneloop.tiny import tiny_run_config

    cfg_path = tiny_run_config(tmp_path, Path("/nonexistent-model"))
    reg = Registry(load_config(cfg_path))
    parent = reg.start_pipeline_run("tiny-diag", "kfp-diag", {})
    with reg.stage_run(parent, "ingest") as rid:
        reg.log_artifacts(rid, run_files["dataset"], "dataset")
    with reg.stage_run(parent, "validate_data") as rid:
        d = tmp_path / "validation" / "drift"
        d.mkdir(parents=True)
        shutil.copy(run_files["drift"], d / "drift.json")
        reg.log_artifacts(rid, tmp_path / "validation", "validation")
    with reg.stage_run(parent, "evaluate") as rid:
        reg.log_artifacts(rid, run_files["evaluation"], "evaluation")
    with reg.stage_run(parent, "repair") as rid:  # the ladder's record, as the repair stage logs it
        ladder = tmp_path / "ladder"
        ladder.mkdir()
        (ladder / "ladder.json").write_text(json.dumps({"ran": True, "reason": "only regression rules of old slices "
                                                        "failed: electronics/accuracy", "attempts": [
                                                            {"mitigation": "replay", "passed": True, "wall_s": 75.0}]}))
        (ladder / "ladder.md").write_text("## Forgetting repair ladder\n\nrepaired by replay\n")
        reg.log_artifacts(rid, ladder, "repair")
    for stage in ("ingest", "validate_data", "evaluate"):  # the store's runs are FINISHED
        assert all(r.info.status == "FINISHED" for r in reg.stage_runs(parent, stage))
    res = CliRunner().invoke(app, ["diagnose", parent, str(cfg_path), "--out", str(tmp_path / "diag")])
    assert res.exit_code == 0, res.output
    assert "1. slice electronics had no training records in this run" in res.output
    assert "token attributions need the candidate's adapter" in res.output
    assert "## Repair ladder" in res.output and "1. replay: PASS, 75 s" in res.output
    assert (tmp_path / "diag" / "diagnosis.md").exists()
    by_name = CliRunner().invoke(app, ["diagnose", "tiny-diag", str(cfg_path), "--json"])
    assert by_name.exit_code == 0 and json.loads(by_name.output)["regressions"][0]["slice"] == "electronics"
    # a stored diagnosis is printed as it is
    stored = tmp_path / "stored"
    stored.mkdir()
    (stored / "diagnosis.md").write_text("# Diagnosis: stored by the evaluate stage\n")
    parent2 = reg.start_pipeline_run("tiny-diag-2", "kfp-diag-2", {})
    with reg.stage_run(parent2, "evaluate") as rid:
        reg.log_artifacts(rid, run_files["evaluation"], "evaluation")
        reg.log_artifacts(rid, stored, "evaluation")
    again = CliRunner().invoke(app, ["diagnose", parent2, str(cfg_path)])
    assert again.exit_code == 0 and again.output.strip() == "# Diagnosis: stored by the evaluate stage"
    missing = CliRunner().invoke(app, ["diagnose", "no-such-run", str(cfg_path)])
    assert missing.exit_code == 1 and "no pipeline run" in missing.output
