"""The diagnosis of a production decay (monitor/decay.py): what decayed, the wrong answers, the traffic against
the champion's training data and the likely causes, ranked; and through monitor.check on a real feedback store."""

from __future__ import annotations

import json
import time

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "account", "technical"]


def _words(n: int, tag: str) -> str:
    return " ".join([tag] + [f"w{i}" for i in range(n - 1)])


def _report() -> dict:
    est = {"value": 0.62, "lower": 0.55, "upper": 0.69}
    return {
        "time": 1e9, "champion": "3", "window_requests": 100, "retrain": True,
        "reasons": ["estimated_quality", "drift"],
        "signals": {"drift": True, "feedback_trend": False, "feedback_volume": False, "estimated_quality": True,
                    "quality_slo": False},
        "slo": {"error_rate": 0.0, "p95_latency_ms": 20.0, "error_rate_ok": True, "latency_ok": True},
        "feedback_trend": {"verdict": "insufficient", "baseline_n": 0, "window_n": 0},
        "feedback_volume": {"since_champion": 3, "threshold": 500},
        "drift": {"computed": True, "drifted_share": 0.33, "embedding_drift_score": 0.41,
                  "descriptors": {"prompt_chars": {"drifted": True}, "prompt_words": {"drifted": True},
                                  "answer_chars": {"drifted": False}, "answer_words": {"drifted": False},
                                  "prompt_non_letter_pct": {"drifted": False}, "prompt_oov_share": {"drifted": False}}},
        "quality": {
            "slices": {"ticket_routing": {
                "requests": 30, "with_probabilities": 30, "off_label_answers": 0, "floor": 0.8,
                "estimate_verdict": "below", "estimate": {"window": {"accuracy": est}},
                "realized": {"requests": 30, "labelled": 15, "accuracy": {"value": 5 / 15, "lower": 0.15,
                                                                          "upper": 0.58, "n": 15}, "per_label": {}},
                "audit": {"n_rated": 0, "value": None}}},
            "slos": [], "below_floor": ["ticket_routing"], "slo_breaches": [],
            "reference": {"version": "3", "slices": {"ticket_routing": {"n": 50, "accuracy": 0.9,
                                                                         "off_label_share": 0.0}}}}}


def _synthetic():
    """Champion trained on 57 ticket_routing, 38 general_qa, 5 returns records (8-word prompts); the window: 45%
    returns, 20-word prompts, 70 of 100 requests from 3 users, ticket_routing answered mostly `account`."""
    champ = []
    for i in range(100):
        sl = "ticket_routing" if i < 57 else "general_qa" if i < 95 else "returns"
        resp = (["billing"] * 23 + ["shipping"] * 17 + ["account"] * 17)[i] if i < 57 else f"a long answer {i}"
        champ.append({"id": f"c{i}", "slice": sl, "user_text": _words(8, sl), "response": resp,
                      "source": "data/train.jsonl"})
    rows = []
    for i in range(100):
        sl = "returns" if i < 45 else "ticket_routing" if i < 75 else "general_qa"
        row = {"request_id": f"r{i}", "created": 1e9 - 100 + i, "user_id": f"user{i % 3}" if i < 70 else f"u{i}",
               "slice": sl, "prompt": _words(20, sl), "output": "an answer", "status": "ok", "score": None}
        if sl == "ticket_routing":
            j = i - 45  # 22 account, 5 billing, 3 shipping
            row["pred"] = "account" if j < 22 else "billing" if j < 27 else "shipping"
            row["output"] = row["pred"].capitalize() + "."
            if j < 10:  # answered account, truly billing
                row.update(truth="billing", correct=False, truth_source="import")
            elif j < 15:
                row.update(truth="account", correct=True, truth_source="import")
        rows.append(row)
    return champ, rows


