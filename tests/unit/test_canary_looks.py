"""The canary's looks on /metrics (feedback/canary_looks.py) and the monitor's report served by the feedback
service and the gateway (feedback/monitor_report.py): the table, the collectors' exposition
as Prometheus parses it, and what a broken database or a broken monitor.prom costs (nothing but themselves)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.feedback.canary_looks import CanaryLookCollector, CanaryLooks
from tuneloop.feedback.monitor_report import MONITOR_REPORTS_ENV, MonitorReportCollector
from tuneloop.feedback.service import create_feedback_service
from tuneloop.feedback.store import FeedbackStore

pytestmark = pytest.mark.unit

E = {"error_rate": {"no_difference": {"e_value": 75.5, "threshold": 60.0},
                    "margin": {"e_value": 0.2, "threshold": 20.0}},
     "latency": {"no_difference": {"e_value": 0.9, "threshold": 60.0}, "margin": {"e_value": 3.0, "threshold": 20.0}}}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, as Prometheus' parser reads it: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape(*collectors: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    for c in collectors:
        reg.register(c)
    return samples(generate_latest(reg).decode())


def names(s: dict) -> set[str]:
    return {name for name, _ in s}


@pytest.fixture()
def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "fb.db")


# -- the table --
def test_looks_are_kept_per_analysis_and_the_latest_is_the_last_written(store: FeedbackStore) -> None:
    looks = CanaryLooks(store.engine)
    assert looks.latest() is None
    for i, d in enumerate(("continue", "continue", "rollback"), 1):
        looks.add(deployed_at=100.0, look=i, decision=d, test="sequential",
                  requests={"canary": 10 * i, "champion": 90 * i}, canary_version="7", champion_version="6",
                  metrics=E, created=1000.0 + i)
    looks.add(deployed_at=200.0, look=1, decision="promote", test="fixed", requests={"canary": 5, "champion": 50},
              canary_version="8", champion_version="6")
    assert [lk["decision"] for lk in looks.looks(100.0)] == ["continue", "continue", "rollback"]
    last = CanaryLooks(store.engine).latest()  # a second handle on the same engine: the table is there already
    assert last == {"deployed_at": 200.0, "canary_version": "8", "champion_version": "6", "look": 1,
                    "created": last["created"], "requests": {"canary": 5, "champion": 50}, "decision": "promote",
                    "test": "fixed", "metrics": {}}
    assert looks.looks(100.0)[2]["metrics"] == E and looks.looks(100.0)[2]["created"] == 1003.0
    with pytest.raises(ValueError, match="decision must be one of"):
        looks.add(deployed_at=1.0, look=1, decision="maybe", test="fixed", requests={})


def test_the_latest_look_is_one_primary_key_lookup(store: FeedbackStore) -> None:
    from sqlalchemy import event

    looks = CanaryLooks(store.engine)
    looks.add(deployed_at=1.0, look=1, decision="continue", test="sequential", requests={"canary": 1, "champion": 1})
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    looks.latest()
    (sql,) = statements
    assert "ORDER BY canary_looks.id DESC" in sql and "LIMIT" in sql and "WHERE" not in sql


# -- the collector --
def test_collector_serves_the_latest_look_of_the_most_recent_canary(store: FeedbackStore) -> None:
    looks = CanaryLooks(store.engine)
    collector = CanaryLookCollector(looks)
    empty = scrape(collector)
    assert empty == {("tuneloop_canary_look_read_failures_total", ()): 0.0}  # no canary yet: no series
    looks.add(deployed_at=1.0, look=4, decision="continue", test="sequential", requests={"canary": 5, "champion": 45},
              canary_version="6", champion_version="5", metrics=E)
    looks.add(deployed_at=2.0, look=1, decision="continue", test="sequential", requests={"canary": 10, "champion": 90},
              canary_version="7", champion_version="6", metrics=E, created=1234.5)
    looks.add(deployed_at=2.0, look=2, decision="rollback", test="sequential", requests={"canary": 21, "champion": 180},
              canary_version="7", champion_version="6", metrics=E, created=1240.0)
    s = scrape(collector)
    v = (("canary_version", "7"),)
    assert s[("tuneloop_canary_e_value", (("against", "no_difference"), *v, ("metric", "error_rate")))] == 75.5
    assert s[("tuneloop_canary_e_value", (("against", "margin"), *v, ("metric", "latency")))] == 3.0
    assert s[("tuneloop_canary_e_value_threshold", (("against", "no_difference"), *v, ("metric", "error_rate")))] == 60
    assert s[("tuneloop_canary_e_value_threshold", (("against", "margin"), *v, ("metric", "error_rate")))] == 20
    assert s[("tuneloop_canary_look_requests", (*v, ("variant", "canary")))] == 21
    assert s[("tuneloop_canary_look_requests", (*v, ("variant", "champion")))] == 180
    decisions = {d: s[("tuneloop_canary_look_decision", (*v, ("decision", d)))]
                 for d in ("continue", "promote", "rollback")}
    assert decisions == {"continue": 0, "promote": 0, "rollback": 1}
    assert s[("tuneloop_canary_looks", v)] == 2 and s[("tuneloop_canary_look_timestamp_seconds", v)] == 1240.0
    assert s[("tuneloop_canary_info", (*v, ("champion_version", "6"), ("test", "sequential")))] == 1
    assert all(dict(labels).get("canary_version") in (None, "7") for _, labels in s)  # the older canary is gone


def test_a_fixed_test_look_has_no_e_values(store: FeedbackStore) -> None:
    looks = CanaryLooks(store.engine)
    looks.add(deployed_at=1.0, look=1, decision="promote", test="fixed", requests={"canary": 3, "champion": 30},
              canary_version="7", champion_version="6")
    s = scrape(CanaryLookCollector(looks))
    assert "tuneloop_canary_e_value" not in names(s) and "tuneloop_canary_e_value_threshold" not in names(s)
    assert s[("tuneloop_canary_look_decision", (("canary_version", "7"), ("decision", "promote")))] == 1


def test_a_failing_database_costs_the_look_and_nothing_else(store: FeedbackStore, monkeypatch) -> None:
    looks = CanaryLooks(store.engine)
    looks.add(deployed_at=1.0, look=1, decision="continue", test="sequential", requests={"canary": 1, "champion": 1},
              canary_version="7")
    collector = CanaryLookCollector(looks)

    def down() -> None:
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(looks, "latest", down)
    s = scrape(collector)
    assert s == {("tuneloop_canary_look_read_failures_total", ()): 1.0}
    monkeypatch.undo()
    assert scrape(collector)[("tuneloop_canary_looks", (("canary_version", "7"),))] == 1


def test_a_hung_database_holds_one_reader_and_the_scrape_returns(store: FeedbackStore, monkeypatch) -> None:
    looks = CanaryLooks(store.engine)
    release, calls = threading.Event(), []

    def hangs() -> None:
        calls.append(1)
        release.wait(30)

    monkeypatch.setattr(looks, "latest", hangs)
    collector = CanaryLookCollector(looks, timeout_s=0.05)
    start = time.monotonic()
    for _ in range(3):
        assert scrape(collector)[("tuneloop_canary_look_read_failures_total", ())] >= 1
    assert time.monotonic() - start < 5 and calls == [1]  # three scrapes, one reader waiting on the database
    assert collector.failures == 3
    release.set()


# -- the monitor's report --
def _report(champion: str = "3", retrain: bool = True) -> str:
    from tuneloop.monitor.check import prometheus_text

    return prometheus_text({"champion": champion, "window_requests": 40, "slo": {"error_rate": 0.025,
                            "p95_latency_ms": None}, "feedback_trend": {"window_mean": 0.3, "lcl": 0.5},
                            "feedback_volume": {"since_champion": 12}, "drift": {}, "retrain": retrain,
                            "slo_breach": False})


def _write(folder: Path, name: str, text: str | bytes, age_s: float | None = None) -> Path:
    (folder / name).mkdir(parents=True, exist_ok=True)
    f = folder / name / "monitor.prom"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    if age_s is not None:
        t = time.time() - age_s
        os.utime(f, (t, t))
    return f


def test_the_newest_report_is_served_with_its_age(tmp_path: Path) -> None:
    mon = tmp_path / "monitor"
    assert scrape(MonitorReportCollector(mon)) == {}  # no monitor run yet: nothing, not an error
    _write(mon, "20250101-000000", _report(retrain=False), age_s=5000)
    _write(mon, "20250101-003000", _report(retrain=True), age_s=1000)
    (mon / "20250101-010000").mkdir()  # the run in progress: no monitor.prom yet
    (mon / "notes").mkdir()
    collector = MonitorReportCollector(mon)
    s = scrape(collector)
    assert s[("tuneloop_monitor_retrain_due", (("champion", "3"),))] == 1.0
    assert 995 <= s[("tuneloop_monitor_report_age_seconds", ())] <= 1100
    assert s[("tuneloop_monitor_report_valid", ())] == 1.0
    assert s[("tuneloop_monitor_error_rate", (("champion", "3"),))] == 0.025
    p95 = s[("tuneloop_monitor_p95_latency_ms", (("champion", "3"),))]
    assert p95 != p95  # NaN (no answered requests) travels as NaN
    # the running one finishes: the folder's listing is unchanged, the newer report is found all the same
    _write(mon, "20250101-010000", _report(champion="4", retrain=False))
    s = scrape(collector)
    assert s[("tuneloop_monitor_retrain_due", (("champion", "4"),))] == 0.0
    assert ("tuneloop_monitor_retrain_due", (("champion", "3"),)) not in s
    # a file named directly
    one = scrape(MonitorReportCollector(mon / "20250101-000000" / "monitor.prom"))
    assert one[("tuneloop_monitor_retrain_due", (("champion", "3"),))] == 0.0


def test_runs_without_a_report_leave_the_last_one_served_and_ageing(tmp_path: Path, monkeypatch) -> None:
    mon = tmp_path / "monitor"
    _write(mon, "20250101-000000", _report(champion="2"), age_s=9000)
    _write(mon, "20250101-003000", _report(champion="3"), age_s=8000)
    for i in range(8):  # eight failed runs since: folders without a monitor.prom
        (mon / f"20250101-0{i + 1}3000").mkdir()
    collector = MonitorReportCollector(mon)
    s = scrape(collector)
    assert ("tuneloop_monitor_retrain_due", (("champion", "3"),)) in s
    assert s[("tuneloop_monitor_report_age_seconds", ())] >= 8000  # TuneloopMonitorReportStale fires on this
    # the next scrapes look only into the folders newer than the report: no folder is listed again
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(path) or real(path))
    scrape(collector)
    assert listed == []
    # the served report is cleaned up: the one before it is found
    (mon / "20250101-003000" / "monitor.prom").unlink()
    assert ("tuneloop_monitor_retrain_due", (("champion", "2"),)) in scrape(collector)


@pytest.mark.parametrize("text, why", [
    ("tuneloop_monitor_retrain_due{champion=\"3\"} not-a-number\n", "unparsable"),
    ("# TYPE tuneloop_monitor_retrain_due gauge\ntuneloop_monitor_retrain_due{champion=\"3\"", "no final newline"),
    ("# TYPE tuneloop_requests_total counter\ntuneloop_requests_total 5\n", "another component's family"),
    ("tuneloop_monitor_report_valid 1\n", "this collector's own gauge"),
    ('tuneloop_monitor_retrain_due{champion="3"} 1\ntuneloop_monitor_retrain_due{champion="3"} 0\n', "a series twice"),
    (b"\xff\xfe not UTF-8\n", "not text"),
    ("these are not metrics at all\n", "not the format"),
])
def test_a_broken_report_is_refused_whole_and_says_so(tmp_path: Path, text: str | bytes, why: str) -> None:
    mon = tmp_path / "monitor"
    _write(mon, "20250101-000000", _report())  # an older good one: not served in place of the broken newest
    _write(mon, "20250102-000000", text)
    s = scrape(MonitorReportCollector(mon))
    assert s[("tuneloop_monitor_report_valid", ())] == 0.0, why
    assert names(s) == {"tuneloop_monitor_report_valid", "tuneloop_monitor_report_age_seconds"}, why


def test_an_oversized_report_is_refused(tmp_path: Path, monkeypatch) -> None:
    f = _write(tmp_path, "20250101-000000", _report())
    monkeypatch.setattr(MonitorReportCollector, "MAX_BYTES", f.stat().st_size - 1)
    assert scrape(MonitorReportCollector(f))[("tuneloop_monitor_report_valid", ())] == 0.0


def test_a_report_is_parsed_once_per_version(tmp_path: Path, monkeypatch) -> None:
    import prometheus_client.parser as parser

    f = _write(tmp_path, "20250101-000000", _report())
    parsed = []
    real = parser.text_string_to_metric_families
    monkeypatch.setattr(parser, "text_string_to_metric_families", lambda t: parsed.append(1) or real(t))
    collector = MonitorReportCollector(tmp_path)
    for _ in range(3):
        scrape(collector)
    assert parsed == [1]
    f.write_text(_report(retrain=False) + "# a new version\n")
    assert scrape(collector)[("tuneloop_monitor_retrain_due", (("champion", "3"),))] == 0.0 and len(parsed) == 2


# -- /metrics of the feedback service and the gateway --
def _guard(monkeypatch) -> Any:
    from authkit import make_guard

    return make_guard(monkeypatch, {"app": "feedback"})[0]


def test_feedback_service_metrics_show_the_canary_look_and_the_monitor_report(tmp_path, store, monkeypatch) -> None:
    mon = tmp_path / "state" / "monitor"
    _write(mon, "20250101-000000", _report())
    monkeypatch.setenv(MONITOR_REPORTS_ENV, str(mon))
    c = TestClient(create_feedback_service(store, _guard(monkeypatch)))
    CanaryLooks(store.engine).add(deployed_at=1.0, look=3, decision="continue", test="sequential",
                                  requests={"canary": 30, "champion": 270}, canary_version="7", metrics=E)
    s = samples(c.get("/metrics").text)
    assert s[("tuneloop_canary_looks", (("canary_version", "7"),))] == 3
    assert s[("tuneloop_monitor_retrain_due", (("champion", "3"),))] == 1.0
    assert ("tuneloop_request_log_backlog", ()) in s  # the service's own metrics, unchanged
    # a corrupt newest report: /metrics still answers, with the rest
    _write(mon, "20250102-000000", "tuneloop_monitor_retrain_due{ 1\n")
    r = c.get("/metrics")
    assert r.status_code == 200
    s = samples(r.text)
    assert s[("tuneloop_monitor_report_valid", ())] == 0 and "tuneloop_monitor_retrain_due" not in names(s)
    assert s[("tuneloop_canary_looks", (("canary_version", "7"),))] == 3


def test_feedback_service_without_a_monitor_path_serves_no_report(tmp_path, store, monkeypatch) -> None:
    monkeypatch.delenv(MONITOR_REPORTS_ENV, raising=False)
    c = TestClient(create_feedback_service(store, _guard(monkeypatch)))
    assert not any(n.startswith("tuneloop_monitor_") for n in names(samples(c.get("/metrics").text)))


def test_gateway_metrics_show_the_canary_look_and_the_monitor_report(tmp_path) -> None:
    from conftest import tiny_config

    from tuneloop.config import load_config
    from tuneloop.deploy.gateway import Gateway, create_app

    cfg = load_config(tiny_config(tmp_path, Path("/nonexistent-model")))
    _write(cfg.state_path / "monitor", "20250101-000000", _report())
    gw = Gateway(cfg, backend_factory=lambda v: None)
    CanaryLooks(gw.store.engine).add(deployed_at=1.0, look=1, decision="promote", test="fixed",
                                     requests={"canary": 3, "champion": 30}, canary_version="9")
    s = samples(TestClient(create_app(gw)).get("/metrics").text)
    assert s[("tuneloop_canary_look_decision", (("canary_version", "9"), ("decision", "promote")))] == 1
    assert s[("tuneloop_monitor_retrain_due", (("champion", "3"),))] == 1.0
