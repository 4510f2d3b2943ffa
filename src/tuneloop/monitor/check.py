"""Production checks that return a decision: is the next pipeline run due? (`tuneloop monitor`)

Checks over the last `monitor.window_hours`:
  slo              error rate and p95 latency of the served champion against the SLOs
  feedback_trend   an SPC chart of the feedback score: baseline = the first `baseline_requests`
                   scored requests after the champion's promotion; the window mean is out of
                   control below mean - 3 sigma / sqrt(n)
  drift            production prompts vs the champion's training data (Evidently text
                   descriptors and MiniLM embedding drift, the data plane's drift report)
  feedback_volume  feedback collected since the champion was registered
  quality          per classification slice: estimated accuracy and F1 (label-free, NannyML CBPE),
                   realized figures from delayed labels with the quality SLOs, and the human audit
                   combined with the estimate by prediction-powered inference (monitor/quality.py)
Results go to out/monitor.json, out/monitor.prom (Prometheus textfile format) and an MLflow
run. The report carries the decision (`retrain`, with the signals in `retrain_on` that fired);
when a signal fired (or a serving SLO is breached), out/diagnosis.md and .json say why
(monitor/decay.py: what decayed, wrong answers, traffic against the champion's training data,
likely causes), the report's `diagnosis` holds the top causes and the MLflow run's description
the Markdown. Acting on it (report, run here, submit to KFP: `monitor.action`) is the caller's
job - the CLI's, or a scheduler's - never this module's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.evaluate.stats import p95, spc
from tuneloop.jsonl import write_jsonl

log = logging.getLogger("tuneloop.monitor")


def check(cfg: RunConfig, out: Path, now: float | None = None) -> dict[str, Any]:
    from tuneloop.data.drift import drift_report
    from tuneloop.data.replay import champion_training_data
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.registry import Registry

    m = cfg.monitor
    now = now or time.time()
    since = now - m.window_hours * 3600
    out.mkdir(parents=True, exist_ok=True)
    reg = Registry(cfg)
    store = FeedbackStore(cfg.feedback_db)
    champ = reg.alias_version("champion")
    version = str(champ.version) if champ else "base"
    served = [r for r in store.requests(since=0.0) if r["variant"] == "champion" and r["model_version"] == version]
    window = [r for r in served if r["created"] >= since]
    report: dict[str, Any] = {"time": now, "champion": version, "window_requests": len(window)}

    errors = sum(r["status"] != "ok" for r in window)
    err_rate = errors / len(window) if window else 0.0
    p95_ms = p95([r["latency_ms"] for r in window if r["status"] == "ok"])
    report["slo"] = {"error_rate": err_rate, "p95_latency_ms": p95_ms,
                     "error_rate_ok": err_rate <= m.slo_error_rate,
                     "latency_ok": p95_ms is None or p95_ms <= m.slo_p95_latency_ms}

    promoted = float(champ.tags.get("tuneloop.promoted_at", 0)) if champ else 0.0
    scored = [r for r in served if r["score"] is not None and r["created"] >= promoted]
    baseline = [r["score"] for r in scored[:m.baseline_requests]]
    recent = [r["score"] for r in scored[m.baseline_requests:] if r["created"] >= since]
    report["feedback_trend"] = spc(baseline, recent, m.min_window_feedback)

    rows = store.rows(since=(champ.creation_timestamp / 1000) if champ else 0.0)
    report["feedback_volume"] = {"since_champion": len(rows), "threshold": m.min_new_feedback}

    data = champion_training_data(reg, cfg.state_path / "replay") if champ else None
    drift = drift_report(_window_prompts(store, since, out), data.sft if data else None, out / "drift",
                         cfg.data.drift, f"champion v{version} training data")
    report["drift"] = drift
    drifted = bool(drift.get("computed")) and (
        (drift.get("drifted_share") or 0) >= m.max_drifted_share
        or (drift.get("embedding_drift_score") or 0) >= m.max_embedding_drift)

    from tuneloop.monitor.quality import quality_report

    report["quality"] = quality_report(cfg, store, reg, champ, version, since, now)
    signals = {"drift": drifted, "feedback_trend": report["feedback_trend"]["verdict"] == "below",
               "feedback_volume": len(rows) >= m.min_new_feedback,
               "estimated_quality": bool(report["quality"]["below_floor"]),
               "quality_slo": bool(report["quality"]["slo_breaches"])}
    report["signals"] = signals
    report["retrain"] = any(signals[s] for s in m.retrain_on)
    report["reasons"] = [s for s in m.retrain_on if signals[s]]
    report["slo_breach"] = not (report["slo"]["error_rate_ok"] and report["slo"]["latency_ok"])
    if report["retrain"] or any(signals.values()) or report["slo_breach"]:
        report["diagnosis"] = _diagnosis(cfg, store, version, since, report,
                                         {r["request_id"]: r["score"] for r in window}, data.sft if data else None, out)
    (out / "monitor.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "monitor.prom").write_text(prometheus_text(report))
    return report


def _diagnosis(cfg: RunConfig, store: Any, version: str, since: float, report: dict[str, Any],
               scores: dict[str, float | None], champion_sft: Path | None, out: Path) -> dict[str, Any]:
    """out/diagnosis.md and .json for a check that flagged something (monitor/decay.py): the report's
    `diagnosis` section. Never raises: the check's verdict stands without its diagnosis, which then says why."""
    from tuneloop.monitor.decay import write_decay_diagnosis

    try:
        return write_decay_diagnosis(cfg, store, version, since, report, scores, champion_sft, out)
    except Exception as e:  # noqa: BLE001 - a diagnosis must not take the monitor down
        log.exception("monitor: the decay diagnosis failed")
        return {"causes": [], "markdown": None, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def _window_prompts(store: Any, since: float, out: Path) -> Path:
    """Production prompts of the window (whichever version answered) as records the drift report reads."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from tuneloop.feedback.store import Request

    store.flush()
    with Session(store.engine) as s:
        rows = s.scalars(select(Request).where(Request.created >= since))  # any variant: prompts are prompts
        return write_jsonl(out / "production_prompts.jsonl",
                           ({"id": r.request_id, "user_text": r.prompt, "response": r.output} for r in rows))


def prometheus_text(report: dict[str, Any]) -> str:
    """The monitor's verdicts as gauges (Prometheus textfile-collector format)."""
    def g(name: str, value: Any, help_: str) -> str:
        v = float(value) if value is not None else float("nan")
        return f"# HELP tuneloop_monitor_{name} {help_}\n# TYPE tuneloop_monitor_{name} gauge\n" \
               f'tuneloop_monitor_{name}{{champion="{report["champion"]}"}} {v}\n'
    t = report["feedback_trend"]
    return "".join([
        g("window_requests", report["window_requests"], "Champion requests in the window"),
        g("error_rate", report["slo"]["error_rate"], "Champion error rate in the window"),
        g("p95_latency_ms", report["slo"]["p95_latency_ms"], "Champion p95 latency in the window"),
        g("feedback_window_mean", t.get("window_mean"), "Mean feedback score in the window"),
        g("feedback_lcl", t.get("lcl"), "SPC lower control limit of the feedback mean"),
        g("feedback_since_champion", report["feedback_volume"]["since_champion"], "Feedback items since promotion"),
        g("drift_embedding_score", report["drift"].get("embedding_drift_score"), "Prompt embedding drift score"),
        g("drifted_share", report["drift"].get("drifted_share"), "Share of drifted prompt descriptors"),
        g("retrain_due", report["retrain"], "1 when a retraining signal fired"),
        g("slo_breach", report["slo_breach"], "1 when an SLO is breached"),
        quality_prometheus(report),
    ])


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def quality_prometheus(report: dict[str, Any]) -> str:
    """Per-slice (and per-label) quality gauges: one HELP/TYPE block per metric, a sample per label set."""
    q = report.get("quality") or {}
    series: dict[str, tuple[str, list[tuple[dict[str, Any], Any]]]] = {}

    def add(name: str, help_: str, labels: dict[str, Any], value: Any) -> None:
        series.setdefault(name, (help_, []))[1].append((labels, value))

    for sl, s in sorted((q.get("slices") or {}).items()):
        w = (s.get("estimate") or {}).get("window") or {}
        for metric in ("accuracy", "macro_f1"):
            iv = w.get(metric) or {}
            for part, key in (("", "value"), ("_lower", "lower"), ("_upper", "upper")):
                add(f"estimated_{metric}{part}", f"Estimated (label-free, CBPE) {metric} of the slice in the window"
                    + {"": "", "_lower": ", interval lower bound", "_upper": ", interval upper bound"}[part],
                    {"slice": sl}, iv.get(key))
        add("estimated_requests", "Window requests of the slice with label probabilities", {"slice": sl},
            s.get("with_probabilities"))
        add("estimate_below_floor", "1 when the slice's estimated accuracy is below its floor", {"slice": sl},
            s.get("estimate_verdict") == "below")
        r = s["realized"]
        add("realized_labelled", "Window requests of the slice with ground truth", {"slice": sl}, r["labelled"])
        for part, key in (("", "value"), ("_lower", "lower"), ("_upper", "upper")):
            add(f"realized_accuracy{part}", "Realized accuracy (delayed labels) of the slice in the window"
                + ("" if not part else f", interval {key} bound"), {"slice": sl}, r["accuracy"][key])
        for lab, pr in sorted(r["per_label"].items()):
            for metric in ("precision", "recall"):
                add(f"realized_{metric}", f"Realized {metric} of the label (delayed labels)",
                    {"slice": sl, "label": lab}, pr[metric]["value"])
        a = s.get("audit") or {}
        for part, key in (("", "value"), ("_lower", "lower"), ("_upper", "upper")):
            add(f"audit_accuracy{part}", "Live accuracy from the human audit + the estimate (PPI)"
                + ("" if not part else f", interval {key} bound"), {"slice": sl}, a.get(key))
        add("audit_rated", "Human-rated audit requests of the slice in the window", {"slice": sl}, a.get("n_rated"))
    for slo in q.get("slos") or []:
        add("quality_slo_breach", "1 when a quality SLO is breached (realized interval below its floor)",
            {"slice": slo["slice"], "label": slo["label"] or "", "metric": slo["metric"]}, slo["verdict"] == "breach")
    lines = []
    for name, (help_, samples) in series.items():
        lines += [f"# HELP tuneloop_monitor_{name} {help_}", f"# TYPE tuneloop_monitor_{name} gauge"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in {"champion": report["champion"], **labels}.items())
            v = float(value) if value is not None else float("nan")
            lines.append(f"tuneloop_monitor_{name}{{{lab}}} {v}")
    return "\n".join(lines) + ("\n" if lines else "")


def record(cfg: RunConfig, report: dict[str, Any], out: Path) -> str:
    """The check as an MLflow run (metrics, the report folder as artifacts); returns its id."""
    from tuneloop.registry import NOTE, Registry

    tags = {"tuneloop.stage": "monitor", "tuneloop.champion": report["champion"],
            "tuneloop.retrain": str(report["retrain"]).lower()}
    note = _description(report, out)
    if note:
        tags[NOTE] = note
    return Registry(cfg).record_run(
        f"monitor-{time.strftime('%Y%m%d-%H%M%S')}",
        tags=tags,
        metrics={"window_requests": report["window_requests"], "error_rate": report["slo"]["error_rate"],
                 "feedback_since_champion": report["feedback_volume"]["since_champion"],
                 "retrain_due": float(report["retrain"]), "slo_breach": float(report["slo_breach"]),
                 **{k: v for k, v in report["feedback_trend"].items() if isinstance(v, float)},
                 **_quality_metrics(report)},
        artifacts=out, artifact_path="monitor")


def _description(report: dict[str, Any], out: Path, limit: int = 8000) -> str | None:
    """The run's description (mlflow.note.content): the decision, then the diagnosis Markdown when there is one
    (cut at MLflow's tag limit; the whole of it is the artifact monitor/diagnosis.md)."""
    diag = report.get("diagnosis") or {}
    md = out / diag["markdown"] if diag.get("markdown") else None
    if md is None or not md.exists():
        if diag.get("error"):
            return f"**monitor**: the decay diagnosis failed: {diag['error']}"
        return None
    decision = f"due ({', '.join(report['reasons'])})" if report["retrain"] else "not due"
    head = f"**monitor**: retraining {decision}; the diagnosis below is the artifact `monitor/{diag['markdown']}`.\n\n"
    text = head + md.read_text()
    tail = "\n\n... (cut; the whole diagnosis is in the artifact)"
    return text if len(text) <= limit else text[:limit - len(tail)] + tail


def _quality_metrics(report: dict[str, Any]) -> dict[str, float]:
    """quality.<slice>.<figure> for the run: estimated, realized and audited accuracy where there is one."""
    out = {}
    for sl, s in (report.get("quality") or {}).get("slices", {}).items():
        figures = {"estimated_accuracy": ((s.get("estimate") or {}).get("window") or {}).get("accuracy", {}),
                   "realized_accuracy": s["realized"]["accuracy"], "audit_accuracy": s.get("audit") or {}}
        out.update({f"quality.{sl}.{k}": float(v["value"]) for k, v in figures.items() if v.get("value") is not None})
    return out
