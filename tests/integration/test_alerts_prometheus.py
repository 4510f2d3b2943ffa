"""The alert rules (helm/alert_rules.py) on a real Prometheus: it scrapes a running `tuneloop serve` every
second, faults injected through the gateway's /admin/faults make requests fail, and the error-rate alert
fires through Prometheus' HTTP API. Also the thresholds' tightening rule, on its own (unit tests)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, start_until_healthy, tiny_config

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _alert_rules():  # noqa: ANN202 - helm/alert_rules.py is a script, loaded from its file
    spec = importlib.util.spec_from_file_location("alert_rules", ROOT / "helm" / "alert_rules.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["alert_rules"] = mod
    spec.loader.exec_module(mod)
    return mod


ar = _alert_rules()


# -- thresholds: start at the SLO, tighten with production data, never looser than the SLO -------------------
@pytest.mark.unit
def test_a_threshold_stays_at_the_slo_until_enough_days_are_observed():
    t = ar.tightened(0.01, [0.001] * (ar.MIN_DAYS - 1))
    assert (t.value, t.rule, t.days) == (0.01, "slo", ar.MIN_DAYS - 1)
    assert ar.tightened(0.01, [float("nan")] * 20).rule == "slo"  # days without traffic do not count


@pytest.mark.unit
def test_a_threshold_tightens_to_mean_plus_3_sigma_within_the_slo_and_its_floor():
    days = [0.004, 0.005, 0.006, 0.005, 0.004, 0.006, 0.005]  # mean 0.005, sd 0.000816
    t = ar.tightened(0.01, days)
    assert t.rule == "mean+3sd" and t.value == pytest.approx(0.005 + 3 * 0.000816497, rel=1e-4)
    noisy = ar.tightened(0.01, [0.001, 0.02, 0.001, 0.02, 0.001, 0.02, 0.001])  # mean + 3 sd above the SLO
    assert (noisy.value, noisy.rule) == (0.01, "slo-cap")
    quiet = ar.tightened(0.01, [0.0] * 14)  # no errors for two weeks: not a hair trigger
    assert (quiet.value, quiet.rule) == (0.01 * ar.FLOOR_SHARE, "floor")


@pytest.mark.unit
def test_the_rules_carry_the_config_slos_and_the_tightened_thresholds():
    from tuneloop.config.deploy import MonitorConfig

    monitor = MonitorConfig(slo_error_rate=0.02, slo_p95_latency_ms=1500, max_embedding_drift=0.6)
    p95_days = [0.30, 0.32, 0.31, 0.29, 0.30, 0.33, 0.31, 0.30]
    rules = ar.render_rules(monitor, {"latency_p95_s": p95_days}, window="1m", for_="30s", min_requests=7)
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"TuneloopErrorRateHigh", "TuneloopLatencyP95High", "TuneloopLatencyP99High", "TuneloopCanaryRolledBack",
            "TuneloopFeedbackOutOfControl", "TuneloopPromptDrift", "TuneloopRequestLogRejected",
            "TuneloopRequestLogDropped", "TuneloopMonitorSLOBreach"} <= set(alerts)
    assert alerts["TuneloopErrorRateHigh"]["expr"].startswith("tuneloop_variant:request_error_ratio:rate > 0.02 ")
    assert ">= 7" in alerts["TuneloopErrorRateHigh"]["expr"] and alerts["TuneloopErrorRateHigh"]["for"] == "30s"
    p95 = ar.tightened(1.5, p95_days).value
    assert 0.3 < p95 < 1.5 and f"> {p95:.6g} " in alerts["TuneloopLatencyP95High"]["expr"]
    assert "> 3 " in alerts["TuneloopLatencyP99High"]["expr"]  # untightened p99: 2 x the p95 SLO
    assert "> 0.6 or" in alerts["TuneloopPromptDrift"]["expr"]


@pytest.mark.unit
def test_the_shipped_rules_file_is_what_the_renderer_makes():
    want = ar.rules_yaml(ar.monitor_section(ROOT / "helm" / "tuneloop" / "values.yaml"),
                         ar.load_baselines(ar.BASELINES_FILE))
    assert ar.RULES_FILE.read_text() == want, "run .venv/bin/python helm/alert_rules.py"


@pytest.mark.unit
def test_the_gateway_counts_canary_decisions_and_exports_error_series_from_the_start(tmp_path, tiny_model_dir):
    """What TuneloopCanaryRolledBack and TuneloopErrorRateHigh read: a canary removed at a reload without
    becoming the champion counts as a rollback, one that became the champion as a promotion; both
    decisions, and each variant's error count, are exported (as 0) before the first one happens, so that
    Prometheus sees the first as an increase."""
    from conftest import register_version
    from fastapi.testclient import TestClient

    from tuneloop.config import load_config
    from tuneloop.deploy.gateway import Gateway, create_app

    class Stub:
        def answer(self, messages, max_tokens):  # noqa: ANN001, ANN201
            return "ok", 3, 1

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__pii__enabled=False))
    gw = Gateway(cfg, backend_factory=lambda v: Stub())
    reg = gw.registry
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    v1, v2 = register_version(reg, adapter, "r1"), register_version(reg, adapter, "r2")
    gw.reload()

    def metrics() -> str:
        with TestClient(create_app(gw)) as c:
            return c.get("/metrics").text

    text = metrics()
    assert 'tuneloop_canary_decisions_total{decision="rollback"} 0.0' in text
    assert 'tuneloop_requests_total{status="error",variant="champion",version="base"} 0.0' in text
    reg.set_alias("canary", v1)
    gw.reload()
    assert f'tuneloop_requests_total{{status="error",variant="canary",version="{v1}"}} 0.0' in metrics()
    reg.set_alias("champion", v1)  # promote v1
    reg.delete_alias("canary")
    gw.reload()
    reg.set_alias("canary", v2)
    gw.reload()
    reg.delete_alias("canary")  # roll v2 back
    gw.reload()
    gw.reload()  # nothing changed: nothing counted
    text = metrics()
    assert 'tuneloop_canary_decisions_total{decision="promote"} 1.0' in text
    assert 'tuneloop_canary_decisions_total{decision="rollback"} 1.0' in text
    gw.store.close()


# -- the real thing -------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_error_rate_alert_fires_on_a_real_prometheus(tmp_path, tiny_model_dir):
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"Prometheus is not installed ({PROMETHEUS} missing; Debian: apt-get install prometheus)")
    from tuneloop.config.deploy import MonitorConfig
    from tuneloop.feedback.auth import key_line, new_token

    token = new_token()
    config = tiny_config(tmp_path, tiny_model_dir, data__pii__enabled=False)
    gw_url = yaml.safe_load(config.read_text())["deploy"]["gateway_url"]
    gw_port = gw_url.rsplit(":", 1)[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
           "TUNELOOP_API_KEYS": key_line("ops", ["chat", "admin"], token), "TUNELOOP_USER_ID_SECRET": "s" * 40,
           "PYTHONWARNINGS": "ignore"}
    headers = {"Authorization": f"Bearer {token}"}

    rules = tmp_path / "rules.yml"  # the production rules with test windows: 15 s rates, 2 s `for:`
    rules.write_text(ar.rules_yaml(MonitorConfig(), window="15s", for_="2s", min_requests=5))
    prom_port = free_port()
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "tuneloop-gateway", "static_configs": [{"targets": [f"127.0.0.1:{gw_port}"]}]}],
    }))
    prom_url = f"http://127.0.0.1:{prom_port}"

    gateway = start_until_healthy([sys.executable, "-m", "tuneloop.cli", "serve", str(config), "--port", gw_port],
                                  f"{gw_url}/healthz", tmp_path / "gateway.log", env=env)
    prometheus = None
    stop = threading.Event()
    sent = {"ok": 0, "error": 0}

    def traffic() -> None:  # ~20 requests a second while the test runs
        with httpx.Client(base_url=gw_url, headers=headers, timeout=10) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2, "user": f"user-{i % 7}"})
                sent["ok" if r.status_code == 200 else "error"] += 1
                i += 1
                stop.wait(0.05)

    def alerts() -> list[dict]:
        return httpx.get(f"{prom_url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{prom_url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert prometheus.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.2)
        rules_api = httpx.get(f"{prom_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert {g["name"] for g in rules_api} == {"tuneloop-serving", "tuneloop-request-log", "tuneloop-monitor"}

        sender.start()  # healthy traffic first: scraped, no alert
        time.sleep(4)
        assert sent["ok"] > 0 and not [a for a in alerts() if a["labels"]["alertname"] == "TuneloopErrorRateHigh"]
        httpx.post(f"{gw_url}/admin/faults", json={"variant": "champion", "error_rate": 1.0},
                   headers=headers).raise_for_status()
        started, firing, seen = time.monotonic(), None, set()
        while time.monotonic() - started < 60 and firing is None:
            for a in alerts():
                seen.add((a["labels"]["alertname"], a["state"]))
                if a["labels"]["alertname"] == "TuneloopErrorRateHigh" and a["state"] == "firing":
                    firing = a
            time.sleep(0.5)
        assert firing is not None, f"not firing after 60 s; alerts seen {sorted(seen)}; sent {sent}"
        fired_after = time.monotonic() - started
        assert firing["labels"] == {"alertname": "TuneloopErrorRateHigh", "job": "tuneloop-gateway",
                                    "variant": "champion", "severity": "critical", "component": "gateway"}
        assert float(firing["value"]) > 0.5 and sent["error"] > 0
        assert ("TuneloopErrorRateHigh", "pending") in seen or fired_after < 3  # `for:` held it back first
        # the same Prometheus gives the baselines that tighten the thresholds (one day: today's figure)
        observed = ar.observe(prom_url, days=1)
        assert len(observed["error_ratio"]) == 1 and observed["error_ratio"][0] > 0.3
        print(f"TuneloopErrorRateHigh firing {fired_after:.1f} s after the fault; sent {sent}")
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(15)
        for proc in (prometheus, gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
