"""Canary rollout on the local gateway: deploy, analyse, promote or roll back.

deploy_canary    alias `canary` -> the new version (with its traffic share), gateway reloads
analyze_canary   over the window, compare canary with champion on error rate (Fisher's exact
                 test), p95 latency (ratio) and feedback score (Welch's t-test); locally the
                 window is filled by replaying a traffic file whose references stand in for users
promote          previous <- champion, champion <- canary, canary removed, gateway reloads
rollback         canary removed (the version is tagged rolled_back), gateway reloads
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

import httpx

from tuneloop.config import RunConfig
from tuneloop.evaluate.metrics import normalize_answer
from tuneloop.evaluate.stats import fisher_greater, p95, welch_less
from tuneloop.feedback.auth import client_headers
from tuneloop.jsonl import read_jsonl
from tuneloop.registry import TAG_CANARY_PERCENT, Registry

log = logging.getLogger("tuneloop.canary")


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


def replay_traffic(cfg: RunConfig, since: float) -> int:
    """Send the traffic file through the gateway as distinct users; a reference stands in for the
    user's judgement (score 1 if the answer matches it, else 0 and the reference as correction)."""
    c = cfg.deploy.canary
    assert c.traffic_file is not None
    rows = read_jsonl(c.traffic_file)
    sent = 0
    with httpx.Client(base_url=cfg.deploy.gateway_url, timeout=120, headers=client_headers(cfg.state_path)) as http:
        for i in range(c.requests):
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


def compare(rows: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Canary vs champion over the window's requests -> decision with its figures."""
    c = cfg.deploy.canary
    mode = c.mode
    side = {"champion": [r for r in rows if r["variant"] == "champion"],
            "canary": [r for r in rows if r["variant"] == mode]}  # the new version, canary or shadow
    fig: dict[str, dict[str, Any]] = {}
    for v, rs in side.items():
        scores = [r["score"] for r in rs if r["score"] is not None]
        fig[v] = {"requests": len(rs), "errors": sum(r["status"] != "ok" for r in rs),
                  "error_rate": sum(r["status"] != "ok" for r in rs) / max(len(rs), 1),
                  "p95_latency_ms": p95([r["latency_ms"] for r in rs if r["status"] == "ok"]) or 0.0,
                  "feedback_n": len(scores), "feedback_mean": sum(scores) / len(scores) if scores else None,
                  "_scores": scores}
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


def analyze_canary(cfg: RunConfig, deployed_at: float) -> dict[str, Any]:
    from tuneloop.feedback.store import FeedbackStore

    if cfg.deploy.backend == "local":
        sent = replay_traffic(cfg, deployed_at)
    else:  # live traffic, logged by KServe into the feedback service: wait for the window to fill
        time.sleep(max(0.0, deployed_at + cfg.deploy.canary.window_minutes * 60 - time.time()))
        sent = 0
    rows = FeedbackStore(cfg.feedback_db).requests(since=deployed_at)
    result = compare(rows, cfg)
    result["replayed_requests"] = sent
    log.info("canary analysis: %s (%s)", result["decision"].upper(),
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
