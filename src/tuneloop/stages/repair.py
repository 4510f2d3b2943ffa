"""Forgetting repaired: the merge stage (the candidate merged with the champion's adapter, or passed through)
and the repair stage (a candidate blocked only for forgetting old slices goes through the repair ladder,
tuneloop.repair: each attempt a real ingest/train/evaluate under its own stage-run names)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tuneloop.config import PREFERENCE_SLICE, SAFETY_SLICE, RunConfig
from tuneloop.registry import TAG_TRAINED_SLICES, Registry
from tuneloop.stages.common import base_model_dir, record_verdict, timed_stage
from tuneloop.stages.data import ingest_stage
from tuneloop.stages.evaluate import evaluate_stage
from tuneloop.stages.train import dpo_stage, sft_stage


def merge_stage(cfg: RunConfig, parent_id: str, dataset: Path, candidate: Path, out: Path,
                name: str = "merge") -> dict[str, Any]:
    """train.merge.enabled and a champion: out/adapter = the candidate merged with the champion's adapter (method
    and weights chosen on a tuning split, never the evaluation set: train/merge.py); else the candidate as is."""
    from tuneloop.data.replay import champion_training_data
    from tuneloop.train.merge import merge_with_champion

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        champ = reg.alias_version("champion") if cfg.train.merge.enabled else None
        if champ is None:
            shutil.copytree(candidate / "adapter", out / "adapter", dirs_exist_ok=True)
            why = "train.merge.enabled is false" if not cfg.train.merge.enabled else "no champion to merge with"
            return {"params": {}, "outcome": f"skipped ({why}); adapter passed through"}
        champ_adapter = reg.download_adapter(champ, cfg.state_path / "serving")
        champ_data = champion_training_data(reg, cfg.state_path / "champion-data")
        sel = merge_with_champion(base_model_dir(cfg), candidate / "adapter", champ_adapter,
                                  [dataset / "sft.jsonl", *([champ_data.sft] if champ_data else [])],
                                  dataset / "eval.jsonl", cfg.train.merge, out)
        params = {"merge.method": sel.best.method, "merge.weights": json.dumps(list(sel.best.weights)),
                  "merge.tuning_records": sel.tuning_records, "merge.champion_version": str(champ.version)}
        reg.log_params(run_id, params)
        reg.log_metrics(run_id, {"merge.tuning_regret": sel.best.regret, "merge.tuning_mean_nll": sel.best.mean_nll})
        proof = out / "record"  # the choice and the tuning split's disjointness proof
        proof.mkdir(exist_ok=True)
        for f in ("selection.json", "tuning_report.json"):
            shutil.copy(out / f, proof / f)
        reg.log_artifacts(run_id, proof, "merge")
        return {"params": params, "outcome": f"merged with champion v{champ.version}: {sel.best.name} (worst "
                                             f"tuning-slice regret {sel.best.regret:+.4f})"}

    return timed_stage(reg, parent_id, name, run)


def repair_stage(cfg: RunConfig, parent_id: str, dataset: Path, candidate: Path, evaluation: Path,
                 out: Path, evaluation_out: Path | None = None, dataset_out: Path | None = None) -> dict[str, Any]:
    """A candidate blocked only for forgetting old slices goes through the repair ladder (tuneloop.repair).
    out/adapter, evaluation_out (default out/evaluation) and dataset_out (default out/dataset) are what register
    takes: the first candidate's when it passed, the winner's when an attempt passed.
    out/record/ladder.{json,md} (artifact repair/) lists every attempt."""
    from tuneloop.repair import old_slices, pipeline_attempt, repair

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        gate = json.loads((evaluation / "gate.json").read_text())
        metrics = json.loads((evaluation / "metrics.json").read_text())
        report = json.loads((dataset / "report.json").read_text())
        champ = reg.alias_version("champion")
        known = {s for s in (champ.tags.get(TAG_TRAINED_SLICES, "") if champ else "").split(",") if s}
        known |= set(metrics["champion"]) - {"all", SAFETY_SLICE, PREFERENCE_SLICE}
        counts = report["by_kind"]["sft"]["per_slice"]
        # an audit slice (rated production requests of slice X) is old exactly when X is
        counts = {**counts, **{a: counts.get(x, 0) for a, x in cfg.evaluate.audit_slices().items()}}
        old = old_slices(known, counts, cfg.train.repair.old_slice_max_share)
        attempt = pipeline_attempt(
            cfg, dataset, candidate, cfg.state_path / "repair" / parent_id,  # not in the task's output artifact
            ingest=lambda c, o, label: ingest_stage(c, parent_id, o, name=label),
            sft=lambda c, d, o, label: sft_stage(c, parent_id, d, o, name=label),
            align=lambda c, d, s, o, label: dpo_stage(c, parent_id, d, s, o, name=label),
            merge=lambda c, d, cand, o, label: merge_stage(c, parent_id, d, cand, o, name=label),
            evaluate=lambda c, d, cand, o, label: evaluate_stage(c, parent_id, d, cand, o, name=label))
        ladder = repair(cfg, gate, attempt, old_slices=old, has_champion=champ is not None)
        record = out / "record"
        record.mkdir(parents=True, exist_ok=True)
        (record / "ladder.json").write_text(json.dumps(ladder.as_dict(), indent=2, default=str))
        (record / "ladder.md").write_text(ladder.markdown())
        reg.log_artifacts(run_id, record, "repair")
        win = ladder.winner
        src = (candidate / "adapter", evaluation, dataset)
        if win is not None:
            src = (Path(win.candidate), Path(win.evaluation), Path(win.params.get("dataset", dataset)))
            (src[1] / "repair_tags.json").write_text(json.dumps(ladder.lineage_tags()))
            (src[1] / "ladder.md").write_text(ladder.markdown())
        dest = (out / "adapter", evaluation_out or out / "evaluation", dataset_out or out / "dataset")
        for s, d in zip(src, dest, strict=True):
            shutil.copytree(s, d, dirs_exist_ok=True)
        passed = bool(gate["passed"] or win is not None)
        reg.log_metrics(run_id, {"repair_attempts": len(ladder.attempts), "repair_passed": float(win is not None)})
        record_verdict(reg, [run_id, parent_id], {"tuneloop.gate": "passed" if passed else "blocked",
                                            **ladder.lineage_tags()}, {"gate_passed": float(passed)})
        return {"passed": passed, "ladder": ladder.as_dict(), "description": ladder.markdown(),
                "outcome": "not needed: the gate passed" if gate["passed"] else ladder.summary()}

    return timed_stage(reg, parent_id, "repair", run)

