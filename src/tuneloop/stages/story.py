"""The run's story in MLflow: the pipeline run's description rewritten after every stage, the exit
handler that closes a run which ended without a decision, and closing runs a killed process left open."""

from __future__ import annotations

import logging
import time
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.registry import NOTE, TAG_DATA_HASH, TAG_GIT_SHA, TAG_STAGE, Registry

log = logging.getLogger("tuneloop.stages")


# the story ---------------------------------------------------------------------------------------
STORY_SECTIONS = {"validate_data": "Data gate", "evaluate": "Evaluation gate", "analyze_canary": "Canary"}


def tell_story(reg: Registry, parent_id: str) -> str:
    """Write the pipeline run's description: outcome, stages (status, wall time, outcome), data gate,
    evaluation gate, canary decision with its tests, why a stage failed, the version and its aliases."""
    from tuneloop.evaluate.model_card import duration, run_story, when

    parent = reg.client.get_run(parent_id)
    tags = parent.data.tags
    stages, sections = [], []
    for r in reg.stage_runs(parent_id):
        name, t = r.data.tags.get(TAG_STAGE, r.info.run_name), r.data.tags
        wall = r.data.metrics.get("stage_wall_s")
        if wall is None and r.info.end_time:
            wall = (r.info.end_time - r.info.start_time) / 1000
        stages.append({"stage": name, "status": r.info.status, "wall_s": wall,
                       "outcome": t.get("tuneloop.outcome", "")})
        if r.info.status in ("FAILED", "KILLED"):
            sections.append((f"{name}: {r.info.status}", t.get(NOTE) or t.get("tuneloop.outcome", "")))
        elif name in STORY_SECTIONS and t.get(NOTE):
            sections.append((STORY_SECTIONS[name], t[NOTE]))
    outcome = tags.get("tuneloop.outcome") or ("running" if parent.info.status == "RUNNING" else parent.info.status)
    version = tags.get("tuneloop.model_version")
    footer = []
    if version:
        aliases = reg.aliases()
        mine = [a for a, v in aliases.items() if v == version]
        name = reg.name
        footer.append(f"**Model version**: {name} v{version} ({', '.join(mine) or 'no alias'}); all aliases: "
                      + (", ".join(f"{a}=v{v}" for a, v in aliases.items()) or "none")
                      + f". An MLflow model: `mlflow.pyfunc.load_model(\"models:/{name}/{version}\")`.")
    else:
        footer.append("**Model version**: none registered by this run.")
    end = (parent.info.end_time or time.time() * 1000) / 1000
    footer.append(f"Started {when(parent.info.start_time / 1000)}, "
                  + (f"ended {when(end)}" if parent.info.end_time else "still running")
                  + f", wall time {duration(end - parent.info.start_time / 1000)}; data hash "
                  f"`{tags.get(TAG_DATA_HASH, '-')[:12]}`, git `{tags.get(TAG_GIT_SHA, '-')[:12]}`, KFP run "
                  f"`{tags.get('tuneloop.kfp_run_id', '-')}`.")
    story = run_story(f"Pipeline run {parent.info.run_name}", outcome, stages, sections, footer)
    reg.set_tag(parent_id, NOTE, story)
    return story


# exit handler ---------------------------------------------------------------------------------
def finalize_stage(cfg: RunConfig, kfp_run_id: str, state: str, error: str = "") -> dict[str, Any]:
    """Runs last, whatever happened (the pipeline's exit handler). A run that ended without a decision
    (a task failed, the run was cancelled) must not leave anything behind: its canary (or shadow) is
    rolled back, stage runs still open are closed, and the parent run gets the outcome with the reason
    ("failed at sft: ..."; the failed stage's own error after KFP's message), in its tags and its
    description. A run that reached its decision is left as it is."""
    reg = Registry(cfg)
    parent = reg.pipeline_run_of_kfp(kfp_run_id)
    if parent is None:
        return {"outcome": f"{state}: no MLflow run was opened"}
    if parent.info.status != "RUNNING":
        return {"outcome": parent.data.tags.get("tuneloop.outcome", parent.info.status)}
    cancelled = state.upper() in ("CANCELED", "CANCELLED", "CANCELING")
    kfp_reason = (error or "").strip().splitlines()[0][:300] if (error or "").strip() else ""
    return _close_unfinished(cfg, reg, parent, "cancelled" if cancelled else "failed",
                             "KILLED" if cancelled else "FAILED", kfp_reason, state,
                             "KILLED: the task ended without closing its run")


