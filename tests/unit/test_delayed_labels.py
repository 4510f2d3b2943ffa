"""Ground truth that arrives late: imported by request id (CSV, JSONL, Label Studio), from feedback, and
the realized precision/recall per slice and label with the quality SLOs checked on them."""

from __future__ import annotations

import json
import time

import pytest
from conftest import tiny_config
from typer.testing import CliRunner

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "account", "technical"]


def _serve(store, n: int, answer: str, start: float, prefix: str) -> list[str]:
    ids = []
    for i in range(n):
        rid = f"{prefix}{i}"
        store.log_request(request_id=rid, user_id="u", model_version="base", variant="champion",
                          slice="ticket_routing", prompt=f"ticket {prefix}{i}", output=answer, status="ok",
                          latency_ms=5.0, created=start + i)
        ids.append(rid)
    return ids


def test_imported_labels_give_realized_precision_recall_and_an_slo_breach(tmp_path, tiny_model_dir):
    from tuneloop.cli import app
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.check import check

    slos = [{"slice": "ticket_routing", "label": "billing", "metric": "precision", "min": 0.8},
            {"slice": "ticket_routing", "label": "shipping", "metric": "recall", "min": 0.9},
            {"slice": "ticket_routing", "metric": "accuracy", "min": 0.5}]
    path = tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False, monitor__slos=slos,
                       monitor__retrain_on=["quality_slo"])
    cfg = load_config(path)
    store = FeedbackStore(cfg.feedback_db)
    now = time.time()
    billing = _serve(store, 60, "Billing.", now - 10 * 3600, "b")  # answered billing (normalised like eval)
    shipping = _serve(store, 60, "shipping", now - 2 * 3600, "s")
    store.log_request(request_id="g0", user_id="u", model_version="base", variant="champion", slice="general_qa",
                      prompt="hi", output="hello", status="ok", latency_ms=1.0, created=now - 60)
    store.flush()
    # truth arrives later: 20 of the billing answers were billing, 40 were account; the shipping ones were right
    lines = ["request_id,label"] + [f"{rid},{'billing' if i < 20 else 'account'}" for i, rid in enumerate(billing)]
    lines += [f"{rid},Shipping" for rid in shipping[:50]]
    lines += ["nope,billing", f"{shipping[50]},refund", "g0,billing", f"{shipping[51]},"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["labels", "import", str(tmp_path / "labels.csv"), "--config", str(path)])
    assert res.exit_code == 1, res.output  # some rows refused, the others stored
    assert "110 labels stored (source import), 1 rows without a label, 3 refused" in res.output
    assert "labels.csv: row 112: request 'nope' is not in the request log" in res.output
    assert "label 'refund' is not one of slice 'ticket_routing'" in res.output
    assert "'general_qa', not a classification slice" in res.output
    # and from feedback: a trusted correction naming a label, and a thumbs-up on a shipping answer
    store.add_feedback(shipping[52], correction="technical")
    store.add_feedback(shipping[53], score=1.0)

    report = check(cfg, tmp_path / "mon", now=now)
    q = report["quality"]["slices"]["ticket_routing"]
    r = q["realized"]
    assert r["requests"] == 120 and r["labelled"] == 112 and r["sources"] == {"import": 110, "feedback": 2}
    assert r["per_label"]["billing"]["precision"]["value"] == pytest.approx(20 / 60)
    assert r["per_label"]["billing"]["precision"]["upper"] < 0.8
    assert r["per_label"]["billing"]["recall"]["value"] == 1.0
    assert r["per_label"]["account"]["recall"] == {"value": 0.0, "n": 40, "lower": 0.0,
                                                   "upper": pytest.approx(0.0634, abs=1e-3)}
    assert r["per_label"]["shipping"]["precision"]["value"] == pytest.approx(51 / 52)
    assert r["accuracy"]["value"] == pytest.approx(71 / 112)
    assert [c["labelled"] for c in r["chunks"]] == [60, 52]  # realized per chunk, as the requests came
    verdicts = {(s["label"], s["metric"]): s["verdict"] for s in report["quality"]["slos"]}
    assert verdicts == {("billing", "precision"): "breach", ("shipping", "recall"): "ok", (None, "accuracy"): "ok"}
    assert report["quality"]["slo_breaches"] == ["ticket_routing/billing/precision"]
    assert report["retrain"] is True and report["reasons"] == ["quality_slo"]
    prom = (tmp_path / "mon" / "monitor.prom").read_text()
    assert ('tuneloop_monitor_quality_slo_breach{champion="base",slice="ticket_routing",label="billing",'
            'metric="precision"} 1.0') in prom
    assert 'tuneloop_monitor_realized_precision{champion="base",slice="ticket_routing",label="billing"} 0.333' in prom
    saved = json.loads((tmp_path / "mon" / "monitor.json").read_text())
    assert saved["quality"]["slos"][0]["verdict"] == "breach"


