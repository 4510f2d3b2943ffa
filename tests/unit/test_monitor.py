"""The monitor's SPC chart and retraining decision on a real feedback store; the feedback
service's KServe payload-logger endpoint."""

from __future__ import annotations

import time

import pytest
from conftest import tiny_config
from fastapi.testclient import TestClient

from tuneloop.evaluate.stats import spc
from tuneloop.monitor.check import prometheus_text

pytestmark = pytest.mark.unit


def test_spc_limits_and_verdicts():
    baseline = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 5  # mean 0.7
    assert spc(baseline, [1.0] * 4, 10)["verdict"] == "insufficient"
    ok = spc(baseline, [1, 0, 1] * 10, 10)
    assert ok["verdict"] == "in_control" and ok["lcl"] < ok["window_mean"] < ok["ucl"]
    low = spc(baseline, [0, 0, 0, 1] * 10, 10)
    assert low["verdict"] == "below" and low["window_mean"] == pytest.approx(0.25)


def test_monitor_fires_on_a_falling_feedback_trend_and_writes_metrics(tmp_path, tiny_model_dir):
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.check import check

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False,
                                  monitor__baseline_requests=20, monitor__min_new_feedback=1000,
                                  monitor__retrain_on=["feedback_trend"]))
    store = FeedbackStore(cfg.feedback_db)
    now = time.time()
    for i in range(60):  # 20 baseline requests scored mostly good, then 40 in the window mostly bad
        rid = f"r{i}"
        store.log_request(request_id=rid, user_id="u", model_version="base", variant="champion", slice="",
                          prompt=f"q{i}", output="a", status="ok" if i % 30 else "error", latency_ms=10.0 + i,
                          created=now - 3600 * 30 + i if i < 20 else now - 60 + i)
        store.add_feedback(rid, score=(0.0 if i % 5 == 0 else 1.0) if i < 20 else (1.0 if i % 4 == 0 else 0.0))
    report = check(cfg, tmp_path / "mon", now=now + 1)
    assert report["feedback_trend"]["verdict"] == "below"
    assert report["retrain"] is True and report["reasons"] == ["feedback_trend"]
    assert report["window_requests"] == 40 and report["slo"]["error_rate"] == pytest.approx(1 / 40)
    assert report["slo_breach"] is True  # 2.5% errors > the 1% SLO
    assert report["drift"]["computed"] is False
    prom = (tmp_path / "mon" / "monitor.prom").read_text()
    assert 'tuneloop_monitor_retrain_due{champion="base"} 1.0' in prom
    assert prom == prometheus_text(report)


def test_feedback_service_pairs_kserve_events_and_takes_feedback(tmp_path, monkeypatch):
    from authkit import make_guard

    from tuneloop.feedback.service import create_feedback_service
    from tuneloop.feedback.store import FeedbackStore

    store = FeedbackStore(tmp_path / "fb.db")
    guard, h = make_guard(monkeypatch, {"kserve": "events", "app": "feedback"})
    c = TestClient(create_feedback_service(store, guard))
    assert c.get("/healthz").json() == {"status": "ok"}
    ev = {"ce-id": "ev-1", "ce-inferenceservicename": "tuneloop-demo", **h["kserve"]}
    r = c.post("/v1/kserve-events", json={"messages": [{"role": "user", "content": "where is my parcel"}],
                                          "metadata": {"slice": "ticket_routing"}},
               headers={**ev, "ce-type": "org.kubeflow.serving.inference.request"})
    assert r.json() == {"status": "pending"}
    r = c.post("/v1/kserve-events", json={"choices": [{"message": {"content": "shipping"}}]},
               headers={**ev, "ce-type": "org.kubeflow.serving.inference.response"})
    assert r.json() == {"status": "recorded"}
    assert c.post("/v1/feedback", json={"request_id": "ev-1", "thumbs": "up"}, headers=h["app"]).status_code == 200
    rows = store.rows()
    assert rows[0]["prompt"] == "where is my parcel" and rows[0]["output"] == "shipping" and rows[0]["score"] == 1.0
    assert rows[0]["slice"] == "ticket_routing", "KServe traffic is monitored per slice too"
    assert c.post("/v1/kserve-events", json={}, headers={"ce-type": "x.request", **h["kserve"]}).status_code == 400
    # a response whose request has not come (yet, or to another replica) waits for it in the database
    r = c.post("/v1/kserve-events", json={}, headers={"ce-id": "nope", "ce-type": "x.response", **h["kserve"]})
    assert r.json() == {"status": "pending"}
    assert c.post("/v1/feedback", json={"request_id": "missing", "score": 0.5}, headers=h["app"]).status_code == 404


