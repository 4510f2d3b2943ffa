"""The data stages with real MLflow (sqlite), Great Expectations, Evidently and the offline MiniLM model:
the first run has no champion (no replay, drift says there is nothing to compare against); once a
version is champion, the next run finds its training data through the registry, replays a share of
it and writes a drift report against it; lineage lands in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.integration


def test_replay_drift_and_lineage_through_the_registry(tmp_path: Path, tiny_model_dir: Path) -> None:
    import mlflow.artifacts

    from tuneloop.config import load_config
    from tuneloop.registry import TAG_PIPELINE_RUN, Registry
    from tuneloop.stages import ingest_stage, validate_stage

    state = str(tmp_path / "state")
    cfg1 = load_config(tiny_config(tmp_path / "r1", tiny_model_dir, state_dir=state, data__replay_share=0.3))
    reg = Registry(cfg1)
    p1 = reg.start_pipeline_run("run-1", "kfp-1", {})
    r1 = ingest_stage(cfg1, p1, tmp_path / "ds1")
    assert r1["replay"]["note"] == "no champion yet: nothing to replay" and r1["replay"]["accepted"] == 0
    v1 = validate_stage(cfg1, p1, tmp_path / "ds1", tmp_path / "v1")
    assert v1["passed"], v1["failed"]
    assert v1["drift"]["computed"] is False and "no champion yet" in v1["drift"]["note"]
    assert "no champion yet" in Path(v1["drift_html"]).read_text()

    # make run 1's model the champion (as promote would)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with reg.stage_run(p1, "register") as rid:
        mv = reg.register(rid, adapter, {TAG_PIPELINE_RUN: p1})
    reg.set_alias("champion", mv.version)

    # run 2: only ticket data is new; replay brings general_qa records of the champion's data back
    cfg2 = load_config(tiny_config(tmp_path / "r2", tiny_model_dir, state_dir=state, data__replay_share=0.3,
                                   data__sources=[{"path": "data/tickets.jsonl"},
                                                  {"path": "data/prefs.jsonl", "kind": "preference"}]))
    (tmp_path / "r2" / "data" / "tickets.jsonl").write_text("\n".join(
        json.dumps({"id": f"new-{i}", "prompt": f"New ticket about a damaged {item}, please advise",
                    "response": "shipping", "slice": "ticket_routing"})
        for i, item in enumerate(["lamp", "chair", "kettle", "desk", "mirror", "printer", "router", "sofa",
                                  "fridge", "clock", "oven", "bike"])) + "\n")
    p2 = reg.start_pipeline_run("run-2", "kfp-2", {})
    r2 = ingest_stage(cfg2, p2, tmp_path / "ds2")
    rp = r2["replay"]
    assert rp["champion_version"] == str(mv.version) and rp["requested"] == round(0.3 * 12 / 0.7)
    assert rp["accepted"] > 0 and rp["actual_share"] > 0
    sft = [json.loads(x) for x in (tmp_path / "ds2" / "sft.jsonl").read_text().splitlines()]
    replayed = [x for x in sft if x["source"] == f"replay:v{mv.version}"]
    assert len(replayed) == rp["accepted"]
    assert all(x["prompt"].startswith("<|im_start|>") for x in replayed)  # rendered again for this run
    assert r2["by_kind"]["sft"]["per_source"][f"replay:v{mv.version}"] == rp["accepted"]

    v2 = validate_stage(cfg2, p2, tmp_path / "ds2", tmp_path / "v2")
    d = v2["drift"]
    assert d["computed"] and d["reference"] == f"champion v{mv.version} training data"
    assert set(d["descriptors"]) >= {"prompt_chars", "prompt_words", "prompt_oov_share", "answer_chars"}
    assert d["embedding_drift_score"] is not None and 0 <= d["embedding_drift_score"] <= 1
    html = Path(v2["drift_html"]).read_text()
    assert len(html) > 10_000 and "<html" in html.lower()
    summary = json.loads((tmp_path / "v2" / "drift" / "drift.json").read_text())
    assert summary["summary"] == d and summary["evidently"]["metrics"]

    # lineage in MLflow
    runs = {r.data.tags["tuneloop.stage"]: r for r in reg.client.search_runs(
        [reg.experiment_id()], f"tags.`mlflow.parentRunId` = '{p2}'")}
    ing = runs["ingest"].data
    assert ing.metrics["replay.accepted"] == rp["accepted"] and "pii.texts_seen" in ing.metrics
    assert ing.metrics["dedup.exact_duplicates"] >= 0 and ing.params["replay.champion_version"] == str(mv.version)
    assert ing.tags["tuneloop.data_hash"] == r2["data_hash"] and len(ing.tags["tuneloop.sha256.sft"]) == 64
    assert any(k.startswith("sft.source.") for k in ing.metrics)
    val = runs["validate_data"]
    assert val.data.metrics["drift.drifted_descriptors"] >= 0
    assert val.data.tags["tuneloop.drift_reference"] == f"champion v{mv.version} training data"
    got = mlflow.artifacts.download_artifacts(run_id=val.info.run_id, artifact_path="validation/drift/drift.html",
                                              tracking_uri=reg.uri, dst_path=str(tmp_path / "dl"))
    assert Path(got).stat().st_size == len(html.encode())
    assert (Path(cfg2.state_dir) / "champion-data" / f"v{mv.version}" / "sft.jsonl").exists()  # fetched once
