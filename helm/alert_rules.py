"""tuneloop's Prometheus alert rules, rendered from the run config's SLOs and observed baselines.

One function (`render_rules`) makes the rules; its output is shipped twice: as the plain rules file
helm/tuneloop/files/prometheus-rules.yaml (for a Prometheus without the Operator: `rule_files:`) and,
from that file, as the chart's PrometheusRule (`alerts.enabled`). `make chart-check` fails when the
file is stale, runs `promtool check rules` on it and on the rendered PrometheusRule, and `promtool test
rules` on helm/alert_rules_test.yaml.

What fires (metric families: the gateway's /metrics, the feedback service's /metrics, the monitor's
textfile gauges `tuneloop_monitor_*`):
  SLOs        TuneloopErrorRateHigh, TuneloopLatencyP95High, TuneloopLatencyP99High (per job and variant, over
              `window`, with at least `min_requests` requests in it), TuneloopMonitorSLOBreach (the monitor's
              window check: champion error rate and p95 from the feedback store - the one that also covers
              KServe), TuneloopQualitySLOBreach
  canary      TuneloopCanaryRolledBack (the gateway counts a canary removed without promotion)
  SPC         TuneloopFeedbackOutOfControl (window mean of the feedback score below the lower control limit)
  drift       TuneloopPromptDrift (embedding drift score or drifted share of descriptors over the config's limits)
  retraining  TuneloopRetrainDue (info)
  monitor     TuneloopMonitorReportStale (no new report for REPORT_MAX_AGE_S), TuneloopMonitorReportRefused (the
              newest monitor.prom failed validation: its gauges are not served); the feedback service and the
              gateway serve the newest report on /metrics (tuneloop_monitor_report_age_seconds, ..._valid)
  request log TuneloopRequestLogRejected, ...Dropped (critical: rows lost), ...ScrubFailed, ...SpoolFailed,
              ...Backlog, TuneloopKServeHalvesLost

Thresholds start from the run config - the SLOs of its `monitor` section (slo_error_rate, slo_p95_latency_ms;
the p99 starts at P99_OVER_P95 times the p95 SLO) and its drift limits - and tighten as production data
accumulates. The rule (`tightened`), per series of daily values of the champion (error ratio, p95, p99):
  fewer than MIN_DAYS days observed:  threshold = the start (the SLO)
  from MIN_DAYS days on:              threshold = min(SLO, max(mean + SIGMAS * sd, FLOOR_SHARE * SLO))
so it is never looser than the SLO, tightens to 3 sigma above what production normally does (a
regression pages before the SLO is spent), and never tighter than a quarter of the SLO (a quiet fortnight
must not page on one slow request). The observed series live in helm/alert-baselines.json; `--observe URL`
fills it from a Prometheus that scrapes the gateway (one value a day, the last `--days` days) and
re-renders the file; commit both and upgrade the release.

    .venv/bin/python helm/alert_rules.py            # write the rules file (values.yaml's runConfig.monitor)
    .venv/bin/python helm/alert_rules.py --check    # exit 1 when the file is stale
    .venv/bin/python helm/alert_rules.py --observe http://prometheus:9090 --days 14
    .venv/bin/python helm/alert_rules.py --config run.yaml --baselines b.json --window 15s --for 2s --out r.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# run as a script, Python puts helm/ first on sys.path, where the chart folder helm/tuneloop would
# shadow the tuneloop package (as in check_chart.py)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tuneloop"
RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
BASELINES_FILE = ROOT / "helm" / "alert-baselines.json"
TEST_FILE = ROOT / "helm" / "alert_rules_test.yaml"

MIN_DAYS = 7  # days of production data before a threshold moves off the SLO
SIGMAS = 3.0
FLOOR_SHARE = 0.25  # a tightened threshold stays at or above this share of the SLO
P99_OVER_P95 = 2.0  # the p99's start: this times the p95 SLO (the config has no p99 SLO)
BACKLOG_ROWS = 10_000  # request-log rows waiting to be written (the writer keeps up to 100,000)
REPORT_MAX_AGE_S = 7200  # the newest monitor report older than this: the chart's 30-minute CronJob missed 3+ runs

# the series a baseline is made of: name -> (PromQL of one day's value for the champion, ending at the query time)
OBSERVED = {
    "error_ratio": 'sum(increase(tuneloop_requests_total{variant="champion",status="error"}[1d])) / '
                   'sum(increase(tuneloop_requests_total{variant="champion"}[1d]))',
    "latency_p95_s": 'histogram_quantile(0.95, sum by (le) '
                     '(increase(tuneloop_request_latency_seconds_bucket{variant="champion"}[1d])))',
    "latency_p99_s": 'histogram_quantile(0.99, sum by (le) '
                     '(increase(tuneloop_request_latency_seconds_bucket{variant="champion"}[1d])))',
}


@dataclass
class Threshold:
    value: float  # what the alert compares with
    start: float  # the SLO it starts from
    rule: str  # "slo" (not enough days yet) | "mean+3sd" | "floor" | "slo-cap"
    days: int  # observed days it is based on
    mean: float | None = None
    sd: float | None = None


def tightened(slo: float, daily: Sequence[float], min_days: int = MIN_DAYS, sigmas: float = SIGMAS,
              floor_share: float = FLOOR_SHARE) -> Threshold:
    """The alert threshold of an upper-bound series: the SLO until `min_days` finite daily values are
    observed, then mean + `sigmas` sd of them, never above the SLO and never below `floor_share` of it."""
    xs = [float(x) for x in daily if x is not None and math.isfinite(float(x))]
    if len(xs) < max(min_days, 2):
        return Threshold(slo, slo, "slo", len(xs))
    mean, sd = statistics.fmean(xs), statistics.stdev(xs)
    band = mean + sigmas * sd
    value, rule = band, "mean+3sd"
    if band > slo:
        value, rule = slo, "slo-cap"
    elif band < floor_share * slo:
        value, rule = floor_share * slo, "floor"
    return Threshold(value, slo, rule, len(xs), mean, sd)


def thresholds(monitor: Any, baselines: dict[str, Sequence[float]] | None = None) -> dict[str, Threshold]:
    """Every threshold of the rules: error ratio and latencies (tightened by the baselines), drift limits."""
    b = baselines or {}
    p95 = monitor.slo_p95_latency_ms / 1000
    return {
        "error_ratio": tightened(monitor.slo_error_rate, b.get("error_ratio", [])),
        "latency_p95_s": tightened(p95, b.get("latency_p95_s", [])),
        "latency_p99_s": tightened(P99_OVER_P95 * p95, b.get("latency_p99_s", [])),
        "embedding_drift": Threshold(monitor.max_embedding_drift, monitor.max_embedding_drift, "config", 0),
        "drifted_share": Threshold(monitor.max_drifted_share, monitor.max_drifted_share, "config", 0),
    }


def _num(x: float) -> str:
    return f"{x:.6g}"


def render_rules(monitor: Any, baselines: dict[str, Sequence[float]] | None = None, *, window: str = "5m",
                 for_: str = "5m", min_requests: int = 20, decision_window: str = "1h",
                 log_window: str = "10m") -> dict[str, Any]:
    """The rule groups (Prometheus rule-file form: {"groups": [...]}) for these SLOs and baselines.
    `window`: the rate window of the SLO alerts; `for_`: how long an SLO breach lasts before it fires;
    `min_requests`: fewer requests in the window give no SLO alert (one failure of two is no 50% error rate)."""
    t = thresholds(monitor, baselines)
    by = "job, variant"
    traffic = f"sum by ({by}) (increase(tuneloop_requests_total[{window}])) >= {min_requests}"
    answered = f"sum by ({by}) (increase(tuneloop_request_latency_seconds_count[{window}])) >= {min_requests}"

    def latency(q: str) -> str:
        return f"histogram_quantile({q}, sum by ({by}, le) (rate(tuneloop_request_latency_seconds_bucket[{window}])))"

    def alert(name: str, expr: str, severity: str, component: str, summary: str, description: str,
              for_: str | None = None) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": expr}
        if for_:
            rule["for"] = for_
        rule["labels"] = {"severity": severity, "component": component}
        rule["annotations"] = {"summary": summary, "description": description}
        return rule

    def why(th: Threshold, unit: str, scale: float = 1.0) -> str:
        start = f"{_num(th.start * scale)}{unit}"
        if th.rule == "slo":
            return f"the SLO; fewer than {MIN_DAYS} days observed"
        return (f"{_num(th.value * scale)}{unit}: {th.rule} over {th.days} days (mean {_num(th.mean * scale)}, sd "
                f"{_num(th.sd * scale)}; the SLO is {start})")

    err, p95, p99 = t["error_ratio"], t["latency_p95_s"], t["latency_p99_s"]
    serving = [
        {"record": "tuneloop_variant:request_error_ratio:rate",
         "expr": f'sum by ({by}) (rate(tuneloop_requests_total{{status="error"}}[{window}])) / '
                 f"sum by ({by}) (rate(tuneloop_requests_total[{window}]))"},
        {"record": "tuneloop_variant:request_latency_seconds:p95", "expr": latency("0.95")},
        {"record": "tuneloop_variant:request_latency_seconds:p99", "expr": latency("0.99")},
        alert("TuneloopErrorRateHigh",
              f"tuneloop_variant:request_error_ratio:rate > {_num(err.value)} and on ({by}) ({traffic})",
              "critical", "gateway", "{{ $labels.variant }}: {{ $value | humanizePercentage }} of requests fail",
              f"Error ratio over {window} above {_num(err.value)} ({why(err, '')}). A canary is also judged by "
              "the canary analysis; for the champion, check the model server and POST /admin/faults.", for_),
        alert("TuneloopLatencyP95High",
              f"tuneloop_variant:request_latency_seconds:p95 > {_num(p95.value)} and on ({by}) ({answered})",
              "warning", "gateway", "{{ $labels.variant }}: p95 latency {{ $value | humanizeDuration }}",
              f"p95 latency over {window} above {_num(p95.value)} s ({why(p95, ' s')}).", for_),
        alert("TuneloopLatencyP99High",
              f"tuneloop_variant:request_latency_seconds:p99 > {_num(p99.value)} and on ({by}) ({answered})",
              "warning", "gateway", "{{ $labels.variant }}: p99 latency {{ $value | humanizeDuration }}",
              f"p99 latency over {window} above {_num(p99.value)} s ({why(p99, ' s')}; the p99 starts at "
              f"{_num(P99_OVER_P95)} x the p95 SLO).", for_),
        alert("TuneloopCanaryRolledBack",
              f'increase(tuneloop_canary_decisions_total{{decision="rollback"}}[{decision_window}]) > 0',
              "warning", "canary", "a canary was rolled back",
              f"The gateway removed a canary (or shadow) without promoting it in the last {decision_window}: "
              "the canary analysis found harm (or an operator rolled it back). The version carries the registry "
              "tag tuneloop.rolled_back; the pipeline run's canary.json says why."),
    ]
    request_log = [
        alert("TuneloopRequestLogDropped", f"increase(tuneloop_request_log_dropped_total[{log_window}]) > 0",
              "critical", "request-log", "request-log rows were given up on",
              "The feedback store stayed unreachable past the writer's 100,000 kept rows: served requests are "
              "missing from the training data and the canary analysis."),
        alert("TuneloopRequestLogRejected", f"increase(tuneloop_request_log_rejected_total[{log_window}]) > 0",
              "warning", "request-log", "the database refused request-log rows",
              "Each refused row is named with its request id in the service's log."),
        alert("TuneloopRequestLogScrubFailed", f"increase(tuneloop_request_log_scrub_failed_total[{log_window}]) > 0",
              "warning", "request-log", "request-log rows not stored: PII scrubbing failed",
              "Each such row is named in the service's log."),
        alert("TuneloopRequestLogSpoolFailed", f"increase(tuneloop_request_log_spool_failed_total[{log_window}]) > 0",
              "warning", "request-log", "request-log rows kept in memory only (the spool write failed)",
              "The spool folder is full or unwritable: a crash would lose these rows."),
        alert("TuneloopRequestLogBacklog", f"tuneloop_request_log_backlog > {BACKLOG_ROWS}",
              "warning", "request-log", "{{ $value }} request-log rows waiting to be written",
              "The feedback store is slow or unreachable; past 100,000 rows the oldest are dropped.", for_),
        alert("TuneloopKServeHalvesLost",
              f"increase(tuneloop_kserve_halves_expired_total[{log_window}]) + "
              f"increase(tuneloop_kserve_halves_evicted_total[{log_window}]) > 0",
              "warning", "request-log", "KServe payload-logger halves dropped without their other half",
              "Requests whose response never arrived (or past the byte bound) are not logged."),
    ]
    emb, share = t["embedding_drift"], t["drifted_share"]
    monitor_rules = [
        alert("TuneloopMonitorSLOBreach", "tuneloop_monitor_slo_breach == 1", "warning", "monitor",
              "the champion breaches its SLOs over the monitor's window",
              f"tuneloop monitor: error rate above {_num(monitor.slo_error_rate)} or p95 above "
              f"{_num(monitor.slo_p95_latency_ms)} ms over monitor.window_hours (read from the feedback store: "
              "covers KServe serving too). See monitor.json."),
        alert("TuneloopFeedbackOutOfControl", "tuneloop_monitor_feedback_window_mean < tuneloop_monitor_feedback_lcl",
              "warning", "monitor", "feedback score below its control limit (SPC)",
              "The window's mean feedback score is below the baseline mean - 3 sigma / sqrt(n): users like the "
              "champion's answers less than after its promotion."),
        alert("TuneloopPromptDrift",
              f"tuneloop_monitor_drift_embedding_score > {_num(emb.value)} or "
              f"tuneloop_monitor_drifted_share > {_num(share.value)}",
              "warning", "monitor", "production prompts drifted from the champion's training data",
              f"Embedding drift score above {_num(emb.value)} (monitor.max_embedding_drift) or a drifted share of "
              f"text descriptors above {_num(share.value)} (monitor.max_drifted_share); see the drift report."),
        alert("TuneloopQualitySLOBreach", "tuneloop_monitor_quality_slo_breach == 1", "warning", "monitor",
              "{{ $labels.slice }}: realized {{ $labels.metric }} below its SLO",
              "A quality SLO of monitor.slos is breached on delayed labels (the whole interval below its floor)."),
        alert("TuneloopRetrainDue", "tuneloop_monitor_retrain_due == 1", "info", "monitor",
              "a retraining is due", "tuneloop monitor fired a retraining signal; monitor.action decides what runs."),
        alert("TuneloopMonitorReportStale", f"tuneloop_monitor_report_age_seconds > {REPORT_MAX_AGE_S}", "warning",
              "monitor", "the monitor's newest report is {{ $value | humanizeDuration }} old",
              f"tuneloop monitor wrote no report for over {_num(REPORT_MAX_AGE_S / 3600)} h: the tuneloop_monitor_* "
              "gauges and their alerts describe the past. See the monitor CronJob's last runs."),
        alert("TuneloopMonitorReportRefused", "tuneloop_monitor_report_valid == 0", "warning", "monitor",
              "the monitor's newest report is not served",
              "The newest monitor.prom failed validation (unparsable, incomplete, too large, or naming other "
              "families); none of its gauges are served. The serving process's log says why."),
    ]
    return {"groups": [{"name": "tuneloop-serving", "rules": serving},
                       {"name": "tuneloop-request-log", "rules": request_log},
                       {"name": "tuneloop-monitor", "rules": monitor_rules}]}


def rules_yaml(monitor: Any, baselines: dict[str, Sequence[float]] | None = None, **options: Any) -> str:
    """The rules file's text: a header naming the inputs and each threshold, then the groups."""
    t = thresholds(monitor, baselines)
    head = ["# tuneloop's Prometheus alert rules. Generated by helm/alert_rules.py - do not edit; re-run it.",
            "# Thresholds (start: the run config's monitor section; tightened by helm/alert-baselines.json):"]
    head += [f"#   {name}: {_num(th.value)} ({th.rule}, {th.days} days observed)" for name, th in t.items()]
    if options:
        head.append(f"# options: {', '.join(f'{k}={v}' for k, v in sorted(options.items()))}")
    body = yaml.safe_dump(render_rules(monitor, baselines, **options), sort_keys=False, width=110,
                          allow_unicode=True)
    return "\n".join(head) + "\n" + body


