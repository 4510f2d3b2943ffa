"""KServe backend: InferenceService objects against KServe's own CRD schema, and the apply /
readiness logic against recorded API answers (only the API is replaced; the logic is real)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.deploy import kserve

pytestmark = pytest.mark.unit
CRD = Path(__file__).resolve().parents[1] / "crds" / "serving.kserve.io_inferenceservices.yaml"


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir):  # noqa: ANN001, ANN201
    return load_config(tiny_config(tmp_path, tiny_model_dir, kubernetes={"namespace": "ml"}, deploy={
        "backend": "kserve", "canary": {"traffic_percent": 10},
        "kserve": {"base_model_uri": "s3://models/smollm2", "artifact_store_uri": "s3://mlflow",
                   "feedback_url": "http://tuneloop-feedback.ml:8080",
                   "resources": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                  "effect": "NoSchedule"}]}}}))


def test_canary_and_champion_objects_match_the_crd(cfg, schema):  # noqa: ANN001
    canary = kserve.inference_service(cfg, "7", "s3://mlflow/1/abc/artifacts/adapter", 10)
    champion = kserve.inference_service(cfg, "7", "s3://mlflow/1/abc/artifacts/adapter", None)
    for obj in (canary, champion):
        jsonschema.validate(obj, schema)
    p = canary["spec"]["predictor"]
    assert p["canaryTrafficPercent"] == 10 and "canaryTrafficPercent" not in champion["spec"]["predictor"]
    assert p["logger"]["url"].endswith("/v1/kserve-events?version=7&variant=canary")
    assert champion["spec"]["predictor"]["logger"]["url"].endswith("variant=champion")
    assert [u["mountPath"] for u in p["storageUris"]] == ["/mnt/models", "/mnt/adapter"]
    assert p["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    bad = {**canary, "spec": {"predictor": {**p, "canaryTrafficPercent": "ten"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_mlflow_artifact_uris_become_bucket_uris(cfg):  # noqa: ANN001
    assert kserve.storage_uri("mlflow-artifacts:/1/abc/artifacts/adapter", cfg) == "s3://mlflow/1/abc/artifacts/adapter"
    assert kserve.storage_uri("s3://other/x", cfg) == "s3://other/x"


class RecordedApi:
    """Answers of a CustomObjectsApi, recorded as a list per call kind."""

    def __init__(self, gets: list) -> None:  # noqa: ANN001
        self.gets, self.calls = list(gets), []

    def get_namespaced_custom_object(self, group, version, ns, plural, name):  # noqa: ANN001, ANN201
        self.calls.append(("get", name))
        answer = self.gets.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def create_namespaced_custom_object(self, group, version, ns, plural, body):  # noqa: ANN001, ANN201
        self.calls.append(("create", body["metadata"]["name"]))
        return body

    def patch_namespaced_custom_object(self, group, version, ns, plural, name, body):  # noqa: ANN001, ANN201
        self.calls.append(("patch", name, body))
        return body


def _status(ready: str, reason: str = "", message: str = "") -> dict:
    return {"status": {"conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": message}]}}


def test_apply_creates_then_patches_and_waits_for_ready(cfg):  # noqa: ANN001
    from kubernetes.client.exceptions import ApiException

    obj = kserve.inference_service(cfg, "3", "s3://mlflow/a", None)
    api = RecordedApi([ApiException(status=404), {"metadata": {}}, _status("Unknown"), _status("True")])
    ks = kserve.KServe(api)
    ks.apply(obj)
    ks.apply(obj)
    ks.wait_ready("tiny-model", "ml", poll_s=0)
    assert [c[0] for c in api.calls] == ["get", "create", "get", "patch", "get", "get"]


def test_not_ready_with_a_reason_fails_with_it(cfg):  # noqa: ANN001
    api = RecordedApi([_status("False", "RevisionFailed", "CUDA out of memory")])
    with pytest.raises(RuntimeError, match="RevisionFailed: CUDA out of memory"):
        kserve.KServe(api).wait_ready("tiny-model", "ml", poll_s=0)


def test_promotion_drops_the_canary_percent(cfg):  # noqa: ANN001
    api = RecordedApi([])
    kserve.KServe(api).set_canary_percent("tiny-model", "ml", None)
    assert api.calls == [("patch", "tiny-model", {"spec": {"predictor": {"canaryTrafficPercent": None}}})]


def test_the_payload_logger_carries_the_events_token_from_the_environment(cfg, monkeypatch):  # noqa: ANN001
    monkeypatch.delenv("TUNELOOP_EVENTS_TOKEN", raising=False)
    url = kserve.inference_service(cfg, "7", "s3://a", None)["spec"]["predictor"]["logger"]["url"]
    assert "access_token" not in url
    monkeypatch.setenv("TUNELOOP_EVENTS_TOKEN", "tl_evt_abc")
    url = kserve.inference_service(cfg, "7", "s3://a", 10)["spec"]["predictor"]["logger"]["url"]
    assert url.endswith("?version=7&variant=canary&access_token=tl_evt_abc")
