"""The TrainJob / PyTorchJob launchers: the objects they build are checked against the real CRD
schemas (tests/crds), and the real launcher logic is driven through recorded API responses
(k8s_recordings/status_transitions.json) by a fake that stands in for the Kubernetes API only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.train.cluster import ClusterLauncher
from tuneloop.train.k8s import build_pytorchjob, build_trainjob, job_name, pod_problem, pytorchjob_status, trainjob_status
from tuneloop.train.local import TrainingFailed
from tuneloop.train.spec import JobSpec

pytestmark = pytest.mark.unit

CRDS = Path(__file__).resolve().parents[1] / "crds"  # vendored upstream CRDs (tests/crds/README.md)
RECORDINGS = json.loads((Path(__file__).parent / "k8s_recordings" / "status_transitions.json").read_text())


def _schema(filename: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / filename).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]


def _unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would prune (or refuse under strict field validation): not in the schema."""
    out: list[str] = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if props is None or schema.get("x-kubernetes-preserve-unknown-fields"):
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k, v in obj.items():
                    out += _unknown_fields(v, extra, f"{path}.{k}")
            return out
        for k, v in obj.items():
            if k not in props:
                out.append(f"{path}.{k}")
            else:
                out += _unknown_fields(v, props[k], f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += _unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def _check_against_crd(obj: dict[str, Any], filename: str) -> None:
    import jsonschema

    schema = _schema(filename)
    jsonschema.Draft7Validator(schema).validate(obj)
    assert _unknown_fields(obj, schema) == []
    # the CEL rules on metadata.name that jsonschema cannot run (TrainJob declares them)
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63


def _cfg(tmp_path: Path, backend: str, **train: Any):
    cluster = {"image": "registry.example.com/tuneloop-train:1",
               "resources": {"cpu": "32", "memory": "256Gi", "accelerators": 8,
                             "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
               "env": {"NCCL_DEBUG": "WARN"},
               "poll_seconds": 5, "max_restarts": 2}
    cluster.update(train.pop("cluster", {}))
    kubernetes = {"namespace": "ml",
                  "secrets": [{"name": "MLFLOW_TRACKING_TOKEN", "secret": "mlflow-token", "key": "token"},
                              {"name": "AWS_SECRET_ACCESS_KEY", "secret": "s3-creds", "key": "secret"}]}
    return load_config(tiny_config(tmp_path, Path("/nonexistent-model"), kubernetes=kubernetes, train__backend=backend,
                                   train__num_nodes=train.pop("num_nodes", 2),
                                   train__nproc_per_node=train.pop("nproc_per_node", 8),
                                   train__cluster=cluster, **{f"train__{k}": v for k, v in train.items()}))


@pytest.mark.parametrize("nodes", [1, 4])
def test_trainjob_matches_the_trainer_crd(tmp_path: Path, nodes: int) -> None:
    cfg = _cfg(tmp_path, "trainjob", num_nodes=nodes)
    name = job_name("sft", "0123456789abcdef0123456789abcdef", 3)
    obj = build_trainjob(cfg, name, "sft", "/state/jobs/r/sft/job_spec.json", {"app.kubernetes.io/managed-by": "x"})
    _check_against_crd(obj, "trainer.kubeflow.org_trainjobs.yaml")
    t = obj["spec"]["trainer"]
    # the chart's hardened runtime in the job's namespace, not Kubeflow Trainer's cluster-wide default
    assert obj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": "tuneloop-deepspeed"}
    assert (t["numNodes"], t["numProcPerNode"]) == (nodes, 8)
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert t["command"][0] == "torchrun" and t["command"][-3:] == ["-m", "tuneloop.train.sft",
                                                                   "/state/jobs/r/sft/job_spec.json"]
    pod = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and pod["tolerations"][0]["operator"] == "Exists"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "tuneloop-state"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == cfg.state_dir
    assert pod["terminationGracePeriodSeconds"] == 300


@pytest.mark.parametrize("nodes", [1, 3])
def test_pytorchjob_matches_the_training_operator_crd(tmp_path: Path, nodes: int) -> None:
    cfg = _cfg(tmp_path, "pytorchjob", num_nodes=nodes)
    obj = build_pytorchjob(cfg, job_name("dpo", "run-1"), "dpo", "/state/jobs/r/dpo/job_spec.json")
    _check_against_crd(obj, "kubeflow.org_pytorchjobs.yaml")
    replicas = obj["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and f"--nnodes={nodes}" in container["command"]
    assert replicas["Master"]["restartPolicy"] == "ExitCode"


def test_secrets_are_references_never_values(tmp_path: Path) -> None:
    for backend, build in (("trainjob", build_trainjob), ("pytorchjob", build_pytorchjob)):
        obj = build(_cfg(tmp_path, backend), "tuneloop-sft-abc", "sft", "/s.json")
        text = json.dumps(obj)
        env = next(e for e in _all_env(obj) if e["name"] == "MLFLOW_TRACKING_TOKEN")
        assert env == {"name": "MLFLOW_TRACKING_TOKEN",
                       "valueFrom": {"secretKeyRef": {"name": "mlflow-token", "key": "token"}}}
        assert "value" not in next(e for e in _all_env(obj) if e["name"] == "AWS_SECRET_ACCESS_KEY")
        assert "NCCL_DEBUG" in text


def _all_env(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, dict):
        return [e for k, v in obj.items() for e in (v if k == "env" and isinstance(v, list) else _all_env(v))]
    if isinstance(obj, list):
        return [e for v in obj for e in _all_env(v)]
    return []


# -- recorded status transitions through the real launcher -----------------------------------------
class FakeKubernetes:
    """Stands in for CustomObjectsApi + CoreV1Api: answers with recorded responses, poll by poll."""

    def __init__(self, attempts: list[list[dict[str, Any]]]) -> None:
        from kubernetes.client import ApiClient

        self.attempts, self.attempt, self.poll = attempts, -1, 0
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.selectors: list[str] = []
        self._client = ApiClient()

    def _now(self) -> dict[str, Any]:
        polls = self.attempts[self.attempt]
        return polls[min(self.poll, len(polls) - 1)]

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, namespace, plural, body):  # noqa: ANN001
        self.created.append(body)
        self.attempt, self.poll = self.attempt + 1, 0
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):  # noqa: ANN001
        body = {**self.created[-1], **self._now()["job"]}
        self.poll += 1
        return body

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):  # noqa: ANN001
        self.deleted.append(name)

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector=None):  # noqa: ANN001
        self.selectors.append(label_selector)
        polls = self.attempts[self.attempt]
        data = {"apiVersion": "v1", "kind": "PodList", "metadata": {},
                "items": polls[min(self.poll - 1, len(polls) - 1)]["pods"]}
        return self._client.deserialize(type("Response", (), {"data": json.dumps(data)})(), "V1PodList")

    def read_namespaced_pod_log(self, name, namespace, **kw):  # noqa: ANN001
        polls = self.attempts[self.attempt]
        return polls[min(self.poll - 1, len(polls) - 1)].get("logs", {}).get(name, "")


