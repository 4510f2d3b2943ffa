"""Canary rollout on the local gateway: deploy, analyse, promote or roll back.

deploy_canary    alias `canary` -> the new version (with its traffic share), gateway reloads
analyze_canary   canary vs champion on error rate, latency and feedback score. `test: sequential`
                 (default): always-valid tests (evaluate/sequential.py) after every batch, stopping
                 early on clear harm or clear success, the window being a maximum; `test: fixed`:
                 Fisher's exact test, p95 ratio and Welch's t-test once over the whole window
                 (`compare`). Locally the window is filled by replaying a traffic file whose
                 references stand in for users; on KServe the feedback store is polled
promote          previous <- champion, champion <- canary, canary removed, gateway reloads
rollback         canary removed (the version is tagged rolled_back), gateway reloads

Every look of the analysis (each batch of the sequential test, the fixed test's one) is also a row of
the feedback store's `canary_looks` table (feedback/canary_looks.py): the analyze task is too short-lived
to be scraped, so the feedback service and the gateway serve the latest look on /metrics.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx

from tuneloop.config import RunConfig
from tuneloop.evaluate.metrics import normalize_answer
from tuneloop.evaluate.stats import fisher_greater, p95, welch_less
from tuneloop.feedback.auth import client_headers
from tuneloop.jsonl import read_jsonl
from tuneloop.registry import TAG_CANARY_PERCENT, Registry

log = logging.getLogger("tuneloop.canary")
POLL_S = 15.0  # kserve backend: how often the feedback store is read while the window fills


# -- the gateway process --
def gateway_alive(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_gateway(cfg: RunConfig, timeout_s: float = 180) -> subprocess.Popen | None:
    """Start `tuneloop serve` in the background unless one answers already; None if it did."""
    import yaml

    url = cfg.deploy.gateway_url
    if gateway_alive(url):
        return None
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    config_path = cfg.state_path / "gateway-config.yaml"  # resolved: every path in it is absolute
    config_path.write_text(yaml.safe_dump(cfg.to_pipeline_param(), sort_keys=False))
    logf = open(cfg.state_path / "gateway.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen([sys.executable, "-m", "tuneloop.cli", "serve", str(config_path), "--port", str(port),
                             "--state-dir", str(cfg.state_path)], stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {cfg.state_path / 'gateway.log'}")
        if gateway_alive(url):
            return proc
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"gateway did not answer on {url} within {timeout_s:.0f}s")


def stop_gateway(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _reload(cfg: RunConfig) -> dict[str, Any]:
    """Ask the gateway to re-read the aliases (token: $TUNELOOP_API_TOKEN, else the local gateway's own);
    a 503 (registry unreachable: serving unchanged) fails the step."""
    r = httpx.post(f"{cfg.deploy.gateway_url}/admin/reload", timeout=300, headers=client_headers(cfg.state_path))
    r.raise_for_status()
    return r.json()


def _apply(cfg: RunConfig, step: str, version: str, champion: str | None = None) -> dict[str, Any]:
    """Make serving follow the registry after an alias change: the local gateway re-reads the
    aliases; on KServe the InferenceService is patched (deploy/kserve.py)."""
    if cfg.deploy.backend == "local":
        return _reload(cfg)
    from tuneloop.deploy import kserve

    if step == "deploy":
        obj = kserve.deploy(cfg, version)
    elif step == "promote":
        obj = kserve.promote(cfg, version)
    else:
        obj = kserve.rollback(cfg, champion)
    return {"inference_service": kserve.service_name(cfg), "status": (obj or {}).get("status", {})}


# -- rollout steps --
def deploy_canary(cfg: RunConfig, version: str) -> dict[str, Any]:
    reg = Registry(cfg)
    mode = cfg.deploy.canary.mode
    reg.set_version_tag(version, TAG_CANARY_PERCENT, str(cfg.deploy.canary.traffic_percent))
    reg.set_alias(mode, version)
    state = _apply(cfg, "deploy", version)
    log.info("%s: version %s %s; gateway serves %s", mode, version,
             f"gets {cfg.deploy.canary.traffic_percent}% of users" if mode == "canary" else "mirrors all traffic",
             state)
    return {"version": version, "traffic_percent": cfg.deploy.canary.traffic_percent, "gateway": state,
            "deployed_at": time.time()}


def replay_traffic(cfg: RunConfig, since: float, start: int = 0, count: int | None = None) -> int:
    """Send the traffic file through the gateway as distinct users; a reference stands in for the
    user's judgement (score 1 if the answer matches it, else 0 and the reference as correction).
    Requests `start` .. `start + count` of the window (default: all `requests`), so a sequential
    analysis replays it batch by batch with the same users as a single pass."""
    c = cfg.deploy.canary
    assert c.traffic_file is not None
    rows = read_jsonl(c.traffic_file)
    stop = c.requests if count is None else min(c.requests, start + count)
    sent = 0
    with httpx.Client(base_url=cfg.deploy.gateway_url, timeout=120, headers=client_headers(cfg.state_path)) as http:
        for i in range(start, stop):
            row = rows[i % len(rows)]
            body = {"messages": [{"role": "user", "content": row["prompt"]}], "user": f"replay-user-{i}",
                    "max_tokens": c.max_new_tokens, "metadata": {"slice": row.get("slice", "")}}
            r = http.post("/v1/chat/completions", json=body)
            sent += 1
            if r.status_code != 200 or "reference" not in row:
                continue
            answer = r.json()["choices"][0]["message"]["content"]
            good = normalize_answer(answer) == normalize_answer(row["reference"])
            fb: dict[str, Any] = {"request_id": r.json()["id"], "score": 1.0 if good else 0.0}
            if not good:
                fb["correction"] = row["reference"]
            http.post("/v1/feedback", json=fb)
    return sent


def _sides(rows: list[dict[str, Any]], mode: str) -> dict[str, list[dict[str, Any]]]:
    return {"champion": [r for r in rows if r["variant"] == "champion"],
            "canary": [r for r in rows if r["variant"] == mode]}  # the new version, canary or shadow


def _figures(side: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    fig: dict[str, dict[str, Any]] = {}
    for v, rs in side.items():
        scores = [r["score"] for r in rs if r["score"] is not None]
        fig[v] = {"requests": len(rs), "errors": sum(r["status"] != "ok" for r in rs),
                  "error_rate": sum(r["status"] != "ok" for r in rs) / max(len(rs), 1),
                  "p95_latency_ms": p95([r["latency_ms"] for r in rs if r["status"] == "ok"]) or 0.0,
                  "feedback_n": len(scores), "feedback_mean": sum(scores) / len(scores) if scores else None,
                  "_scores": scores}
    return fig


def compare(rows: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Canary vs champion over the window's requests -> decision with its figures."""
    c = cfg.deploy.canary
    fig = _figures(_sides(rows, c.mode))
    ch, ca = fig["champion"], fig["canary"]
    checks = []
    if ca["requests"] == 0:
        checks.append({"check": "traffic", "passed": False, "detail": "the canary received no requests"})
    elif ch["requests"] == 0:  # every test below would pass for want of a baseline
        checks.append({"check": "traffic", "passed": False,
                       "detail": "the champion received no requests; nothing to compare the canary with"})
    else:
        # error rate: one-sided Fisher exact test that the canary errs more, plus the allowed margin
        p_err = fisher_greater(ca["errors"], ca["requests"], ch["errors"], ch["requests"])
        worse = ca["error_rate"] - ch["error_rate"] > c.max_error_rate_increase
        checks.append({"check": "error_rate", "passed": not (worse and p_err < c.alpha),
                       "detail": f"canary {ca['error_rate']:.3f} vs champion {ch['error_rate']:.3f}, "
                                 f"allowed +{c.max_error_rate_increase}, Fisher p={p_err:.3g}"})
        ok_ca, ok_ch = ca["requests"] - ca["errors"], ch["requests"] - ch["errors"]
        if min(ok_ca, ok_ch) < c.min_latency_requests:  # a p95 of a handful of values is their maximum: one stall
            checks.append({"check": "p95_latency", "passed": True,
                           "detail": f"not enough answered requests to compare latency (canary {ok_ca}, champion "
                                     f"{ok_ch}, need {c.min_latency_requests} each)"})
        elif ch["p95_latency_ms"] > 0 and ca["p95_latency_ms"] > 0:
            ratio = ca["p95_latency_ms"] / ch["p95_latency_ms"]
            checks.append({"check": "p95_latency", "passed": ratio <= c.max_p95_latency_ratio,
                           "detail": f"canary {ca['p95_latency_ms']:.0f} ms vs champion "
                                     f"{ch['p95_latency_ms']:.0f} ms, ratio {ratio:.2f} "
                                     f"(limit {c.max_p95_latency_ratio})"})
        a, b = ca["_scores"], ch["_scores"]
        if len(a) >= 3 and len(b) >= 3:
            delta = ca["feedback_mean"] - ch["feedback_mean"]
            p_fb = welch_less(a, b)
            bad = delta < c.min_feedback_delta and (p_fb < c.alpha or (min(a) == max(a) and min(b) == max(b)))
            checks.append({"check": "feedback", "passed": not bad,
                           "detail": f"canary {ca['feedback_mean']:.3f} vs champion {ch['feedback_mean']:.3f} "
                                     f"(delta {delta:+.3f}, floor {c.min_feedback_delta}, Welch p={p_fb:.3g})"})
        else:
            checks.append({"check": "feedback", "passed": True,
                           "detail": f"not enough feedback to test (canary {len(a)}, champion {len(b)})"})
    for v in fig.values():
        v.pop("_scores")
    promote = all(ch_["passed"] for ch_ in checks)
    return {"decision": "promote" if promote else "rollback", "checks": checks, "figures": fig}


def sequential_compare(rows: list[dict[str, Any]], cfg: RunConfig, final: bool) -> dict[str, Any]:
    """One look of the sequential test over the requests so far -> decision ("continue" before the window's
    end without a decision, else "promote" / "rollback"), checks, figures and the test's record (see
    evaluate/sequential.py for what harm, success and the window's end mean)."""
    from tuneloop.evaluate import sequential as seq  # savvi, scipy: only where a canary is analysed

    c = cfg.deploy.canary
    side = _sides(rows, c.mode)
    fig = _figures(side)
    for v in fig.values():
        v.pop("_scores")
    stats = {v: seq.Side.from_rows(rs) for v, rs in side.items()}
    r = seq.decide(stats["canary"], stats["champion"], seq.Margins.from_config(c), c.alpha, c.min_requests,
                   final, c.inconclusive)
    code = int(r["decision"])
    checks, record = seq.report(r, stats["canary"], stats["champion"], c)
    if bool(r["no_traffic"]):
        who = "canary" if fig["canary"]["requests"] == 0 else "champion"
        checks.insert(0, {"check": "traffic", "passed": not final,
                          "detail": "the canary received no requests" if who == "canary" else
                          "the champion received no requests; nothing to compare the canary with"})
    elif final and code == seq.ROLLBACK and not bool(r["harm"]):
        checks.append({"check": "evidence", "passed": False,
                       "detail": "the window ended before the canary was shown within every margin "
                                 "(`inconclusive: rollback`: the champion stays)"})
    decision = {seq.PROMOTE: "promote", seq.ROLLBACK: "rollback", seq.CONTINUE: "continue"}[code]
    reason = ("harm shown" if bool(r["harm"]) else "no traffic on a side" if bool(r["no_traffic"]) else
              "every metric shown within its margin" if bool(r["success"]) else
              f"window maximum without a decision (inconclusive: {c.inconclusive})" if final else "")
    return {"decision": decision, "checks": checks, "figures": fig,
            "sequential": {"test": seq.TEST_NAME, "alpha": c.alpha, "reason": reason, "final": final,
                           "requests": {v: fig[v]["requests"] for v in ("canary", "champion")},
                           "min_requests": c.min_requests, "metrics": record}}


def _wait_budget_s(cfg: RunConfig) -> float:
    """How long the analysis may wait: the analyze task's timeout (every non-training task gets
    `platform.task_timeout_minutes`, pipelines/continuous_training.py) less a reserve for the rest of
    the task (reading the store, logging to MLflow): min(5 minutes, 20%)."""
    timeout_s = cfg.platform.task_timeout_minutes * 60
    return timeout_s - min(300.0, 0.2 * timeout_s)


def _deadline(cfg: RunConfig, deployed_at: float, started: float) -> float:
    window_end = deployed_at + cfg.deploy.canary.window_minutes * 60
    bound = started + _wait_budget_s(cfg)
    if window_end > bound:
        log.warning("deploy.canary.window_minutes (%.0f) ends after the analyze task's timeout "
                    "(platform.task_timeout_minutes %d) less its reserve: the window is cut to %.1f minutes",
                    cfg.deploy.canary.window_minutes, cfg.platform.task_timeout_minutes,
                    (bound - deployed_at) / 60)
    return min(window_end, bound)


def _analyze_fixed(cfg: RunConfig, deployed_at: float, store: Any) -> dict[str, Any]:
    if cfg.deploy.backend == "local":
        sent = replay_traffic(cfg, deployed_at)
    else:  # live traffic, logged by KServe into the feedback service: wait for the window to fill
        time.sleep(max(0.0, _deadline(cfg, deployed_at, time.time()) - time.time()))
        sent = 0
    rows = store.requests(since=deployed_at)
    result = compare(rows, cfg)
    result["replayed_requests"] = sent
    result["test"] = "fixed"
    _record_look(_looks(store), deployed_at, 1, result, _versions(rows, cfg.deploy.canary.mode, {}))
    return result


def _analyze_sequential(cfg: RunConfig, deployed_at: float, store: Any) -> dict[str, Any]:
    """Look after every batch until a decision or the window's maximum: locally `requests` replayed in
    batches of `batch_requests`; on KServe the store is read every POLL_S seconds and looked at whenever
    `batch_requests` new requests arrived, or at the deadline."""
    from tuneloop.evaluate import sequential as seq  # savvi, scipy: only where a canary is analysed

    c = cfg.deploy.canary
    batch = min(c.batch_requests, c.requests)
    history: list[dict[str, Any]] = []
    sent, looked_at = 0, 0
    looks, versions = _looks(store), {"canary": "", "champion": ""}
    deadline = _deadline(cfg, deployed_at, time.time()) if cfg.deploy.backend != "local" else math.inf
    while True:
        if cfg.deploy.backend == "local":
            n = replay_traffic(cfg, deployed_at, start=sent, count=batch)
            sent += n
            final = sent >= c.requests or n == 0
            rows = store.requests(since=deployed_at)
        else:
            rows = store.requests(since=deployed_at)
            final = time.time() >= deadline
            if not final and len(rows) - looked_at < batch:
                time.sleep(max(0.0, min(POLL_S, deadline - time.time())))
                continue
        looked_at = len(rows)
        result = sequential_compare(rows, cfg, final)
        s = result["sequential"]
        history.append({"canary": s["requests"]["canary"], "champion": s["requests"]["champion"],
                        "decision": result["decision"],
                        **{f"{m}.e_value_no_difference": s["metrics"][m]["e_value_no_difference"]
                           for m in seq.METRICS}})
        log.info("canary look %d: %d canary / %d champion requests, %s", len(history), s["requests"]["canary"],
                 s["requests"]["champion"], result["decision"])
        versions = _versions(rows, c.mode, versions)
        _record_look(looks, deployed_at, len(history), result, versions)
        if result["decision"] != "continue":
            break
    s.update(looks=len(history), stopped_early=not final, history=history)
    result["replayed_requests"] = sent
    result["test"] = "sequential"
    return result


def _looks(store: Any) -> Any | None:
    """The canary-looks table on the store's database (feedback/canary_looks.py), where the feedback
    service and the gateway read the latest look for /metrics; None when the store has no database
    (a test's stand-in) or the table cannot be made (said in the log: the analysis goes on without it)."""
    engine = getattr(store, "engine", None)
    if engine is None:
        return None
    from tuneloop.feedback.canary_looks import CanaryLooks

    try:
        return CanaryLooks(engine)
    except Exception as e:  # noqa: BLE001 - the looks are for watching; the decision does not need them
        log.warning("canary looks will not be recorded: %s", e)
        return None


def _versions(rows: list[dict[str, Any]], mode: str, known: dict[str, str]) -> dict[str, str]:
    """The model version on each side of the window (the most frequent one), the last known where a
    side has no requests yet."""
    out = dict(known)
    for side, variant in (("canary", mode), ("champion", "champion")):
        seen = Counter(str(r.get("model_version") or "") for r in rows if r.get("variant") == variant)
        seen.pop("", None)
        if seen:
            out[side] = seen.most_common(1)[0][0]
    return out


def _record_look(looks: Any | None, deployed_at: float, look: int, result: dict[str, Any],
                 versions: dict[str, str]) -> None:
    """Write one look (its decision, requests per side and, for the sequential test, each metric's
    e-values with their thresholds); a failed write is logged and costs the analysis nothing."""
    if looks is None:
        return
    seq = result.get("sequential")
    metrics = {m: {"no_difference": {"e_value": r["e_value_no_difference"], "threshold": r["rollback_at"]},
                   "margin": {"e_value": r["e_value_margin"], "threshold": r["promote_at"]}}
               for m, r in (seq["metrics"] if seq else {}).items()}
    requests = seq["requests"] if seq else {v: result["figures"][v]["requests"] for v in ("canary", "champion")}
    try:
        looks.add(deployed_at=deployed_at, look=look, decision=result["decision"],
                  test="sequential" if seq else "fixed", requests=requests, metrics=metrics,
                  canary_version=versions.get("canary", ""), champion_version=versions.get("champion", ""))
    except Exception as e:  # noqa: BLE001 - the looks are for watching; the decision does not need them
        log.warning("canary look %d not recorded: %s", look, e)


def analyze_canary(cfg: RunConfig, deployed_at: float) -> dict[str, Any]:
    """Canary vs champion with the configured test (`deploy.canary.test`) -> decision, checks, figures,
    replayed_requests and test; the sequential test adds its record (`sequential`: per metric the
    estimate, e-value and thresholds, confidence sequences and sample sizes; looks, stopped_early)."""
    from tuneloop.feedback.store import FeedbackStore

    store = FeedbackStore(cfg.feedback_db)
    if cfg.deploy.canary.test == "fixed":
        result = _analyze_fixed(cfg, deployed_at, store)
    else:
        result = _analyze_sequential(cfg, deployed_at, store)
    log.info("canary analysis (%s): %s (%s)", result["test"], result["decision"].upper(),
             "; ".join(f"{c['check']}: {'ok' if c['passed'] else 'FAIL'}" for c in result["checks"]))
    return result


def promote(cfg: RunConfig, version: str) -> dict[str, Any]:
    reg = Registry(cfg)
    old = reg.alias_version("champion")
    if old is not None and str(old.version) != str(version):  # a retried promote: v2 is champion already
        reg.set_alias("previous", str(old.version))
    reg.set_alias("champion", version)
    reg.delete_alias(cfg.deploy.canary.mode)
    reg.delete_alias("challenger")
    reg.set_version_tag(version, "tuneloop.promoted_at", str(int(time.time())))
    state = _apply(cfg, "promote", version)
    previous = reg.alias_version("previous")
    return {"action": "promote", "version": version, "previous": str(previous.version) if previous else None,
            "gateway": state}


def rollback(cfg: RunConfig, version: str) -> dict[str, Any]:
    reg = Registry(cfg)
    reg.delete_alias(cfg.deploy.canary.mode)
    reg.delete_alias("challenger")
    reg.set_version_tag(version, "tuneloop.rolled_back", "true")
    champ = reg.alias_version("champion")
    state = _apply(cfg, "rollback", version, str(champ.version) if champ else None)
    return {"action": "rollback", "version": version, "gateway": state}
