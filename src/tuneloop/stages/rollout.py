"""Stages 8-10: the canary deployed and analysed, then promoted or rolled back; the stop branch."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.registry import Registry
from tuneloop.stages.common import timed_stage, record_verdict
from tuneloop.stages.story import tell_story

log = logging.getLogger("tuneloop.stages")


# 8, 9, 10 ------------------------------------------------------------------------------------
def deploy_canary_stage(cfg: RunConfig, parent_id: str, version: str) -> dict[str, Any]:
    from tuneloop.deploy.canary import deploy_canary

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        r = deploy_canary(cfg, version)
        reg.log_params(run_id, {"version": version, "traffic_percent": r["traffic_percent"]})
        return {**r, "outcome": f"v{version} @canary, {r['traffic_percent']}% of users"}

    return timed_stage(reg, parent_id, "deploy_canary", run)


def analyze_canary_stage(cfg: RunConfig, parent_id: str, version: str, deployed_at: float,
                         out: Path) -> dict[str, Any]:
    from tuneloop.deploy.canary import analyze_canary
    from tuneloop.evaluate.model_card import canary_markdown, canary_tests

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        r = analyze_canary(cfg, deployed_at)
        out.mkdir(parents=True, exist_ok=True)
        (out / "canary.json").write_text(json.dumps(r, indent=2))
        for side, f in r["figures"].items():
            reg.log_metrics(run_id, {f"{side}.{k}": v for k, v in f.items() if isinstance(v, (int, float))})
        reg.log_artifacts(run_id, out, "canary")
        tests = canary_tests(r, cfg.deploy.canary)
        metrics = {"canary_healthy": float(r["decision"] == "promote"), "canary.alpha": cfg.deploy.canary.alpha}
        for t in tests:
            metrics[f"canary.{t['check']}.passed"] = float(t["passed"])
            metrics.update({f"canary.{t['check']}.{k}": t[k] for k in ("p_value", "statistic") if t[k] is not None})
        seq = r.get("sequential")
        if seq:  # the sequential test's boundary and sample size at the decision
            n = seq["requests"]
            metrics.update({"canary.looks": seq.get("looks", 1), "canary.n_canary": n["canary"],
                            "canary.n_champion": n["champion"],
                            "canary.stopped_early": float(seq.get("stopped_early", 0))})
            for m, rec in seq.get("metrics", {}).items():
                metrics.update({f"canary.{m}.{k}": rec[k] for k in ("e_value_no_difference", "e_value_margin",
                                                                   "rollback_at", "promote_at")
                                if isinstance(rec.get(k), (int, float))})
        record_verdict(reg, [run_id, parent_id], {"tuneloop.canary_decision": r["decision"],
                                            "tuneloop.canary_tests": _tests_line(tests)}, metrics)
        md = canary_markdown(r, cfg.deploy.canary)
        return {**r, "markdown": md, "outcome": r["decision"], "description": md}

    return timed_stage(reg, parent_id, "analyze_canary", run)


def _tests_line(tests: list[dict[str, Any]]) -> str:
    """error_rate: Fisher's exact test (one-sided) p=1 pass; feedback: Welch's t-test (one-sided) p=0.115 pass"""
    from tuneloop.evaluate.model_card import num

    return "; ".join(f"{t['check']}: {t['test']}" + (f" p={num(t['p_value'])}" if t["p_value"] is not None else "")
                     + (f" statistic {num(t['statistic'])}" if t["statistic"] is not None else "")
                     + (" pass" if t["passed"] else " FAIL") for t in tests)


def _end_rollout(cfg: RunConfig, parent_id: str, version: str, action: str) -> dict[str, Any]:
    """promote or rollback (deploy/canary.py), then close the pipeline's parent run."""
    from tuneloop.deploy import canary
    from tuneloop.evaluate.model_card import when

    reg = Registry(cfg)
    outcome = f"promoted v{version}" if action == "promote" else f"rolled back v{version}"

    def run(run_id: str) -> dict[str, Any]:
        r = getattr(canary, action)(cfg, version)
        if action == "promote":
            at = float(reg.version_tags(version).get("tuneloop.promoted_at") or time.time())
            reg.set_version_tag(version, "tuneloop.promoted_at_utc", when(at))
        else:
            reg.set_version_tag(version, "tuneloop.rolled_back_at_utc", when(time.time()))
        aliases = ", ".join(f"{a}=v{v}" for a, v in reg.aliases().items()) or "none"
        verdict = "promoted" if action == "promote" else "rolled_back"
        reg.set_tag(parent_id, "tuneloop.canary", verdict)
        reg.log_metrics(parent_id, {"canary_promoted": float(action == "promote")})
        return {**r, "outcome": outcome,
                "description": f"**{outcome}** on the canary analysis; aliases now {aliases}"
                               + ("; serving sends everyone to it." if action == "promote" else
                                  f"; v{version} is out of serving and tagged `tuneloop.rolled_back`.")}

    r = timed_stage(reg, parent_id, action, run)
    reg.finish_pipeline_run(parent_id, outcome)
    tell_story(reg, parent_id)
    return r


def promote_stage(cfg: RunConfig, parent_id: str, version: str) -> dict[str, Any]:
    return _end_rollout(cfg, parent_id, version, "promote")


def rollback_stage(cfg: RunConfig, parent_id: str, version: str) -> dict[str, Any]:
    return _end_rollout(cfg, parent_id, version, "rollback")


def stop_stage(cfg: RunConfig, parent_id: str, reason: str) -> dict[str, Any]:
    """The branch taken when a gate says no: close the parent run with the reason."""
    reg = Registry(cfg)
    reg.finish_pipeline_run(parent_id, reason)
    tell_story(reg, parent_id)
    log.info("pipeline stopped: %s", reason)
    return {"outcome": reason}