def _launch(tmp_path: Path, scenario: str, **cluster: Any) -> tuple[FakeKubernetes, list[str], Any]:
    rec = RECORDINGS[scenario]
    fake = FakeKubernetes(rec["attempts"])
    clock = [0.0]
    echoed: list[str] = []
    cfg = _cfg(tmp_path, rec["kind"], cluster=cluster)
    launcher = ClusterLauncher(cfg, fake, fake, sleep=lambda s: clock.__setitem__(0, clock[0] + s),
                               clock=lambda: clock[0], echo=echoed.append)
    try:
        result: Any = launcher.run_job("sft", "run-1", "/state/jobs/run-1/sft/job_spec.json")
    except TrainingFailed as e:
        result = e
    return fake, echoed, result


def test_trainjob_success_streams_status_and_logs_once_and_cleans_up(tmp_path: Path) -> None:
    fake, echoed, result = _launch(tmp_path, "trainjob_success")
    assert result == job_name("sft", "run-1")
    assert fake.deleted == [result]
    assert fake.selectors[0] == f"jobset.sigs.k8s.io/jobset-name={result}"
    text = "\n".join(echoed)
    assert "Unschedulable (0/4 nodes are available: 4 Insufficient nvidia.com/gpu.)" in text
    assert "TrainJob tuneloop-sft-" in text and ": succeeded (JobSetCompleted: jobset completed)" in text
    assert text.count("sft parameters: 36 of 36 partitioned") == 1, "a log line is shown once"
    assert "sft step 10/20" in text and "some noisy line" not in text


def test_trainjob_oom_fails_with_the_pods_reason_and_is_not_retried(tmp_path: Path) -> None:
    fake, echoed, result = _launch(tmp_path, "trainjob_oom")
    assert isinstance(result, TrainingFailed)
    assert "OOMKilled, exit code 137" in str(result) and "JobSetFailed" in str(result)
    assert len(fake.created) == 1 and fake.deleted == [fake.created[0]["metadata"]["name"]]


def test_trainjob_preempted_is_created_again_and_succeeds(tmp_path: Path) -> None:
    fake, echoed, result = _launch(tmp_path, "trainjob_preempted_then_success")
    names = [b["metadata"]["name"] for b in fake.created]
    assert names == [job_name("sft", "run-1"), job_name("sft", "run-1", 1)]
    assert result == names[1] and fake.deleted == names
    assert any("PreemptionByScheduler" in line and "creating it again" in line for line in echoed)