# -- inputs --------------------------------------------------------------------------------------
def monitor_section(path: Path) -> Any:
    """The `monitor` section of a run config file, or of a chart values file's `runConfig`, validated."""
    from tuneloop.config.deploy import MonitorConfig

    doc = yaml.safe_load(path.read_text()) or {}
    cfg = doc.get("runConfig", doc) if "runConfig" in doc else doc
    return MonitorConfig.model_validate(cfg.get("monitor") or {})


def load_baselines(path: Path) -> dict[str, list[float]]:
    if not path.exists():
        return {}
    return {k: [float(x) for x in v] for k, v in (json.loads(path.read_text()).get("daily") or {}).items()}


def observe(prometheus_url: str, days: int, now: float | None = None) -> dict[str, list[float]]:
    """One value a day for each OBSERVED series over the last `days` days, from a Prometheus HTTP API
    (days without data are left out)."""
    now = time.time() if now is None else now
    out: dict[str, list[float]] = {}
    for name, query in OBSERVED.items():
        values = []
        for day in range(days, 0, -1):
            at = now - (day - 1) * 86400
            url = f"{prometheus_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": query, "time": at})
            with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - an operator-given Prometheus URL
                data = json.load(r)
            if data.get("status") != "success":
                raise RuntimeError(f"{prometheus_url}: {query}: {data.get('error')}")
            for sample in data["data"]["result"]:
                v = float(sample["value"][1])
                if math.isfinite(v):
                    values.append(v)
        out[name] = values
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=CHART / "values.yaml",
                    help="run config (or chart values file) whose monitor section gives the SLOs")
    ap.add_argument("--baselines", type=Path, default=BASELINES_FILE, help="observed daily series (JSON)")
    ap.add_argument("--out", type=Path, default=RULES_FILE)
    ap.add_argument("--check", action="store_true", help="exit 1 when --out differs from what would be written")
    ap.add_argument("--observe", metavar="URL", help="fill --baselines from this Prometheus first")
    ap.add_argument("--days", type=int, default=14, help="with --observe: days to read")
    ap.add_argument("--window", default="5m")
    ap.add_argument("--for", dest="for_", default="5m")
    ap.add_argument("--min-requests", type=int, default=20)
    args = ap.parse_args(argv)
    if args.observe:
        daily = observe(args.observe, args.days)
        args.baselines.write_text(json.dumps({"source": args.observe, "observed_at": int(time.time()),
                                              "daily": daily}, indent=2) + "\n")
        print(f"{args.baselines}: " + ", ".join(f"{k} {len(v)} days" for k, v in daily.items()))
    options = {k: v for k, v in (("window", args.window), ("for_", args.for_), ("min_requests", args.min_requests))
               if v != {"window": "5m", "for_": "5m", "min_requests": 20}[k]}
    text = rules_yaml(monitor_section(args.config), load_baselines(args.baselines), **options)
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run .venv/bin/python helm/alert_rules.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    t = thresholds(monitor_section(args.config), load_baselines(args.baselines))
    print(f"wrote {args.out}: " + "; ".join(f"{k} {_num(v.value)} ({v.rule})" for k, v in t.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
