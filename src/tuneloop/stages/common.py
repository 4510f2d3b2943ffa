"""What every stage shares: its own timed MLflow run with outcome and description, verdicts where a
runs table shows them, the materialised base model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.registry import NOTE, Registry
from tuneloop.stages.story import tell_story
from tuneloop.tracing import stage_span

log = logging.getLogger("tuneloop.stages")


class PrerequisiteError(RuntimeError):
    pass


def timed_stage(reg: Registry, parent_id: str, stage: str, fn: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage in its own run: wall time, outcome, and the description (the result's `description`,
    else its outcome); then the pipeline run's story is brought up to date."""
    started = time.perf_counter()
    with reg.stage_run(parent_id, stage) as run_id, stage_span(stage, run_id, parent_id):
        result = fn(run_id)
        wall = time.perf_counter() - started
        reg.log_metrics(run_id, {"stage_wall_s": wall})
        outcome = str(result.get("outcome", "done"))
        reg.set_tag(run_id, "tuneloop.outcome", outcome)
        reg.set_tag(run_id, NOTE, (result.pop("description", None) or f"**{stage}**: {outcome}")[:8000])
    result["wall_s"] = wall
    log.info("%s: %s (%.1fs)", stage, result.get("outcome", "done"), wall)
    tell_story(reg, parent_id)
    return result


def record_verdict(reg: Registry, run_ids: list[str], tags: dict[str, str], metrics: dict[str, float]) -> None:
    """A verdict where a runs table shows it: on the stage run and on the pipeline run."""
    for rid in run_ids:
        for k, v in tags.items():
            reg.set_tag(rid, k, v)
        reg.log_metrics(rid, metrics)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def base_model_dir(cfg: RunConfig) -> Path:
    from tuneloop.models import materialize_base_model

    return materialize_base_model(cfg.base_model, cfg.state_path)