def test_decay_causes_are_ranked_with_their_numbers():
    from tuneloop.monitor.decay import decay_markdown, diagnose_decay

    champ, rows = _synthetic()
    d = diagnose_decay(_report(), rows, champ)
    causes = [c["cause"] for c in d["causes"]]
    score = {c["cause"]: c["score"] for c in d["causes"]}
    share = "slice returns is 45% of production traffic but 5% of the champion's training data (5 records)"
    users = "70% of the window's requests came from 3 users (of 33)"
    length = "prompts are 2.5x as long as in the champion's training data (20.0 vs 8.0 words on average)"
    mix = ("the label mix the model answers on slice ticket_routing shifted from billing (40% of the champion's "
           "training labels) to account (73% of its answers in the window)")
    mistake = "on slice ticket_routing the model answered account where the true label was billing in 10 of its 10 " \
              "wrong answers"
    drift = ("production prompts drifted from the champion's training data: 2 of 6 text descriptors (prompt_chars, "
             "prompt_words), embedding drift score 0.41")
    for c in (share, users, length, mix, mistake, drift):
        assert c in causes, (c, causes)
    # causes about the decayed slice first, then the traffic's shape, the drift summary last
    assert score[mix] > score[share] > score[users] > score[length] > score[drift]
    assert score[mistake] > score[share]
    assert causes.index(mix) == 0
    # the figure that fell: estimated accuracy below its floor, against the figure at registration
    e, real = d["decayed"]
    assert e["slice"] == "ticket_routing" and e["verdict"] == "below its floor"
    assert real["figure"] == "realized accuracy (delayed labels)"
    assert real["verdict"] == "below the figure at registration"
    assert e["registration"] == {"value": 0.9, "n": 50} and e["change"] == pytest.approx(-0.28)
    assert e["now"]["lower"] == 0.55 and e["bound"] == {"kind": "floor", "value": 0.8}
    # the traffic and the wrong answers
    t = d["traffic"]
    assert t["users"] == 33 and t["top3_users_share"] == pytest.approx(0.7) and t["errors"] == 0
    assert d["wrong"]["wrong"] == 10 and d["wrong"]["per_slice"]["ticket_routing"]["mistakes"][0] == \
        {"answer": "account", "truth": "billing", "count": 10}
    md = decay_markdown(d)
    assert md.startswith("# Diagnosis: production decay of champion v3 (100 requests)")
    assert "**estimated_quality** (below the floor: ticket_routing)" in md
    assert "| ticket_routing | estimated accuracy (label-free) | 0.900 (n=50) | 0.620 [0.550, 0.690] | 30 | -0.280 " \
           "| floor 0.800 | below its floor |" in md
    assert f"1. {mix}" in md and share in md
    assert "| slice returns | 45 (45%) | 5 (5%) |" in md
    assert "| labels ticket_routing | account 22 (73%), billing 5 (17%), shipping 3 (10%) | " \
           "billing 23 (40%), shipping 17 (30%), account 17 (30%) |" in md
    assert "| r45 | ticket_routing |" in md and "| Account. | billing | import |" in md
    json.dumps(d)  # JSON-able


def test_decay_diagnosis_without_training_data_or_ground_truth_says_so():
    from tuneloop.monitor.decay import decay_markdown, diagnose_decay

    _, rows = _synthetic()
    for r in rows:
        for k in ("truth", "correct", "truth_source"):
            r.pop(k, None)
    # the figures at registration from the calibration reference's records (the version's evaluation)
    ref_rows = [{"pred": "billing", "true": "billing"}] * 45 + [{"pred": "billing", "true": "account"}] * 5
    report = _report()
    report["quality"]["slos"] = [{"slice": "ticket_routing", "label": "billing", "metric": "precision", "min": 0.8,
                                  "value": 0.5, "lower": 0.3, "upper": 0.7, "n": 20, "verdict": "breach"}]
    d = diagnose_decay(report, rows, [], {"slices": {"ticket_routing": {"rows": ref_rows, "off_label_share": 0.0}}})
    slo = d["decayed"][-1]
    assert slo["figure"] == "realized precision of label billing (delayed labels)" and slo["verdict"] == "SLO breached"
    assert slo["registration"] == {"value": 0.9, "n": 50} and slo["change"] == pytest.approx(-0.4)
    assert d["decayed"][0]["registration"] == {"value": 0.9, "n": 50}  # accuracy: 45 of 50 right
    causes = [c["cause"] for c in d["causes"]]
    assert d["composition"]["champion"] is None and not any("training data (" in c for c in causes)
    assert any(c.startswith("70% of the window's requests came from 3 users") for c in causes)
    md = decay_markdown(d)
    assert "the champion's training data was not found" in md
    assert "No ground truth (imported labels, audit ratings, feedback) came back" in md