def test_pytorchjob_restart_in_place_is_followed_to_success(tmp_path: Path) -> None:
    fake, echoed, result = _launch(tmp_path, "pytorchjob_restart_after_eviction")
    assert result == job_name("sft", "run-1") and len(fake.created) == 1
    text = "\n".join(echoed)
    assert "restarting (PyTorchJobRestarting" in text and "succeeded (PyTorchJobSucceeded" in text
    assert fake.selectors[0] == f"training.kubeflow.org/job-name={result}"


def test_missing_secret_fails_after_the_grace_period_with_kubernetes_message(tmp_path: Path) -> None:
    fake, echoed, result = _launch(tmp_path, "pytorchjob_missing_secret", image_pull_grace_seconds=60)
    assert isinstance(result, TrainingFailed)
    assert 'CreateContainerConfigError (secret "mlflow-token" not found)' in str(result)
    assert len(fake.created) == 1 and fake.deleted, "the job is deleted after a failure too"


def test_status_readers_on_recorded_objects() -> None:
    polls = RECORDINGS["pytorchjob_restart_after_eviction"]["attempts"][0]
    assert [pytorchjob_status(p["job"]).phase for p in polls] == ["pending", "running", "restarting", "running",
                                                                    "succeeded"]
    polls = RECORDINGS["trainjob_success"]["attempts"][0]
    assert [trainjob_status(p["job"]).phase for p in polls] == ["pending", "running", "running", "succeeded"]
    assert trainjob_status({"status": {"conditions": [{"type": "Suspended", "status": "True"}]}}).phase == "suspended"


def test_pod_problem_prefers_the_disruption_reason() -> None:
    from kubernetes.client import ApiClient

    pods = RECORDINGS["trainjob_preempted_then_success"]["attempts"][0][1]["pods"]
    data = {"items": pods}
    items = ApiClient().deserialize(type("R", (), {"data": json.dumps(data)})(), "V1PodList").items
    first, second = pod_problem(items[0]), pod_problem(items[1])
    assert first.preempted and first.reason == "PreemptionByScheduler"
    assert second.preempted and "exit code 143" in second.reason


def test_run_stages_inputs_on_the_state_volume_and_returns_the_outputs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "trainjob")
    base = cfg.state_path / "models" / "tiny"
    base.mkdir(parents=True)
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    spec = JobSpec(stage="sft", base_model_dir=str(base), data_path=str(data), output_dir=str(tmp_path / "kfp-out"))

    class Writes(FakeKubernetes):  # the pods' effect on the shared volume: the worker's outputs
        def get_namespaced_custom_object(self, *a, **kw):  # noqa: ANN002, ANN003
            body = super().get_namespaced_custom_object(*a, **kw)
            if body.get("status", {}).get("conditions"):
                out = cfg.state_path / "jobs" / "run-1" / "sft" / "out"
                (out / "adapter").mkdir(parents=True, exist_ok=True)
                (out / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
                (out / "train_metrics.json").write_text('{"steps": 3}')
            return body

    fake = Writes(RECORDINGS["trainjob_success"]["attempts"])
    launcher = ClusterLauncher(cfg, fake, fake, sleep=lambda s: None, echo=lambda line: None)
    assert launcher.run(spec, "run-1") == {"steps": 3}
    assert (tmp_path / "kfp-out" / "adapter" / "adapter_model.safetensors").exists()
    job_spec = json.loads((cfg.state_path / "jobs" / "run-1" / "sft" / "job_spec.json").read_text())
    assert job_spec["data_path"].startswith(str(cfg.state_path.resolve()))
    command = fake.created[0]["spec"]["trainer"]["command"]
    assert command[-1] == str(cfg.state_path.resolve() / "jobs" / "run-1" / "sft" / "job_spec.json")


def test_run_refuses_a_base_model_the_pods_cannot_see(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "trainjob")
    spec = JobSpec(stage="sft", base_model_dir=str(tmp_path / "elsewhere"), data_path="x", output_dir="y")
    fake = FakeKubernetes([])
    with pytest.raises(TrainingFailed, match="not under state_dir"):
        ClusterLauncher(cfg, fake, fake).run(spec, "run-1")
    assert fake.created == []


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_training_pods_are_hardened_and_carry_the_policy_labels(tmp_path: Path, backend: str) -> None:
    from tuneloop.train.k8s import KINDS

    cfg = _cfg(tmp_path, backend, num_nodes=2)
    cfg.kubernetes.pod_labels = {"app.kubernetes.io/name": "tuneloop", "app.kubernetes.io/instance": "rel"}
    obj = KINDS[backend].build(cfg, job_name("sft", "run-1"), "sft", "/state/job_spec.json")
    if backend == "trainjob":
        tpl = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]
    else:
        tpl = obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
        assert tpl["spec"]["automountServiceAccountToken"] is False
    assert tpl["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    assert tpl["metadata"]["labels"]["app.kubernetes.io/component"] == "training"
    pod = tpl["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/tmp", "/dev/shm", cfg.state_dir}
