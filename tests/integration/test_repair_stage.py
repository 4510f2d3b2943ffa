"""The repair ladder end to end through the pipeline's own stage functions - what the KFP tasks call - with
MLflow (sqlite) as registry: run 1 trains the champion on routing tickets and registers it; run 2 trains only
on free-text QA, its evaluation blocks it for forgetting routing, and the repair stage's ladder makes real
attempts (merge with the champion's adapter, then replay of the champion's training data found through the
registry), each its own MLflow stage runs and gated like the first; the winner is registered with the
mitigation in its lineage and model card. Same tiny model and settings as test_forgetting.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config
from test_forgetting import GATES, HP, LORA

pytestmark = [pytest.mark.integration, pytest.mark.forgetting]


def _cfg(tmp: Path, model: Path, state: str, sources: list[dict], **over):  # noqa: ANN003, ANN202
    from tuneloop.config import load_config

    over = {"evaluate": GATES, **over}
    return load_config(tiny_config(
        tmp, model, state_dir=state, data__sources=sources, data__use_feedback=False, train__lora=LORA,
        train__sft=dict(HP), train__dpo={"enabled": False}, train__nproc_per_node=1, train__deepspeed="none",
        train__seed=1, **over))


def test_a_blocked_candidate_is_repaired_by_the_pipelines_repair_stage(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneloop.registry import Registry
    from tuneloop.repair import TAG_REPAIR
    from tuneloop.stages import evaluate_stage, ingest_stage, merge_stage, register_stage, repair_stage, sft_stage

    state = str(tmp_path / "state")
    # run 1: the champion knows routing (gated on routing alone: nothing older to forget yet)
    cfg1 = _cfg(tmp_path / "r1", tiny_model_dir, state, [{"path": "data/tickets.jsonl"}],
                evaluate={**GATES, "gates": [GATES["gates"][1]]})
    reg = Registry(cfg1)
    p1 = reg.start_pipeline_run("run-1", "kfp-1", {})
    r1 = tmp_path / "run1"
    ingest_stage(cfg1, p1, r1 / "ds")
    sft_stage(cfg1, p1, r1 / "ds", r1 / "sft")
    ev1 = evaluate_stage(cfg1, p1, r1 / "ds", r1 / "sft", r1 / "eval")
    assert ev1["passed"], ev1["outcome"]
    v1 = register_stage(cfg1, p1, r1 / "sft", r1 / "eval", r1 / "ds")["version"]
    reg.set_alias("champion", v1)

    # run 2: only QA records; the champion's routing is forgotten
    repair = {"mitigations": ["merge", "replay"], "max_attempts": 2, "max_wall_minutes": 15, "replay_share": 0.5}
    merge = {"methods": ["linear", "ties"], "weights": [[1.0, 1.0], [0.5, 0.5], [0.3, 0.7]]}
    cfg2 = _cfg(tmp_path / "r2", tiny_model_dir, state, [{"path": "data/general.jsonl"}],
                train__repair=repair, train__merge=merge)
    p2 = reg.start_pipeline_run("run-2", "kfp-2", {})
    r2 = tmp_path / "run2"
    ingest_stage(cfg2, p2, r2 / "ds")
    sft_stage(cfg2, p2, r2 / "ds", r2 / "sft")
    merged = merge_stage(cfg2, p2, r2 / "ds", r2 / "sft", r2 / "merge")
    assert merged["outcome"].startswith("skipped (train.merge.enabled is false)")
    ev2 = evaluate_stage(cfg2, p2, r2 / "ds", r2 / "merge", r2 / "eval")
    assert not ev2["passed"]
    assert [r["slice"] for r in ev2["gate"]["rules"] if not r["passed"]] == ["ticket_routing"]
    assert (r2 / "eval" / "diagnosis.md").exists()

    res = repair_stage(cfg2, p2, r2 / "ds", r2 / "merge", r2 / "eval", r2 / "repair")
    ladder = res["ladder"]
    md = (r2 / "repair" / "record" / "ladder.md").read_text()
    print("\n" + md)
    assert ladder["ran"] and ladder["old_slices"] == ["ticket_routing"]
    attempts = ladder["attempts"]
    assert [a["mitigation"] for a in attempts][:1] == ["merge"] and len(attempts) <= 2
    assert res["passed"], md
    win = next(a for a in attempts if a["passed"])
    names = {r.data.tags.get("tuneloop.stage") for r in reg.stage_runs(p2)}
    assert {"repair/1-merge/merge", "repair/1-merge/evaluate", "repair"} <= names
    gate = json.loads((r2 / "repair" / "evaluation" / "gate.json").read_text())
    assert gate["passed"] and (r2 / "repair" / "adapter" / "adapter_config.json").exists()

    # the repaired candidate is registered with the mitigation in its lineage and card
    v2 = register_stage(cfg2, p2, r2 / "repair", r2 / "repair" / "evaluation", r2 / "repair" / "dataset")["version"]
    mv = reg.client.get_model_version(cfg2.registry.model_name, v2)
    assert mv.tags[TAG_REPAIR] == win["mitigation"]
    assert "Forgetting repair ladder" in mv.description and win["mitigation"] in mv.description
    parent = reg.client.get_run(p2).data.tags
    assert parent["tuneloop.gate"] == "passed" and parent[TAG_REPAIR] == win["mitigation"]

    # then a retraining rung through the same stage functions: replay ingests again (the champion's training data
    # found through the registry) and trains under its own stage-run names
    cfg3 = cfg2.model_copy(update={"train": cfg2.train.model_copy(update={
        "repair": cfg2.train.repair.model_copy(update={"mitigations": ["replay"]})})})
    res3 = repair_stage(cfg3, p2, r2 / "ds", r2 / "merge", r2 / "eval", r2 / "repair-replay")
    [replayed] = res3["ladder"]["attempts"]
    print((r2 / "repair-replay" / "record" / "ladder.md").read_text())
    names = {r.data.tags.get("tuneloop.stage") for r in reg.stage_runs(p2)}
    assert {"repair/1-replay/ingest", "repair/1-replay/sft", "repair/1-replay/evaluate"} <= names
    report = json.loads((Path(replayed["params"]["dataset"]) / "report.json").read_text())
    assert report["replay"]["champion_version"] == str(v1) and report["replay"]["accepted"] > 0
    assert report["by_kind"]["sft"]["per_slice"]["ticket_routing"] == report["replay"]["accepted"]
    # gated like the first candidate (whether 24 replayed tickets are enough is the data's business), and
    # closer to the champion on the forgotten slice than the blocked candidate
    rules = {r["slice"]: r for r in replayed["slices"]}
    blocked = {r["slice"]: r for r in ev2["gate"]["rules"]}
    assert rules["ticket_routing"]["kind"] == blocked["ticket_routing"]["kind"] == "max_regression@0.9"
    assert rules["ticket_routing"]["candidate"] < blocked["ticket_routing"]["candidate"]
    assert res3["passed"] == replayed["passed"]
