"""Commands that run services and production checks: serve, monitor, feedback-service."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneloop.cli.shared import ConfigArg, StateDir, TrackingUri, app, console, load
from tuneloop.cli.summary import fmt


@app.command()
def serve(config: ConfigArg = None, state_dir: StateDir = None, tracking_uri: TrackingUri = None,
          host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
          port: Annotated[int | None, typer.Option(help="Port; default: the port of deploy.gateway_url.")] = None,
          ) -> None:
    """Start the local serving gateway (champion + canary from the registry aliases)."""
    from tuneloop.deploy.gateway import serve as do_serve

    cfg = load(config, state_dir, tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    do_serve(cfg, host, port or int(cfg.deploy.gateway_url.rsplit(":", 1)[1].split("/")[0]))


@app.command()
def monitor(config: ConfigArg = None, state_dir: StateDir = None, tracking_uri: TrackingUri = None,
            out: Annotated[Path | None, typer.Option(help="Folder for monitor.json, monitor.prom and the drift "
                                                          "report; default <state_dir>/monitor/<timestamp>.")] = None,
            ) -> None:
    """Check production (SLOs, feedback trend, prompt drift, feedback volume) and start a run when due.

    What happens when retraining is due is the config's monitor.action: report, run, or submit.
    Exits 0 after a check; the decision is in monitor.json and in MLflow.
    """
    import time as _time

    from tuneloop.monitor.check import check, record

    cfg = load(config, state_dir, tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    target = out or cfg.state_path / "monitor" / _time.strftime("%Y%m%d-%H%M%S")
    r = check(cfg, target)
    record(cfg, r, target)
    r["action"] = _act_on_monitor(cfg, r)
    slo = r["slo"]
    console.print(f"champion {r['champion']}: {r['window_requests']} requests in the window, error rate "
                  f"{slo['error_rate']:.3f}, p95 {fmt(slo['p95_latency_ms'])} ms"
                  f"{' (SLO BREACH)' if r['slo_breach'] else ''}")
    console.print(f"feedback trend: {r['feedback_trend']['verdict']}; drift: "
                  f"{r['drift'].get('note') or 'embedding score ' + fmt(r['drift'].get('embedding_drift_score'))}; "
                  f"feedback since champion: {r['feedback_volume']['since_champion']}")
    console.print(f"retrain: {'DUE (' + ', '.join(r['reasons']) + ')' if r['retrain'] else 'not due'}; "
                  f"action: {r['action']}; report in {target}")


def _act_on_monitor(cfg: Any, report: dict[str, Any]) -> str:
    """What `monitor.action` says to do when the check found retraining due."""
    if not report["retrain"]:
        return "none"
    if cfg.monitor.action == "run":
        from tuneloop.orchestrate import run_local

        return f"ran pipeline: {run_local(cfg)['outcome']}"
    if cfg.monitor.action == "submit":
        from tuneloop.orchestrate import submit

        return f"submitted KFP run {submit(cfg, cfg.monitor.kfp_host or '', cfg.registry.experiment, None)}"
    return "retraining is due (action: report)"


@app.command("feedback-service")
def feedback_service(
    database_url: Annotated[str, typer.Option(envvar="DATABASE_URL", help="SQLAlchemy URL of the feedback store "
                                              "(postgresql://user:password@host:5432/feedback on a cluster, psycopg 3; a sqlite "
                                              "path locally).")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    config: Annotated[Path | None, typer.Option(help="Run config whose data.pii settings scrub what is stored; "
                                                     "default: the default PII settings.")] = None,
) -> None:
    """The cluster's feedback service: KServe payload-logger events in, user feedback in, PII-scrubbed."""
    import uvicorn

    from tuneloop.config import PiiConfig
    from tuneloop.data.pii import PiiScrubber
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.feedback.service import create_feedback_service

    pii = load(config).data.pii if config else PiiConfig()
    store = FeedbackStore(database_url, scrubber=PiiScrubber(pii) if pii.enabled else None)
    uvicorn.run(create_feedback_service(store), host=host, port=port, log_level="warning")