def test_store_scrubs_pii_before_storing(tmp_path):
    from tuneloop.config import PiiConfig
    from tuneloop.data.pii import PiiScrubber
    from tuneloop.feedback.store import FeedbackStore

    store = FeedbackStore(tmp_path / "fb.db", scrubber=PiiScrubber(PiiConfig()))
    store.log_request(request_id="x", user_id="u", model_version="1", variant="champion", slice="",
                      prompt="mail me at jane.doe@example.com", output="ok", status="ok", latency_ms=1.0)
    store.add_feedback("x", correction="call +44 20 7946 0958")
    row = store.rows()[0]
    assert "jane.doe@example.com" not in row["prompt"] and "<EMAIL_ADDRESS>" in row["prompt"]
    assert "7946" not in row["correction"]


def test_logging_never_waits_for_the_writer_and_readers_see_its_batch(tmp_path):
    """The serving path only appends to the queue: while the background writer is busy scrubbing a
    batch, `log_request` still returns; a reader's flush waits for that batch (read-your-writes)."""
    import threading

    from tuneloop.feedback.store import FeedbackStore

    entered, release = threading.Event(), threading.Event()

    class SlowScrubber:
        def scrub(self, text: str) -> str:
            entered.set()
            release.wait(30)
            return text

    store = FeedbackStore(tmp_path / "fb.db", scrubber=SlowScrubber())
    row = dict(user_id="u", model_version="1", variant="champion", slice="", output="ok", status="ok",
               latency_ms=1.0)
    store.log_request(request_id="first", prompt="p1", **row)
    assert entered.wait(30), "the writer thread never took the batch"
    second = threading.Thread(target=store.log_request, kwargs=dict(request_id="second", prompt="p2", **row))
    second.start()
    second.join(10)
    assert not second.is_alive(), "log_request waited for the writer's scrubbing"
    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(store.served_by("first")))
    reader.start()
    release.set()
    reader.join(30)
    assert seen == [("1", "champion")]
    assert {r["request_id"] for r in store.requests()} == {"first", "second"}


def test_the_queue_is_written_when_the_server_stops(tmp_path, monkeypatch):
    from authkit import make_guard

    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.feedback.service import create_feedback_service

    store = FeedbackStore(tmp_path / "fb.db")
    store.FLUSH_EVERY_S = 3600  # the writer would not get to it: only the shutdown flush can
    with TestClient(create_feedback_service(store, make_guard(monkeypatch, {"k": "feedback"})[0])):
        store.log_request(request_id="last", user_id="u", model_version="1", variant="champion", slice="",
                          prompt="p", output="o", status="ok", latency_ms=1.0)
        assert store.backlog == 1
    assert store.backlog == 0
    assert [r["request_id"] for r in FeedbackStore(tmp_path / "fb.db").requests()] == ["last"]


def test_quality_gauges_are_valid_textfile_format():
    """The per-slice/per-label quality gauges parse with Prometheus' own text parser (one family per name,
    labels escaped, a missing figure as NaN)."""
    from prometheus_client.parser import text_string_to_metric_families

    from tuneloop.monitor.check import quality_prometheus

    iv = {"value": 0.8, "lower": 0.7, "upper": 0.9, "sampling_error": 0.05}
    report = {"champion": "3", "quality": {
        "slices": {'odd "slice"': {
            "estimate": {"window": {"accuracy": iv, "macro_f1": iv}}, "with_probabilities": 120,
            "estimate_verdict": "below",
            "realized": {"labelled": 40, "accuracy": {"value": None, "lower": None, "upper": None},
                         "per_label": {"block": {"precision": {"value": 0.5}, "recall": {"value": 1.0}}}},
            "audit": {"n_rated": 0, "value": None}}},
        "slos": [{"slice": 'odd "slice"', "label": "block", "metric": "precision", "verdict": "breach"}]}}
    families = {f.name: f for f in text_string_to_metric_families(quality_prometheus(report))}
    est = families["tuneloop_monitor_estimated_accuracy"].samples[0]
    assert est.labels == {"champion": "3", "slice": 'odd "slice"'} and est.value == 0.8
    assert families["tuneloop_monitor_estimate_below_floor"].samples[0].value == 1.0
    assert str(families["tuneloop_monitor_realized_accuracy"].samples[0].value) == "nan"
    slo = families["tuneloop_monitor_quality_slo_breach"].samples[0]
    assert slo.labels["label"] == "block" and slo.value == 1.0
    assert quality_prometheus({"champion": "base"}) == ""  # a report without the section: no gauges