def _close_unfinished(cfg: RunConfig, reg: Registry, parent: Any, verb: str, status: str, reason: str,
                      fallback: str, open_stage_outcome: str) -> dict[str, Any]:
    """Close a pipeline run that ended without a decision: open stage runs KILLED, its live canary rolled
    back, the parent `status` with the outcome "<verb> at <stage>: <reason>: <the stage's own error>"."""
    from tuneloop.deploy import canary

    pid = parent.info.run_id
    runs = reg.stage_runs(pid)
    # a repair attempt that failed was recorded by the ladder, which went on: it is not where the run failed
    failed = [r for r in runs if r.info.status in ("FAILED", "KILLED")
              and not r.data.tags.get(TAG_STAGE, r.info.run_name).startswith("repair/")]
    for r in runs:
        if r.info.status == "RUNNING":  # its task was killed before it could close it
            reg.close_run(r.info.run_id, "KILLED", open_stage_outcome)
            failed.append(r)
    failed_at = [r.data.tags.get(TAG_STAGE, r.info.run_name) for r in failed]
    rolled_back = []
    live = reg.aliases()
    for mv in reg.versions_of_pipeline_run(pid):
        version = str(mv.version)
        if live.get(cfg.deploy.canary.mode) == version:
            try:
                canary.rollback(cfg, version)  # aliases first, then serving follows
            except Exception as e:  # noqa: BLE001 - serving unreachable: the aliases moved, it follows on reload
                log.error("rolled back v%s in the registry; serving did not answer: %s", version, e)
            rolled_back.append(version)
    where = f" at {failed_at[0]}" if failed_at else ""
    detail = failed[0].data.tags.get("tuneloop.error", "") if failed else ""
    detail = detail.removeprefix(f"{failed_at[0]}: ") if failed_at else detail
    detail = "" if detail.startswith("abandoned:") else detail  # said by `reason` already
    if reason and detail and detail not in reason:
        reason = f"{reason}: {detail}"
    reason = (reason or detail or fallback)[:500]
    outcome = f"{verb}{where}: {reason}"
    if rolled_back:
        outcome += f"; canary v{', v'.join(rolled_back)} rolled back"
    if failed_at:
        reg.set_tag(pid, "tuneloop.failed_stage", failed_at[0])
    reg.set_tag(pid, "tuneloop.error", reason)
    reg.finish_pipeline_run(pid, outcome, status)
    tell_story(reg, pid)
    log.warning("pipeline %s", outcome)
    return {"outcome": outcome, "rolled_back": rolled_back}


def close_abandoned_runs(cfg: RunConfig, reg: Registry, keep_kfp_run: str = "", closed_by: str = "") -> list[str]:
    """Close the runs an earlier, killed process left RUNNING (the rule: Registry.abandoned_runs): stage
    runs KILLED with why, pipeline runs as the exit handler would have closed them (their live canary
    rolled back), KILLED with the outcome "abandoned at <stage>: ...". Returns the closed runs' names."""
    stage_runs, parents = reg.abandoned_runs(keep_kfp_run)
    by = f"; closed by run {closed_by}" if closed_by else ""
    names = []
    for r, why in stage_runs:
        reg.close_run(r.info.run_id, "KILLED", f"KILLED: abandoned - {why}{by}",
                      {"tuneloop.error": f"abandoned: {why}", NOTE: f"**abandoned**: {why}{by}. The run was open when "
                       "its process ended without closing it (killed, or its machine went away)."})
        names.append(r.info.run_name)
    for r, why in parents:
        _close_unfinished(cfg, reg, r, "abandoned", "KILLED", f"{why}{by}", why, f"KILLED: abandoned{by}")
        names.append(r.info.run_name)
    if names:
        log.warning("closed %d runs an earlier process left open: %s", len(names), ", ".join(names))
    return names
