"""The full pipeline through kfp.local on a tiny random model: real ZeRO-3 2-process training,
real MLflow sqlite, real gateway process. Two runs on one state directory: the first is
promoted; the second fails the evaluation gate and must be neither registered nor deployed."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.integration


PLANTED = "tl-planted-7f3e9c1d2b"  # a credential in the environment, where credentials belong


def _files_holding(root, needle: bytes) -> list[str]:  # noqa: ANN001
    return [str(f) for f in root.rglob("*") if f.is_file() and needle in f.read_bytes()]


def test_pipeline_promotes_then_blocks_a_failing_candidate(tmp_path, tiny_model_dir, monkeypatch, capfd):
    from safetensors.torch import load_file

    from tuneloop.config import load_config
    from tuneloop.orchestrate import run_local
    from tuneloop.registry import Registry

    monkeypatch.setenv("TUNELOOP_ZERO3_PARTITION_ALL", "1")  # tiny model: really partition every parameter
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"):
        monkeypatch.setenv(name, PLANTED)
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    first = run_local(cfg, "tiny-run-1")

    assert first["outcome"] == "promoted v1", first
    assert first["aliases"] == {"champion": "1"}
    names = [s["stage"] for s in first["stages"]]
    # reward and rl pass the adapter through without a run of their own under train.alignment dpo
    assert names == ["check_prerequisites", "ingest", "validate_data", "sft", "dpo", "merge", "evaluate", "repair",
                     "register", "deploy_canary", "analyze_canary", "promote"]
    assert all(s["status"] == "FINISHED" for s in first["stages"])
    reg = Registry(cfg)
    sft_run = reg.client.search_runs([first["experiment_id"]], "tags.`tuneloop.stage` = 'sft'")[0]
    losses = reg.client.get_metric_history(sft_run.info.run_id, "sft/loss")
    assert len(losses) >= 2, "training loss was not logged as the run went"
    assert sft_run.data.metrics["world_size"] == 2
    v1 = reg.client.get_model_version("tiny-model", "1")
    assert v1.tags["tuneloop.pipeline_run_id"] == first["parent_run_id"]
    assert len(v1.tags["tuneloop.data_hash"]) == 64
    # the calibration reference of label-free quality estimation travels with the version
    import mlflow.artifacts

    tag = v1.tags["tuneloop.quality_reference"]  # runs:/<register run>/quality/quality_reference.json
    ref = json.loads(open(mlflow.artifacts.download_artifacts(tag, dst_path=str(tmp_path / "q"))).read())
    assert "ticket_routing" in ref["slices"]
    assert "## Quality in production" in v1.description and "| ticket_routing | 8 |" in v1.description
    adapter = reg.download_adapter(v1, tmp_path / "dl")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"
    # the registered version is an MLflow model of the pipeline run: the champion loads with pyfunc and answers
    import mlflow

    assert v1.run_id == first["parent_run_id"] and v1.source.startswith("models:/m-")
    champion = mlflow.pyfunc.load_model("models:/tiny-model@champion")
    answer = champion.predict({"prompt": "I was charged twice for my order"}, params={"max_new_tokens": 4})
    assert len(answer) == 1 and isinstance(answer[0], str)
    # MLflow tells the story: the pipeline run's description is the run summary, its verdicts are tags
    parent = reg.client.get_run(first["parent_run_id"])
    story = parent.data.tags["mlflow.note.content"]
    assert story.startswith("### Pipeline run tiny-run-1: promoted v1"), story[:300]
    assert all(f"| {stage} | FINISHED |" in story for stage in names), story
    for part in ("**Data gate: PASSED**", "**Evaluation gate: PASSED**", "**Canary analysis: PROMOTE**",
                 "(always valid)", "sequential, ", "tiny-model v1 (champion)"):
        assert part in story, part
    assert parent.data.tags["tuneloop.gate"] == "passed" and parent.data.metrics["gate_passed"] == 1
    assert parent.data.tags["tuneloop.canary"] == "promoted" and parent.data.tags["tuneloop.data_gate"] == "passed"

    cfg2 = load_config(tiny_config(tmp_path, tiny_model_dir, evaluate__gates=[
        {"metric": "accuracy", "slice": "ticket_routing", "min": 0.99}]))
    second = run_local(cfg2, "tiny-run-2")
    assert second["outcome"] == "rejected by the evaluation gate"
    assert second["gate"]["passed"] is False
    failed = [r for r in second["gate"]["rules"] if not r["passed"]]
    assert failed[0]["slice"] == "ticket_routing" and failed[0]["metric"] == "accuracy"
    assert second["model_version"] is None
    assert second["aliases"] == {"champion": "1"}, "a rejected candidate must not become canary or champion"
    assert [str(v.version) for v in reg.client.search_model_versions("name = 'tiny-model'")] == ["1"]
    assert "deploy_canary" not in [s["stage"] for s in second["stages"]]
    story2 = reg.client.get_run(second["parent_run_id"]).data.tags["mlflow.note.content"]
    assert story2.startswith("### Pipeline run tiny-run-2: rejected by the evaluation gate")
    assert "**Evaluation gate: BLOCKED**" in story2 and "| ticket_routing | accuracy |" in story2
    # the blocked candidate is diagnosed; the ladder does not run for a failed `min` rule (not forgetting)
    ev2 = reg.stage_runs(second["parent_run_id"], "evaluate")[0]
    listed = reg.client.list_artifacts(ev2.info.run_id, "evaluation")
    assert "diagnosis.md" in [a.path.rsplit("/", 1)[-1] for a in listed]
    rp2 = reg.stage_runs(second["parent_run_id"], "repair")[0]
    assert rp2.data.tags["tuneloop.outcome"].startswith("repair ladder not run")
    # nothing of the run - MLflow store and artifacts, KFP outputs, datasets, checkpoints, logs - holds the secret
    assert _files_holding(tmp_path, PLANTED.encode()) == []
    out, err = capfd.readouterr()
    assert PLANTED not in out and PLANTED not in err
    # every task was forked from the warm interpreter (tuneloop.warm_tasks); none fell back to a cold start
    assert err.count("tasks are forked from it") == 2, "one warm task server per run"
    assert "starts in a fresh interpreter" not in out + err
    assert "not preloaded" not in err, "every module in tuneloop.warm_tasks.PRELOAD imports"
