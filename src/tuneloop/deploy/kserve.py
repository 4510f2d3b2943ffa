"""The cluster's serving backend: one KServe InferenceService per model (vLLM runtime).

A rollout patches the predictor to the candidate (base weights + LoRA adapter from the MLflow
artifact store) with `canaryTrafficPercent`; KServe keeps the previous revision serving the
rest. Promotion drops canaryTrafficPercent (all traffic to the latest revision); rollback sets
it to 0 and then restores the champion's spec. Each revision's payload logger posts to the
feedback service with its own version and variant in the URL, so canary analysis reads the
same feedback store as locally.

Checked here: the objects validate against KServe's CRD schema, and the apply/patch logic runs
against recorded API answers. Not verified here: a live cluster, the runtime's flags.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from tuneloop.config import RunConfig

log = logging.getLogger("tuneloop.kserve")
GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
BASE_MOUNT, ADAPTER_MOUNT = "/mnt/models", "/mnt/adapter"


def service_name(cfg: RunConfig) -> str:
    k = cfg.deploy.kserve
    name = (k.service_name if k and k.service_name else cfg.registry.model_name).lower()
    return re.sub(r"[^a-z0-9-]+", "-", name).strip("-")[:63]


def storage_uri(source: str, cfg: RunConfig) -> str:
    """An MLflow artifact URI as a URI KServe's storage initializer can fetch."""
    k = cfg.deploy.kserve
    assert k is not None
    if source.startswith("mlflow-artifacts:/"):
        if not k.artifact_store_uri:
            raise ValueError("deploy.kserve.artifact_store_uri: the registry serves artifacts through the MLflow "
                             "server (mlflow-artifacts:/...); set the bucket prefix behind it, e.g. s3://mlflow")
        return k.artifact_store_uri.rstrip("/") + "/" + source.removeprefix("mlflow-artifacts:/").lstrip("/")
    return source


def inference_service(cfg: RunConfig, version: str, adapter_uri: str, canary_percent: int | None) -> dict[str, Any]:
    k = cfg.deploy.kserve
    assert k is not None
    name = service_name(cfg)
    variant = "canary" if canary_percent is not None else "champion"
    predictor: dict[str, Any] = {
        "labels": {**cfg.kubernetes.pod_labels, "app.kubernetes.io/component": "serving"},  # NetworkPolicies
        "serviceAccountName": k.service_account,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},  # PSS restricted
        "minReplicas": k.min_replicas,
        "maxReplicas": k.max_replicas,
        "model": {
            "modelFormat": {"name": "huggingface"},
            "runtime": k.runtime,
            "args": [f"--model_name={name}", f"--model_dir={BASE_MOUNT}", "--backend=vllm", "--enable-lora",
                     f"--lora-modules={name}-v{version}={ADAPTER_MOUNT}", f"--max-lora-rank={cfg.train.lora.r}"],
            "resources": k.resources.container_resources(0),
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        },
        "storageUris": [{"uri": k.base_model_uri, "mountPath": BASE_MOUNT},
                        {"uri": adapter_uri, "mountPath": ADAPTER_MOUNT}],
    }
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    if k.feedback_url:
        url = f"{k.feedback_url.rstrip('/')}/v1/kserve-events?version={version}&variant={variant}"
        token = os.environ.get(k.events_token_env) if k.events_token_env else None
        if token:  # KServe's logger sends no headers: the events-only key rides in the URL
            url += f"&access_token={token}"
        elif k.events_token_env:
            log.warning("deploy.kserve.events_token_env: %s is not set; the feedback service will refuse the "
                        "payload logger's events (401)", k.events_token_env)
        predictor["logger"] = {"mode": "all", "url": url}
    predictor.update(k.resources.placement())
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": cfg.kubernetes.namespace,
                         "labels": {"app.kubernetes.io/part-of": "tuneloop", "tuneloop.io/model-version": version},
                         "annotations": {"serving.kserve.io/deploymentMode": "Serverless"}},  # canary needs Knative
            "spec": {"predictor": predictor}}


class KServe:
    """Create/patch/watch InferenceServices with the official kubernetes client."""

    def __init__(self, api: Any | None = None) -> None:
        if api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = client.CustomObjectsApi()
        self.api = api

    def get(self, name: str, ns: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        if self.get(name, ns) is None:
            log.info("creating InferenceService %s/%s", ns, name)
            return self.api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, obj)
        log.info("patching InferenceService %s/%s", ns, name)
        return self.api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, obj)

    def set_canary_percent(self, name: str, ns: str, percent: int | None) -> dict[str, Any]:
        """None removes the field: all traffic to the latest revision (promotion)."""
        patch = {"spec": {"predictor": {"canaryTrafficPercent": percent}}}
        return self.api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, patch)

    def wait_ready(self, name: str, ns: str, timeout_s: float = 1800, poll_s: float = 10) -> dict[str, Any]:
        """Until the Ready condition is True; a False Ready with a reason raises with that reason."""
        deadline = time.monotonic() + timeout_s
        while True:
            obj = self.get(name, ns) or {}
            conds = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions", [])}
            ready = conds.get("Ready", {})
            if ready.get("status") == "True":
                return obj
            if ready.get("status") == "False" and ready.get("reason") not in (None, "", "RevisionMissing"):
                raise RuntimeError(f"InferenceService {ns}/{name} not ready: {ready.get('reason')}: "
                                   f"{ready.get('message', '')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"InferenceService {ns}/{name} not ready after {timeout_s:.0f}s")
            time.sleep(poll_s)


def _adapter_uri(cfg: RunConfig, version: str) -> str:
    from tuneloop.registry import Registry

    reg = Registry(cfg)
    # an MLflow-model version's source is models:/<id>, which KServe cannot fetch: its artifact folder,
    # which holds the adapter files at its root, is what the storage initializer downloads
    return storage_uri(reg.adapter_uri(reg.model_version(version)), cfg)


def deploy(cfg: RunConfig, version: str, api: Any | None = None) -> dict[str, Any]:
    ks = KServe(api)
    obj = ks.apply(inference_service(cfg, version, _adapter_uri(cfg, version), cfg.deploy.canary.traffic_percent))
    ks.wait_ready(service_name(cfg), cfg.kubernetes.namespace)
    return obj


def promote(cfg: RunConfig, version: str, api: Any | None = None) -> dict[str, Any]:
    ks = KServe(api)
    ks.set_canary_percent(service_name(cfg), cfg.kubernetes.namespace, None)
    # the champion's spec again, without canary and with the champion's logger labels
    obj = ks.apply(inference_service(cfg, version, _adapter_uri(cfg, version), None))
    ks.wait_ready(service_name(cfg), cfg.kubernetes.namespace)
    return obj


def rollback(cfg: RunConfig, champion_version: str | None, api: Any | None = None) -> dict[str, Any] | None:
    ks = KServe(api)
    name, ns = service_name(cfg), cfg.kubernetes.namespace
    ks.set_canary_percent(name, ns, 0)  # all traffic back to the previous revision at once
    if champion_version is None:
        return None
    obj = ks.apply(inference_service(cfg, champion_version, _adapter_uri(cfg, champion_version), None))
    ks.wait_ready(name, ns)
    return obj