def _serve(store, n: int, answer: str, start: float, prefix: str, users: int) -> list[str]:
    ids = []
    for i in range(n):
        rid = f"{prefix}{i}"
        store.log_request(request_id=rid, user_id=f"user-{i % users}", model_version="base", variant="champion",
                          slice="ticket_routing", prompt=f"ticket {prefix}{i}: my order has not arrived",
                          output=answer, status="ok", latency_ms=5.0, created=start + i)
        ids.append(rid)
    return ids


def test_a_quality_slo_breach_comes_with_a_diagnosis(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from tuneloop.cli import app
    from tuneloop.cli.services import _diagnosis_lines
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor import decay
    from tuneloop.monitor.check import check, record
    from tuneloop.monitor.labels import import_labels
    from tuneloop.registry import NOTE, Registry

    slos = [{"slice": "ticket_routing", "label": "billing", "metric": "precision", "min": 0.8}]
    path = tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False, monitor__slos=slos,
                       monitor__retrain_on=["quality_slo"])
    cfg = load_config(path)
    store = FeedbackStore(cfg.feedback_db)
    now = time.time()
    billing = _serve(store, 60, "Billing.", now - 5 * 3600, "b", users=3)  # 3 users send all of it
    # truth arrives later: 20 of the billing answers were billing, 40 were account
    out = import_labels(store, [{"request_id": rid, "label": "billing" if i < 20 else "account", "rater": "",
                                 "where": rid} for i, rid in enumerate(billing)], {"ticket_routing": LABELS}, "import")
    assert out["stored"] == 60

    mon = tmp_path / "mon"
    report = check(cfg, mon, now=now)
    assert report["retrain"] is True and report["quality"]["slo_breaches"] == ["ticket_routing/billing/precision"]
    diag = report["diagnosis"]
    assert diag["markdown"] == "diagnosis.md" and (mon / "diagnosis.json").exists()
    assert json.loads((mon / "monitor.json").read_text())["diagnosis"] == diag
    causes = [c["cause"] for c in diag["causes"]]
    assert causes[0] == ("on slice ticket_routing the model answered billing where the true label was account in 40 "
                         "of its 40 wrong answers")
    assert "100% of the window's requests came from 3 users (of 3)" in causes
    md = (mon / "diagnosis.md").read_text()
    assert "**quality_slo** (breached: ticket_routing/billing/precision)" in md
    assert "| ticket_routing | realized precision of label billing (delayed labels) | - | 0.333 [" in md
    assert "| SLO 0.800 | SLO breached |" in md
    assert "## Wrong answers by the ground truth that came back (40 of 60 labelled)" in md
    assert "| billing -> account: 40 |" in md
    assert "| b59 | ticket_routing | ticket b59: my order has not arrived | Billing. | account | import |" in md
    assert "the champion's training data was not found" in md  # no champion: the base model serves

    # the CLI's lines and the MLflow run: diagnosis.md as an artifact, the Markdown as the run's description
    lines = _diagnosis_lines(diag, mon)
    assert lines[0] == f"likely cause 1: {causes[0]}" and lines[-1] == f"diagnosis: {mon / 'diagnosis.md'}"
    reg = Registry(cfg)
    run_id = record(cfg, report, mon)
    note = reg.client.get_run(run_id).data.tags[NOTE]
    assert note.startswith("**monitor**: retraining due (quality_slo)") and "# Diagnosis: production decay" in note
    assert "monitor/diagnosis.md" in [f.path for f in reg.client.list_artifacts(run_id, "monitor")]

    res = CliRunner().invoke(app, ["monitor", str(path), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert f"likely cause 1: {causes[0]}" in res.output and "diagnosis.md" in res.output

    # a diagnosis that fails leaves the check's verdict standing, and says why
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(decay, "write_decay_diagnosis", broken)
    again = check(cfg, tmp_path / "mon2", now=now)
    assert again["retrain"] is True and again["diagnosis"] == {"causes": [], "markdown": None,
                                                               "error": "RuntimeError: boom"}
    assert _diagnosis_lines(again["diagnosis"], mon) == ["diagnosis: failed (RuntimeError: boom)"]
