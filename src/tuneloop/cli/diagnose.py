"""`tuneloop diagnose RUN_ID`: the diagnosis of a finished pipeline run, from the MLflow store."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneloop.cli.shared import ConfigArg, StateDir, TrackingUri, app, fail_line, load


def _fetch(reg: Any, run_id: str, artifact: str, dst: Path) -> Path | None:
    """One artifact (file or folder) of a run, or None when the run has no such artifact."""
    try:
        return reg.download_run_artifact(run_id, artifact, dst)
    except Exception:  # noqa: BLE001 - MLflow raises different types per store for "not there"
        return None


def _finished(reg: Any, parent: str, stage: str) -> Any | None:
    runs = [r for r in reg.stage_runs(parent, stage) if r.info.status == "FINISHED"]
    return runs[-1] if runs else None


def _pipeline_run_id(reg: Any, run_id: str) -> str | None:
    """RUN_ID as given (an MLflow run id of the pipeline run), or the pipeline run with that name."""
    try:
        reg.stage_runs(run_id)
        return run_id
    except Exception:  # noqa: BLE001 - not a run id: try it as a run name
        found = reg.pipeline_run(run_id)
        return found.info.run_id if found is not None else None


def _champion_data(reg: Any, reference: str, dst: Path) -> Path | None:
    """The training data of the version the candidate was gated against ("champion vN"), if recorded."""
    from tuneloop.registry import TAG_PIPELINE_RUN

    if not reference.startswith("champion v"):
        return None
    try:
        tags = reg.version_tags(reference.removeprefix("champion v").split()[0])
    except Exception:  # noqa: BLE001 - a deleted version: no comparison
        return None
    parent = tags.get(TAG_PIPELINE_RUN)
    ingest = _finished(reg, parent, "ingest") if parent else None
    return _fetch(reg, ingest.info.run_id, "dataset/sft.jsonl", dst) if ingest else None


@app.command()
def diagnose(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The pipeline run: its MLflow run id (the parent "
                                                                 "run) or its run name.")],
    config: ConfigArg = None,
    state_dir: StateDir = None,
    tracking_uri: TrackingUri = None,
    out: Annotated[Path | None, typer.Option(help="Also write diagnosis.md and diagnosis.json into this folder.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON instead of Markdown.")] = False,
    recompute: Annotated[bool, typer.Option("--recompute", help="Compute the diagnosis from the run's artifacts "
                                                                "even when the run stored one.")] = False,
    candidate: Annotated[Path | None, typer.Option(
        help="The blocked candidate's adapter folder: enables token attributions of flipped answers (the store "
             "keeps no adapter of a candidate that was not registered).")] = None,
    attribution_seconds: Annotated[float, typer.Option(help="Time budget of the token attributions, in seconds.")]
    = 60.0,
) -> None:
    """Print the diagnosis of a finished run's evaluation: what regressed with its interval, the records that
    flipped from right to wrong, this run's training data against the champion's, drift, and the likely
    causes, ranked. A diagnosis the run stored is printed as it is; otherwise it is computed from the
    evaluate, ingest and validate_data artifacts. Exits 1 when the run or its evaluation is not found."""
    from tuneloop.evaluate.diagnosis import diagnose as make_diagnosis
    from tuneloop.evaluate.diagnosis import to_markdown, write_diagnosis
    from tuneloop.registry import Registry

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the output is the diagnosis alone
    cfg = load(config, state_dir, tracking_uri)
    reg = Registry(cfg)
    parent = _pipeline_run_id(reg, run_id)
    if parent is None:
        fail_line(f"{run_id}: no pipeline run with this id or name in {cfg.tracking_uri}")
    evaluation_run = _finished(reg, parent, "evaluate")
    if evaluation_run is None:
        fail_line(f"pipeline run {parent} has no finished evaluate stage: nothing to diagnose")
    work = Path(tempfile.mkdtemp(prefix="tuneloop-diagnose-"))
    erid = evaluation_run.info.run_id
    stored = None if recompute else _fetch(reg, erid, f"evaluation/diagnosis.{'json' if as_json else 'md'}", work)
    repair_run = _finished(reg, parent, "repair")  # the repair ladder's stage run, when it ran
    ladder = _fetch(reg, repair_run.info.run_id, "repair/ladder.json", work) if repair_run else None
    if stored is not None:
        text = stored.read_text()
        if ladder is not None and "## Repair ladder" not in text and not as_json:
            md = ladder.with_suffix(".md")
            if _fetch(reg, repair_run.info.run_id, "repair/ladder.md", work) is not None and md.exists():
                text = text.rstrip("\n") + "\n\n" + md.read_text()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / stored.name).write_text(text)
        typer.echo(text)
        return
    evaluation = _fetch(reg, erid, "evaluation", work)
    if evaluation is None or not (evaluation / "gate.json").exists():
        fail_line(f"evaluate run {erid} of pipeline run {parent} has no evaluation/gate.json artifact")
    ingest = _finished(reg, parent, "ingest")
    dataset = work / "dataset"  # artifacts keep their path: work/dataset/sft.jsonl
    if ingest is not None:
        for name in ("sft.jsonl", "report.json"):
            _fetch(reg, ingest.info.run_id, f"dataset/{name}", work)
    validation = _finished(reg, parent, "validate_data")
    drift = _fetch(reg, validation.info.run_id, "validation/drift/drift.json", work) if validation else None
    gate = json.loads((evaluation / "gate.json").read_text())
    champion = _champion_data(reg, str(gate.get("reference", "")), work / "champion")
    base = None
    if candidate is not None:
        from tuneloop.models import materialize_base_model

        base = materialize_base_model(cfg.base_model, cfg.state_path)
    d = make_diagnosis(evaluation, dataset if dataset.exists() else None, champion, drift, cfg.evaluate,
                       base_dir=base, candidate=candidate, system_prompt=cfg.data.system_prompt,
                       attributions=3 if candidate is not None else 0, attribution_seconds=attribution_seconds,
                       repair=json.loads(ladder.read_text()) if ladder is not None else None)
    if candidate is None:
        d["attributions"]["note"] = "token attributions need the candidate's adapter: pass --candidate DIR"
    if out is not None:
        write_diagnosis(d, out)
    typer.echo(json.dumps(d, indent=2, default=str) if as_json else to_markdown(d))
