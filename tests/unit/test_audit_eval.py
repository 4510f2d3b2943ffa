"""The human audit sample as a regression slice of the next run: rated requests -> `<slice>-audit` eval
records (the raters' majority), scored with their slice's labels and gated against the champion."""

from __future__ import annotations

import time

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "account", "technical"]


def _slices(**audit):
    from tuneloop.config.evaluate import EvaluateConfig

    return EvaluateConfig(slices={"ticket_routing": {"task": "classification", "labels": LABELS},
                                  "general_qa": {"task": "generation"}},
                          gates=[{"metric": "nll", "slice": "ticket_routing", "max_regression": 1.0}],
                          audit=audit)


def test_audit_slices_take_their_slices_labels_and_a_default_regression_rule():
    cfg = _slices()
    assert cfg.audit_slices() == {"ticket_routing-audit": "ticket_routing"}
    assert cfg.slice_config("ticket_routing-audit").labels == LABELS
    assert cfg.slice_config("general_qa-audit") is None
    [rule] = cfg.audit_gates({"all", "ticket_routing", "ticket_routing-audit"})
    assert (rule.slice, rule.metric, rule.max_regression, rule.confidence, rule.inconclusive) == \
        ("ticket_routing-audit", "accuracy", 0.05, 0.9, "pass")
    assert cfg.audit_gates({"all", "ticket_routing"}) == []  # no rated requests: no rule
    assert _slices(enabled=False).audit_slices() == {}


def test_a_rule_of_the_users_own_on_an_audit_slice_replaces_the_default():
    from tuneloop.config.evaluate import EvaluateConfig

    cfg = EvaluateConfig(slices={"t": {"task": "classification", "labels": ["a", "b"]}},
                         gates=[{"metric": "macro_f1", "slice": "t-audit", "max_regression": 0.1}])
    assert cfg.audit_gates({"t-audit"}) == []
    with pytest.raises(ValueError, match="'t-audit' is the name of the audit slice of 't'"):
        EvaluateConfig(slices={"t": {"task": "classification", "labels": ["a", "b"]},
                               "t-audit": {"task": "generation"}},
                       gates=[{"metric": "nll", "slice": "t", "max_regression": 1.0}])
    with pytest.raises(ValueError, match="not in evaluate.slices"):  # off: the name means nothing
        EvaluateConfig(slices={"t": {"task": "classification", "labels": ["a", "b"]}}, audit={"enabled": False},
                       gates=[{"metric": "accuracy", "slice": "t-audit", "max_regression": 0.1}])


def _scored(slice_: str, refs: list[str], preds: list[str], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "slice": slice_, "reference": r, "prediction": p, "nll_sum": 1.0, "n_tokens": 1}
            for i, (r, p) in enumerate(zip(refs, preds, strict=True))]


def test_a_candidate_that_gets_the_audited_requests_wrong_is_blocked():
    from tuneloop.evaluate.gates import apply_gates
    from tuneloop.evaluate.metrics import slice_metrics, slice_values

    cfg = _slices()
    refs = ["billing", "shipping", "account", "technical"] * 15
    common = _scored("ticket_routing", refs[:20], refs[:20], "e")
    champion = common + _scored("ticket_routing-audit", refs, refs, "a")  # right on all 60
    wrong = ["account" if r == "billing" else r for r in refs]  # the candidate lost `billing` in production
    candidate = common + _scored("ticket_routing-audit", refs, wrong, "a")
    metrics = {"candidate": slice_metrics(candidate, cfg), "champion": slice_metrics(champion, cfg)}
    assert metrics["candidate"]["ticket_routing-audit"]["accuracy"] == pytest.approx(0.75)
    assert metrics["candidate"]["ticket_routing-audit"]["confusion"]["labels"][:4] == LABELS
    values = {"candidate": slice_values(candidate, cfg), "champion": slice_values(champion, cfg)}
    rules = [*cfg.gates, *cfg.audit_gates(set(metrics["candidate"]))]
    gate = apply_gates(rules, metrics["candidate"], metrics["champion"], "champion", values, 500, 0)
    audit = next(r for r in gate["rules"] if r["slice"] == "ticket_routing-audit")
    assert audit["kind"] == "max_regression@0.9" and not audit["passed"] and audit["ci"][1] < -0.05
    assert gate["passed"] is False
    same = apply_gates(rules, metrics["champion"], metrics["champion"], "champion",
                       {"candidate": values["champion"], "champion": values["champion"]}, 500, 0)
    assert same["passed"] is True


def test_audit_examples_take_the_raters_majority_and_count_ties(tmp_path, tiny_model_dir):
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.labels import QualityStore, audit_examples

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    store = FeedbackStore(cfg.feedback_db)
    now = time.time()
    for i in range(5):
        store.log_request(request_id=f"r{i}", user_id="u", model_version="1", variant="champion",
                          slice="ticket_routing", prompt=f"my invoice {i} is wrong", output="billing", status="ok",
                          latency_ms=1.0, created=now + i)
    store.log_request(request_id="g", user_id="u", model_version="1", variant="champion", slice="general_qa",
                      prompt="hi", output="hello", status="ok", latency_ms=1.0, created=now)
    store.flush()
    q = QualityStore(store.engine)
    q.add_labels([{"request_id": f"r{i}", "label": "billing", "rater": "ana"} for i in range(5)]
                 + [{"request_id": "g", "label": "billing", "rater": "ana"}], "audit")
    q.add_labels([{"request_id": "r0", "label": "account", "rater": "bo"},  # r0: 1-1, a tie
                  {"request_id": "r1", "label": "account", "rater": "bo"},
                  {"request_id": "r1", "label": "account", "rater": "cy"}], "audit")  # r1: account 2-1
    q.add_labels([{"request_id": "r2", "label": "technical"}], "import")  # not an audit: not used
    rows, stats = audit_examples(store.engine, ["ticket_routing"], max_per_slice=3)
    assert stats["rated"] == 5 and stats["tied"] == 1 and stats["capped"] == 1
    assert stats["per_slice"] == {"ticket_routing": 3}
    by_id = {r["request_id"]: r for r in rows}
    assert by_id["r1"]["label"] == "account" and by_id["r1"]["raters"] == 3
    assert "r0" not in by_id and "g" not in by_id
    assert by_id["r1"]["prompt"] == "my invoice 1 is wrong"
    store.close()
