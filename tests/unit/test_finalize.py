"""The exit handler: a run that ended without a decision leaves no canary live and no MLflow run open."""

from __future__ import annotations

import pytest
from conftest import register_version, tiny_config

from tuneloop.config import load_config

pytestmark = pytest.mark.unit


def test_a_failed_run_rolls_back_its_canary_and_says_where_it_failed(tmp_path, tiny_model_dir):
    from tuneloop.registry import Registry
    from tuneloop.stages import finalize_stage

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, deploy__gateway_url="http://127.0.0.1:9"))
    reg = Registry(cfg)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    version = register_version(reg, adapter, "kfp-run-7")
    reg.set_alias("canary", version)
    parent = reg.pipeline_run_of_kfp("kfp-run-7").info.run_id
    with pytest.raises(RuntimeError):
        with reg.stage_run(parent, "analyze_canary"):
            raise RuntimeError("the gateway stopped answering\ntraceback lines")
    open_run = reg.client.create_run(reg.experiment_id(), run_name="promote",
                                     tags={"mlflow.parentRunId": parent, "tuneloop.stage": "promote"})

    r = finalize_stage(cfg, "kfp-run-7", "FAILED", "task analyze-canary failed")
    assert r["rolled_back"] == [version]
    assert "canary" not in reg.aliases()
    assert reg.version_tags(version)["tuneloop.rolled_back"] == "true"
    run = reg.client.get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["tuneloop.outcome"].startswith("failed at analyze_canary: task analyze-canary failed")
    stage = reg.stage_runs(parent, "analyze_canary")[0]
    assert stage.data.tags["tuneloop.error"] == "the gateway stopped answering"
    assert "failure/error.txt" in [a.path for a in reg.client.list_artifacts(stage.info.run_id, "failure")]
    assert reg.client.get_run(open_run.info.run_id).info.status == "KILLED"
    # a run that reached its decision is left alone
    assert finalize_stage(cfg, "kfp-run-7", "SUCCEEDED")["outcome"].startswith("failed at analyze_canary")
    assert finalize_stage(cfg, "never-started", "FAILED")["outcome"] == "FAILED: no MLflow run was opened"


def test_a_retried_promote_keeps_the_rollback_target(tmp_path, tiny_model_dir, monkeypatch):
    """On the sqlite registry versions come back as int: a retry of `promote v2` (v2 is champion already)
    compared int 2 with "2" and moved `previous` onto v2 itself. Serving is replaced by a recorder here;
    test_canary_e2e drives promotion through a real gateway."""
    from tuneloop.deploy import canary
    from tuneloop.registry import Registry

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    reg = Registry(cfg)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    v1, v2 = register_version(reg, adapter, "run-1"), register_version(reg, adapter, "run-2")
    applied: list[str] = []
    monkeypatch.setattr(canary, "_apply", lambda cfg, step, version, champion=None: applied.append(step) or {})
    canary.promote(cfg, v1)
    reg.set_alias("canary", v2)
    assert canary.promote(cfg, v2)["previous"] == v1
    assert canary.promote(cfg, v2)["previous"] == v1  # the retry
    assert reg.aliases()["previous"] == v1 and reg.aliases()["champion"] == v2
    reg.delete_alias("canary")  # already gone: fine