def test_too_few_labels_give_no_slo_verdict(tmp_path, tiny_model_dir):
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.check import check
    from tuneloop.monitor.labels import import_labels

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False, monitor__slos=[
        {"slice": "ticket_routing", "label": "billing", "metric": "precision", "min": 0.9}]))
    store = FeedbackStore(cfg.feedback_db)
    ids = _serve(store, 10, "billing", time.time() - 60, "x")
    out = import_labels(store, [{"request_id": rid, "label": "account", "rater": "", "where": rid} for rid in ids],
                        {"ticket_routing": LABELS}, "import")
    assert out == {"stored": 10, "unrated": 0, "refused": []}
    report = check(cfg, tmp_path / "mon")
    assert report["quality"]["slos"][0]["verdict"] == "insufficient" and report["quality"]["slo_breaches"] == []


def test_label_studio_export_is_read_as_documented(tmp_path):
    """The JSON export (tasks with annotations, cancelled ones skipped, completed_by an id or an object) and the
    JSON-MIN export, as Label Studio's docs give them (Label Studio itself is not installed here)."""
    from tuneloop.evaluate.label_studio import choices_config, read_export
    from tuneloop.monitor.labels import read_label_file

    export = [
        {"id": 7, "data": {"request_id": "r1", "prompt": "my card was charged twice", "answer": "billing"},
         "annotations": [
             {"id": 1, "completed_by": 3, "was_cancelled": False, "ground_truth": False, "lead_time": 4.2,
              "result": [{"id": "a1", "from_name": "label", "to_name": "prompt", "type": "choices",
                          "value": {"choices": ["billing"]}}]},
             {"id": 2, "completed_by": {"id": 4, "email": "rater@example.com"}, "was_cancelled": False,
              "result": [{"id": "a2", "from_name": "label", "to_name": "prompt", "type": "choices",
                          "value": {"choices": ["account"]}}]},
             {"id": 3, "completed_by": 5, "was_cancelled": True, "result": []}]},
        {"id": 8, "data": {"request_id": "r2"}, "annotations": []}]
    (tmp_path / "export.json").write_text(json.dumps(export))
    rows = read_label_file(tmp_path / "export.json")
    assert [(r["request_id"], r["label"], r["rater"]) for r in rows] == [("r1", "billing", "3"),
                                                                         ("r1", "account", "rater@example.com")]
    (tmp_path / "min.json").write_text(json.dumps([{"id": 7, "request_id": "r1", "prompt": "p", "label": "shipping",
                                                     "annotator": 3, "annotation_id": 1, "lead_time": 2.0}]))
    assert [(r["request_id"], r["label"], r["rater"]) for r in read_label_file(tmp_path / "min.json")] == \
        [("r1", "shipping", "3")]
    ratings = [{"id": 1, "data": {"item_id": "e1"}, "annotations": [{"completed_by": 1, "result": [
        {"from_name": "helpfulness", "to_name": "answer", "type": "rating", "value": {"rating": 4}}]}]}]
    (tmp_path / "ratings.json").write_text(json.dumps(ratings))
    assert read_export(tmp_path / "ratings.json")[0]["values"] == {"helpfulness": 4}
    import xml.etree.ElementTree as ET

    view = ET.fromstring(choices_config(["billing", "a \"quoted\" <label>"]))  # well-formed whatever the labels
    assert [c.get("value") for c in view.iter("Choice")] == ["billing", "a \"quoted\" <label>"]
    assert view.find("Choices").get("name") == "label"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_label_file(tmp_path / "bad.json")


def test_review_import_reads_label_studio_ratings(tmp_path):
    from tuneloop.evaluate.review import import_ratings

    def annotation(rater: int, scores: tuple[int, int, int]) -> dict:
        return {"completed_by": rater, "was_cancelled": False, "result": [
            {"from_name": d, "to_name": "answer", "type": "rating", "value": {"rating": s}}
            for d, s in zip(("helpfulness", "harmlessness", "honesty"), scores, strict=True)]}

    tasks = [{"id": i, "data": {"item_id": f"e{i}", "slice": "t"},
              "annotations": [annotation(1, (i % 5 + 1, 5, 4)), annotation(2, (i % 5 + 1, 5, 4))]} for i in range(6)]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    summary = import_ratings([tmp_path / "ls.json"], 0.4)
    assert summary["raters"] == ["1", "2"] and summary["items"] == 6
    assert summary["agreement"]["helpfulness"]["kappa"] == 1.0


def test_slo_config_is_checked_against_the_slices():
    from pydantic import ValidationError

    from tuneloop.config import EvaluateConfig
    from tuneloop.config.deploy import MonitorConfig

    slices = EvaluateConfig.model_validate({
        "slices": {"t": {"task": "classification", "labels": LABELS}, "g": {"task": "generation"}},
        "gates": [{"metric": "nll", "slice": "t", "max_regression": 1.0}]}).slices
    MonitorConfig(slos=[{"slice": "t", "label": "billing", "metric": "precision", "min": 0.9}]).check_slices(slices)
    with pytest.raises(ValueError, match=r"slos\[0\].label: 'refund' is not a label of slice 't'"):
        MonitorConfig(slos=[{"slice": "t", "label": "refund", "metric": "recall", "min": 0.9}]).check_slices(slices)
    with pytest.raises(ValueError, match="'g' is not a classification slice"):
        MonitorConfig(min_estimated_accuracy_per_slice={"g": 0.8}).check_slices(slices)
    with pytest.raises(ValidationError, match="precision and recall need a `label`"):
        MonitorConfig(slos=[{"slice": "t", "metric": "precision", "min": 0.9}])
