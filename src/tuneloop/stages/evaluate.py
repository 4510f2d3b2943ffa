"""Stages 6-7: the evaluation gate against the champion, and registering the candidate as an MLflow model."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from tuneloop.config import PREFERENCE_SLICE, SAFETY_SLICE, RunConfig
from tuneloop.data.validate import FEEDBACK_SLICE  # a constant; the module imports pandas, GX lazily
from tuneloop.registry import (TAG_BASE_MODEL, TAG_BASE_PATH, TAG_DATA_HASH, TAG_GIT_SHA, TAG_PIPELINE_RUN,
                               TAG_TRAINED_SLICES, Registry, git_sha)
from tuneloop.stages.common import base_model_dir, record_verdict, timed_stage

log = logging.getLogger("tuneloop.stages")


# 6 -------------------------------------------------------------------------------------------
def evaluate_stage(cfg: RunConfig, parent_id: str, dataset: Path, candidate: Path, out: Path,
                   name: str | None = None) -> dict[str, Any]:
    """The gate against the champion; a blocked candidate gets its diagnosis (evaluation/diagnosis.md, also
    appended to report.md, the task's Markdown output). `name`: a repair attempt's stage run name."""
    from tuneloop.evaluate.model_card import gate_markdown, huge_base_perplexity
    from tuneloop.evaluate.run import evaluate_models

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        champ = reg.alias_version("champion")
        champ_adapter = reg.download_adapter(champ, cfg.state_path / "serving") if champ else None
        ref_name = f"champion v{champ.version}" if champ else "base model"
        trained = [s for s in champ.tags.get(TAG_TRAINED_SLICES, "").split(",") if s] if champ else []
        result = evaluate_models(cfg.evaluate, base_model_dir(cfg), dataset / "eval.jsonl", candidate / "adapter",
                                 champ_adapter, ref_name, out, cfg.data.system_prompt,
                                 dataset / "eval_preference.jsonl", trained)
        for who in ("candidate", "champion", "base"):
            for sl, m in result["metrics"].get(who, {}).items():
                reg.log_metrics(run_id, {f"{who}.{sl}.{k}": v for k, v in m.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if not result["gate"]["passed"]:
            _diagnose_blocked(cfg, reg, parent_id, dataset, candidate / "adapter", out)
        reg.log_artifacts(run_id, out, "evaluation")
        g = result["gate"]
        confusion = [m["confusion"] for sl, m in sorted(result["metrics"]["candidate"].items())
                     if "confusion" in m and sl != "all"]
        gated = {(r["slice"], r["metric"]) for r in g["rules"]}
        headline = {who: {f"{sl}.{m}": float(v) for sl, ms in result["metrics"][who].items()
                          for m, v in ms.items() if (sl, m) in gated and isinstance(v, (int, float))}
                    for who in ("candidate", "champion")}
        failed = [r for r in g["rules"] if not r["passed"]]
        record_verdict(reg, [run_id, parent_id], {"tuneloop.gate": "passed" if g["passed"] else "blocked"},
                 {"gate_passed": float(g["passed"]), "gate_rules_failed": len(failed)})
        slices = sorted(k for k in result["metrics"]["candidate"] if k not in ("all", SAFETY_SLICE, PREFERENCE_SLICE))
        notes = huge_base_perplexity(result["metrics"], slices)
        return {"passed": g["passed"], "gate": g, "confusion": confusion, "metrics": result["metrics"],
                "headline": headline, "description": gate_markdown(g) + "".join(f"\n- {n}" for n in notes),
                "outcome": "gate PASSED" if g["passed"] else
                f"gate FAILED: {', '.join(r['slice'] + '/' + r['metric'] for r in g['rules'] if not r['passed'])}"}

    return timed_stage(reg, parent_id, name or "evaluate", run)


def _diagnose_blocked(cfg: RunConfig, reg: Registry, parent_id: str, dataset: Path, adapter: Path,
                      out: Path) -> None:
    """diagnosis.{md,json} next to gate.json, appended to report.md (evaluate/diagnosis.py); never fails the
    stage: a diagnosis that cannot be made says so in the log."""
    from tuneloop.data.replay import champion_training_data
    from tuneloop.evaluate.diagnosis import diagnose, write_blocked_report

    try:
        champ_data = champion_training_data(reg, cfg.state_path / "champion-data")
        drift = None
        validated = [r for r in reg.stage_runs(parent_id, "validate_data") if r.info.status == "FINISHED"]
        if validated:
            try:
                drift = reg.download_run_artifact(validated[-1].info.run_id, "validation/drift/drift.json",
                                                  out.parent / f".{out.name}-drift")
            except Exception:  # noqa: BLE001 - the diagnosis stands without the drift report
                drift = None
        d = diagnose(out, dataset, champ_data.sft if champ_data else None, drift, cfg.evaluate,
                     base_dir=base_model_dir(cfg), candidate=adapter, system_prompt=cfg.data.system_prompt)
        write_blocked_report(d, out)
    except Exception as e:  # noqa: BLE001 - the gate's verdict stands; the diagnosis is an aid
        log.warning("no diagnosis of the blocked candidate: %s: %s", type(e).__name__, e)


# 7 -------------------------------------------------------------------------------------------
def register_stage(cfg: RunConfig, parent_id: str, candidate: Path, evaluation: Path,
                   dataset: Path) -> dict[str, Any]:
    from tuneloop.deploy.mlflow_model import build_model_dir
    from tuneloop.evaluate.calibration import REFERENCE_FILE, REFERENCE_TAG, reference_summary, write_reference
    from tuneloop.evaluate.model_card import quality_markdown
    from tuneloop.evaluate.model_card import model_card

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        gate = json.loads((evaluation / "gate.json").read_text())
        if not gate["passed"]:
            raise RuntimeError("register: the evaluation gate did not pass; refusing to register")
        report = json.loads((dataset / "report.json").read_text())
        data_hash = report["data_hash"]
        # skills this version learned (the catch-all feedback slice has no eval set of its own)
        kinds = report["by_kind"]
        trained = sorted((set(kinds["sft"]["per_slice"]) | set(kinds["preference"]["per_slice"])) - {FEEDBACK_SLICE})
        tags = {TAG_PIPELINE_RUN: parent_id, TAG_DATA_HASH: data_hash, TAG_GIT_SHA: git_sha(),
                TAG_TRAINED_SLICES: ",".join(trained),
                TAG_BASE_MODEL: cfg.base_model.name, TAG_BASE_PATH: str(base_model_dir(cfg)),
                "tuneloop.loop": cfg.name}
        repaired = evaluation / "repair_tags.json"  # a candidate the repair ladder produced: its mitigation
        if repaired.exists():
            tags.update(json.loads(repaired.read_text()))
        tags["tuneloop.config_sha256"] = hashlib.sha256(
            json.dumps(cfg.to_pipeline_param(), sort_keys=True).encode()).hexdigest()
        base = base_model_dir(cfg)
        model_dir = build_model_dir(candidate / "adapter", base, Path(tempfile.mkdtemp()) / "model",
                                    cfg.base_model.name, cfg.data.system_prompt)
        mv = reg.register(run_id, model_dir, tags)
        version = str(mv.version)
        # the calibration reference of label-free quality estimation (tuneloop monitor), stored with the version
        qdir = Path(tempfile.mkdtemp())
        quality = write_reference(evaluation / "predictions.jsonl", cfg.evaluate, qdir / REFERENCE_FILE,
                                  version=version)
        if quality:
            reg.log_artifacts(run_id, qdir, "quality")
            reg.set_version_tag(version, REFERENCE_TAG, f"runs:/{run_id}/quality/{REFERENCE_FILE}")
        reg.log_artifacts(run_id, evaluation, "evaluation")
        card = model_card(cfg, version, tags, report, json.loads((evaluation / "metrics.json").read_text()), gate)
        if quality:
            card += "\n\n" + quality_markdown(reference_summary(quality))
        if (evaluation / "ladder.md").exists():
            card += "\n\n" + (evaluation / "ladder.md").read_text()
        card_dir = Path(tempfile.mkdtemp())
        (card_dir / "model_card.md").write_text(card)
        (card_dir / "run_config.json").write_text(json.dumps(cfg.to_pipeline_param(), indent=2))
        reg.log_artifacts(run_id, card_dir, "model_card")
        reg.set_version_description(version, card)
        name = cfg.registry.model_name
        reg.set_tag(parent_id, "tuneloop.model_version", version)
        reg.set_tag(parent_id, "tuneloop.model_uri", f"models:/{name}/{version}")
        bundled = (model_dir / "artifacts").exists()
        return {"version": version, "model_card": card, "outcome": f"{name} v{version} @challenger",
                "description": f"**{name} v{version} @challenger**: registered as an MLflow model, the logged model "
                               f"`{str(mv.source).removeprefix('models:/')}` of the pipeline run; "
                               f"`mlflow.pyfunc.load_model(\"models:/{name}/{version}\")` answers a prompt. Base model "
                               f"`{cfg.base_model.name}` "
                               + ("bundled in the model (small)" if bundled else f"read from `{base}` (by path)")
                               + f"; data hash `{data_hash[:12]}`, trained slices {', '.join(trained) or '-'}; the "
                                 "model card is the version's description and `model_card/model_card.md`."}

    return timed_stage(reg, parent_id, "register", run)
