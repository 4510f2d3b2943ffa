"""Commands that run services and production checks: serve, monitor, feedback-service, api-key."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneloop.cli.shared import ConfigArg, StateDir, TrackingUri, app, console, fail_line, load
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
    """Check production (SLOs, feedback trend, prompt drift, feedback volume, quality of the classification
    slices: estimated, realized from delayed labels, audited) and start a run when due.

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
    for line in _quality_lines(r.get("quality") or {}):
        console.print(line, markup=False)
    console.print(f"retrain: {'DUE (' + ', '.join(r['reasons']) + ')' if r['retrain'] else 'not due'}; "
                  f"action: {r['action']}; report in {target}")
    if r["retrain"]:
        for line in _diagnosis_lines(r.get("diagnosis") or {}, target):
            console.print(line, markup=False)


def _diagnosis_lines(d: dict[str, Any], target: Path) -> list[str]:
    """The likely causes of the decay, one line each (monitor/decay.py), and where the whole diagnosis is."""
    if d.get("error"):
        return [f"diagnosis: failed ({d['error']})"]
    if not d.get("markdown"):
        return []
    lines = [f"likely cause {i}: {c['cause']}" for i, c in enumerate(d.get("causes") or [], 1)]
    return (lines or ["likely causes: none found"]) + [f"diagnosis: {target / d['markdown']}"]


def _quality_lines(q: dict[str, Any]) -> list[str]:
    """One line per classification slice: estimated, realized and audited accuracy with intervals; SLO breaches."""
    def iv(x: dict[str, Any] | None) -> str:
        if not x or x.get("value") is None:
            return "-"
        return f"{x['value']:.3f} [{fmt(x.get('lower'))}, {fmt(x.get('upper'))}]"

    lines = []
    for sl, s in sorted((q.get("slices") or {}).items()):
        w = (s.get("estimate") or {}).get("window") or {}
        est = f"estimated accuracy {iv(w.get('accuracy'))}, F1 {iv(w.get('macro_f1'))} ({s['estimate_verdict']}" \
              + (f", floor {s['floor']:.3f})" if s.get("floor") is not None else ")")
        r = s["realized"]
        audit = s.get("audit") or {}
        lines.append(f"quality {sl}: {s['requests']} requests, {est}; realized {iv(r['accuracy'])} on "
                     f"{r['labelled']} labelled; audit (PPI) {iv(audit)} on {audit.get('n_rated', 0)} rated"
                     + (f" vs human only {iv(audit['human_only'])}" if audit.get("human_only") else ""))
    if q.get("reference") and q["reference"].get("note"):
        lines.append(f"quality: {q['reference']['note']}")
    for slo in q.get("slos") or []:
        if slo["verdict"] != "ok":
            lines.append(f"quality SLO {slo['slice']}/{slo['label'] or '*'} {slo['metric']} >= {slo['min']}: "
                         f"{slo['verdict'].upper()} ({iv(slo)} on {slo['n']} labelled)")
    return lines


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
    config: Annotated[Path | None, typer.Option(help="Run config whose data.pii settings scrub what is stored and "
                                                     "whose deploy.auth / deploy.limits apply; default: the defaults "
                                                     "(keys in $TUNELOOP_API_KEYS, the user-id HMAC key in "
                                                     "$TUNELOOP_USER_ID_SECRET).")] = None,
) -> None:
    """The cluster's feedback service: KServe payload-logger events in, user feedback in, PII-scrubbed.

    Refuses to start without API keys or without the user-id secret (unless deploy.auth.enabled is
    false, for development only).
    """
    import uvicorn

    from tuneloop.config import PiiConfig
    from tuneloop.config.deploy import AuthConfig, LimitsConfig
    from tuneloop.data.pii import PiiScrubber
    from tuneloop.feedback.auth import AuthNotConfigured, Guard
    from tuneloop.feedback.service import create_feedback_service
    from tuneloop.feedback.store import FeedbackStore

    cfg = load(config) if config else None
    pii = cfg.data.pii if cfg else PiiConfig()
    auth, limits = (cfg.deploy.auth, cfg.deploy.limits) if cfg else (AuthConfig(), LimitsConfig())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        guard = Guard.from_config(auth, limits)
    except (AuthNotConfigured, ValueError) as e:
        fail_line(f"feedback-service: {e}", 2)
    store = FeedbackStore(database_url, scrubber=PiiScrubber(pii) if pii.enabled else None)
    uvicorn.run(create_feedback_service(store, guard, limits.pending_halves_max_bytes, limits.pending_halves_max_age_s),
                host=host, port=port, log_level="warning")


@app.command("api-key")
def api_key(
    name: Annotated[str, typer.Argument(help="The key's name (letters, digits, - and _): logged with what it sends.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: chat, feedback, events, admin, trusted.")] = "feedback",
) -> None:
    """Make an API key: print its token and its line for the key file or the TUNELOOP_API_KEYS Secret.

    The token is for the client and is not kept anywhere; the line holds only the token's sha256."""
    from tuneloop.feedback.auth import SCOPES, key_line, new_token

    wanted = [s for s in scopes.split(",") if s]
    if not name.replace("-", "").replace("_", "").isalnum():
        fail_line(f"api-key: name {name!r}: use letters, digits, - and _ only", 2)
    if not wanted or set(wanted) - set(SCOPES):
        fail_line(f"api-key: --scopes {scopes!r}: use some of {', '.join(SCOPES)}", 2)
    token = new_token()
    typer.echo(f"token: {token}")
    typer.echo(f"key line: {key_line(name, wanted, token)}")
