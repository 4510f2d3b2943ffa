"""`tuneloop upload-pipeline` and `schedule --replace` against a stand-in kfp.Client (no KFP
backend can run here): the calls the chart's hook Job makes, with the arguments KFP expects."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tuneloop.cli import app

pytestmark = pytest.mark.integration


class FakeClient:
    calls: list[tuple] = []
    pipelines: dict[str, str] = {}
    recurring: list[SimpleNamespace] = []

    def __init__(self, host=None, namespace=None):
        self.calls.append(("init", host, namespace))

    def get_pipeline_id(self, name):
        return self.pipelines.get(name)

    def upload_pipeline(self, path, pipeline_name=None, description=None, namespace=None):
        self.calls.append(("upload_pipeline", pipeline_name))
        self.pipelines[pipeline_name] = "pid-1"
        return SimpleNamespace(pipeline_id="pid-1")

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id=None, pipeline_name=None,
                                description=None):
        assert open(path).read().startswith("# PIPELINE DEFINITION")
        self.calls.append(("upload_pipeline_version", pipeline_id, pipeline_version_name))
        return SimpleNamespace(pipeline_version_id=f"vid-{pipeline_version_name}")

    def create_experiment(self, name, namespace=None):
        return SimpleNamespace(experiment_id="eid-1")

    def list_recurring_runs(self, experiment_id=None, page_size=10, filter=None, **_):
        name = json.loads(filter)["predicates"][0]["string_value"]
        return SimpleNamespace(recurring_runs=[r for r in self.recurring if r.display_name == name] or None)

    def delete_recurring_run(self, rid):
        self.calls.append(("delete_recurring_run", rid))
        self.recurring[:] = [r for r in self.recurring if r.recurring_run_id != rid]

    def create_recurring_run(self, experiment_id, job_name, cron_expression=None, **kw):
        rid = f"rr-{len(self.recurring) + 1}"
        self.recurring.append(SimpleNamespace(recurring_run_id=rid, display_name=job_name))
        self.calls.append(("create_recurring_run", job_name, cron_expression))
        return SimpleNamespace(recurring_run_id=rid)


@pytest.fixture
def kfp_client(monkeypatch):
    import kfp

    FakeClient.calls, FakeClient.pipelines, FakeClient.recurring = [], {}, []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    return FakeClient


def test_upload_creates_the_pipeline_then_adds_versions(kfp_client):
    runner = CliRunner()
    first = runner.invoke(app, ["upload-pipeline", "--host", "http://kfp:8888", "--version", "0.1.0-a"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["upload-pipeline", "--host", "http://kfp:8888", "--version", "0.1.0-b"])
    assert second.exit_code == 0, second.output
    uploads = [c for c in kfp_client.calls if c[0].startswith("upload")]
    assert uploads == [("upload_pipeline", "tuneloop-continuous-training"),
                       ("upload_pipeline_version", "pid-1", "0.1.0-a"),
                       ("upload_pipeline_version", "pid-1", "0.1.0-b")]
    assert "version id vid-0.1.0-b" in second.output.replace("\n", " ")


def test_upload_needs_a_host():
    result = CliRunner().invoke(app, ["upload-pipeline"])
    assert result.exit_code == 2


def test_schedule_replace_keeps_one_recurring_run(kfp_client, tmp_path, tiny_model_dir):
    import shutil

    from conftest import tiny_config

    # cluster-shaped: the model and the data lie on the state volume, mounted at state_dir
    cfg = tiny_config(tmp_path, shutil.copytree(tiny_model_dir, tmp_path / "models" / "base"), state_dir=str(tmp_path))
    runner = CliRunner()
    for cron in ("0 0 3 * * *", "0 30 4 * * *"):
        r = runner.invoke(app, ["schedule", str(cfg), "--host", "http://kfp:8888", "--cron", cron,
                                "--job-name", "nightly", "--replace"])
        assert r.exit_code == 0, r.output
    assert [r.display_name for r in kfp_client.recurring] == ["nightly"]
    assert ("delete_recurring_run", "rr-1") in kfp_client.calls
    assert kfp_client.calls[-1] == ("create_recurring_run", "nightly", "0 30 4 * * *")
