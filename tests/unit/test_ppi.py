"""Human audit + the model's own probabilities by prediction-powered inference: valid and narrower than the
human sample alone, in a seeded simulation and in the monitor's report."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import tiny_config

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "account", "technical"]


def traffic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label probabilities (n x labels), the answer (argmax) and a truth drawn from the probabilities. Like a
    fine-tuned classifier: most requests clear-cut (high confidence), some ambiguous."""
    logits = rng.normal(0, 1, (n, len(LABELS)))
    margin = rng.choice([7.0, 1.0], size=n, p=[0.7, 0.3])
    logits[np.arange(n), rng.integers(len(LABELS), size=n)] += margin
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = np.array([rng.choice(len(LABELS), p=row) for row in p])
    return p, p.argmax(1), truth


def test_ppi_is_narrower_than_the_human_sample_and_covers_the_truth():
    from tuneloop.evaluate.ppi import ppi_mean

    rng = np.random.default_rng(0)
    covered, covered_human, ratios = 0, 0, []
    sims = 200
    for _ in range(sims):
        p, pred, truth = traffic(2000, rng)
        right = (pred == truth).astype(float)
        yhat = p[np.arange(len(p)), pred] * 0.9  # the model's confidence, miscalibrated on purpose
        rated = rng.choice(len(p), 100, replace=False)
        mask = np.zeros(len(p), bool)
        mask[rated] = True
        r = ppi_mean(right[mask], yhat[mask], yhat[~mask], 0.9)
        truth_acc = right.mean()
        covered += r["lower"] <= truth_acc <= r["upper"]
        covered_human += r["human_only"]["lower"] <= truth_acc <= r["human_only"]["upper"]
        ratios.append(r["width_ratio"])
    assert covered / sims >= 0.85 and covered_human / sims >= 0.85  # 90% intervals
    assert np.mean(ratios) < 0.85 and max(ratios) < 1.05


def test_monitor_combines_the_audit_sample_with_the_estimate(tmp_path, tiny_model_dir):
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.audit import audit_sample, write_audit
    from tuneloop.monitor.check import check
    from tuneloop.monitor.labels import QualityStore, import_labels, read_label_file

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False,
                                  monitor__estimate_max_requests=0))
    rng = np.random.default_rng(1)
    p_ref, pred_ref, truth_ref = traffic(300, rng)
    path = cfg.state_path / "quality" / "reference-base.json"
    path.parent.mkdir(parents=True)
    import json

    path.write_text(json.dumps({"format": 1, "version": "base", "slices": {"ticket_routing": {
        "labels": LABELS, "rows": [{"id": str(i), "probs": p.tolist(), "pred": LABELS[a], "true": LABELS[t]}
                                   for i, (p, a, t) in enumerate(zip(p_ref, pred_ref, truth_ref, strict=True))]}}}))
    store, now = FeedbackStore(cfg.feedback_db), time.time()
    p, pred, truth = traffic(1500, rng)
    ids = [f"r{i}" for i in range(len(p))]
    for i, rid in enumerate(ids):
        store.log_request(request_id=rid, user_id="u", model_version="base", variant="champion",
                          slice="ticket_routing", prompt=f"t{i}", output=LABELS[pred[i]], status="ok", latency_ms=1.0,
                          created=now - 3600 + i)
    store.flush()
    QualityStore(store.engine).record_probs([{"request_id": rid, "model_version": "base", "slice": "ticket_routing",
                                              "probs": dict(zip(LABELS, p[i].tolist()))} for i, rid in enumerate(ids)])
    sample = audit_sample(store, "base", "ticket_routing", now - 24 * 3600, now, 150, seed=0)
    write_audit(sample, LABELS, tmp_path / "audit.csv", "csv", ["a"])
    by_id = dict(zip(ids, truth, strict=True))
    rows = read_label_file(tmp_path / "audit.csv")
    for r in rows:  # the rater fills in the truth
        r["label"] = LABELS[by_id[r["request_id"]]]
    assert import_labels(store, rows, {"ticket_routing": LABELS}, "audit")["stored"] == 150
    a = check(cfg, tmp_path / "mon", now=now)["quality"]["slices"]["ticket_routing"]["audit"]
    true_acc = float((pred == truth).mean())
    assert a["n_rated"] == 150 and a["n_unrated"] == 1350
    assert a["lower"] <= true_acc <= a["upper"]
    assert a["width"] < a["human_only"]["width"]
    prom = (tmp_path / "mon" / "monitor.prom").read_text()
    assert 'tuneloop_monitor_audit_rated{champion="base",slice="ticket_routing"} 150.0' in prom


def test_too_few_errors_fall_back_to_the_rated_samples_own_interval():
    from tuneloop.evaluate.ppi import ppi_mean

    y = np.array([1.0] * 48 + [0.0] * 2)  # 2 wrong of 50: the normal approximation would be far too narrow
    r = ppi_mean(y, np.full(50, 0.97), np.full(1000, 0.97), 0.9)
    assert r["method"].startswith("wilson") and r["width_ratio"] == 1.0
    assert (r["lower"], r["upper"]) == (r["human_only"]["lower"], r["human_only"]["upper"])
    assert r["lower"] < 0.93 < 0.98 < r["upper"] <= 1.0
