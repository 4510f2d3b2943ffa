"""The Helm chart, rendered with the real Helm library for every environment and validated
against Kubernetes' own schemas (helm/check_chart.py does the same plus checkov, yamllint and
hadolint in `make chart-check`)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
pytest.importorskip("helm_python", reason="helm-python-sdk is in the dev extra")

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_chart", ROOT / "helm" / "check_chart.py")
check_chart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_chart)

ENVS = [env for env, _ in check_chart.environments()]
PIPELINE_VERBS = {"create", "get", "list", "watch", "patch", "delete"}
ALLOWED_RULES = {
    ("trainer.kubeflow.org", "trainjobs"): PIPELINE_VERBS,
    ("kubeflow.org", "pytorchjobs"): PIPELINE_VERBS,
    ("serving.kserve.io", "inferenceservices"): PIPELINE_VERBS,
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get", "list", "watch"},
}


def env_values(env: str) -> dict:
    return check_chart.load_values(check_chart.CHART / f"values-{env}.yaml")


def render(values: dict) -> list[dict]:
    return [o for _, o in check_chart.manifests(check_chart.render(values))]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], spec) for o in objs for _, spec in check_chart.pod_specs(o)]


def with_changes(values: dict, changes: dict) -> dict:
    return check_chart.merged(values, changes)


@pytest.fixture(scope="module", params=ENVS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(env_values(request.param))


@pytest.fixture(scope="module", params=ENVS)
def rendered_with_options(request) -> tuple[str, list[dict]]:
    """The environment with the opt-in options on (the Istio policy, the Namespace object)."""
    return request.param, render(check_chart.with_options(env_values(request.param)))


def test_every_environment_is_checked():
    assert set(ENVS) == {"dev", "staging", "prod"}


@pytest.mark.parametrize("options", [False, True], ids=["as-is", "options-on"])
def test_manifests_validate_strictly(options):
    for env in ENVS:
        values = check_chart.with_options(env_values(env)) if options else env_values(env)
        objs = render(values)
        assert len(objs) >= 20
        errors = [(o["kind"], o["metadata"]["name"], check_chart.validate_object(o)) for o in objs]
        assert [e for e in errors if e[2][1]] == [], env
        assert check_chart.check_run_config([("", o) for o in objs]) is None
        assert check_chart.policy_violations(objs, values) == [], env
        kinds = {o["kind"] for o in objs}
        assert ("AuthorizationPolicy" in kinds) == options, env
        assert ("Namespace" in kinds) == (options and env_values(env)["pipeline"].get("kfpNamespace") != "tuneloop")


def test_helm_lint_has_no_warnings():
    import helm_python as helm

    for env in ENVS:
        report = helm.lint(check_chart.CHART, env_values(env), strict=True, namespace="tuneloop",
                           kube_version=f"v{check_chart.KUBE_VERSION}")
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], env


def test_rbac_is_exactly_what_the_pipeline_needs(rendered):
    env, objs = rendered
    roles = by_kind(objs, "Role")
    assert by_kind(objs, "ClusterRole") == [] and by_kind(objs, "ClusterRoleBinding") == []
    assert len(roles) == 1
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in roles[0]["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/nonResourceURLs tricks
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                assert "*" not in (group, res) and "*" not in rule["verbs"]
                granted.setdefault((group, res), set()).update(rule["verbs"])
    assert granted == ALLOWED_RULES
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": roles[0]["metadata"]["name"]}
    assert binding["subjects"] and all(s["kind"] == "ServiceAccount" for s in binding["subjects"])
    # of the chart's own accounts, only the pipeline's is bound
    own = {o["metadata"]["name"] for o in by_kind(objs, "ServiceAccount")}
    assert {s["name"] for s in binding["subjects"]} & own == {"tuneloop-pipeline"}


def test_no_secrets_in_the_chart(rendered):
    env, objs = rendered
    assert by_kind(objs, "Secret") == []
    for name, spec in pod_specs(objs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                # credentials only ever arrive through secretKeyRef
                if re.search(r"PASSWORD|SECRET|TOKEN|_KEY_ID|DATABASE_URL|STORE_URI", e["name"]) and "value" in e:
                    assert e["value"].startswith("sqlite:") and env == "dev", (name, e)


def test_gpu_training_pods_land_on_the_gpu_pool(rendered):
    env, objs = rendered
    values = env_values(env)
    gpus = values.get("training", {}).get("gpusPerNode", 8)
    (runtime,) = by_kind(objs, "TrainingRuntime")
    ((_, spec),) = pod_specs([runtime])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (node,) = spec["containers"]
    assert node["image"].startswith("ghcr.io/tuneloop/tuneloop-train:")
    assert node["resources"]["limits"]["nvidia.com/gpu"] == gpus == node["resources"]["requests"]["nvidia.com/gpu"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" and v["name"] == "dshm" for v in spec["volumes"])
    # the CPU services stay off the GPU pool
    for name, other in pod_specs(objs):
        if name != runtime["metadata"]["name"]:
            assert "nvidia.com/gpu" not in json.dumps(other), name


def test_workloads_run_as_documented(rendered):
    env, objs = rendered
    deployments = {o["metadata"]["name"]: o for o in by_kind(objs, "Deployment")}
    feedback = deployments["tuneloop-feedback"]["spec"]["template"]["spec"]["containers"][0]
    assert feedback["command"] + feedback["args"] == ["tuneloop", "feedback-service", "--port", "8080",
                                                      "--config", "/etc/tuneloop/config.yaml"]
    auth_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in feedback["env"] if "valueFrom" in e}
    assert auth_env["TUNELOOP_API_KEYS"] == {"name": "tuneloop-feedback-auth", "key": "api-keys"}
    assert auth_env["TUNELOOP_USER_ID_SECRET"] == {"name": "tuneloop-feedback-auth", "key": "user-id-secret"}
    assert "DATABASE_URL" in {e["name"] for e in feedback["env"]}, "the URL comes from the env, not the args"
    assert feedback["readinessProbe"]["httpGet"]["path"] == "/healthz"
    mlflow = deployments["tuneloop-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name basic-auth" in mlflow["args"][0]
    env_names = {e["name"] for e in mlflow["env"]}
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
            "MLFLOW_BACKEND_STORE_URI"} <= env_names
    (cron,) = by_kind(objs, "CronJob")
    monitor = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert monitor["command"] == ["tuneloop", "monitor", "/etc/tuneloop/config.yaml"]
    jobs = {o["metadata"]["name"]: o for o in by_kind(objs, "Job")}
    assert set(jobs) == {"tuneloop-pipeline-upload", "tuneloop-mlflow-users"}
    job, users = jobs["tuneloop-pipeline-upload"], jobs["tuneloop-mlflow-users"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    # the MLflow users exist before the pipeline is uploaded (and can run)
    assert users["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert int(users["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert users["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["python", "-m",
                                                                               "tuneloop.mlflow_users"]
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "tuneloop upload-pipeline --host" in script
    assert ("tuneloop schedule /etc/tuneloop/config.yaml" in script) == (env != "dev")
    for name, spec in pod_specs(objs):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], name
            assert sc["capabilities"]["drop"] == ["ALL"] and "resources" in c, name


def test_network_policies_cover_every_pod(rendered):
    env, objs = rendered
    policies = by_kind(objs, "NetworkPolicy")
    deny = [p for p in policies if "ingress" not in p["spec"]]
    assert len(deny) == 1 and deny[0]["spec"]["policyTypes"] == ["Ingress"]
    selector = deny[0]["spec"]["podSelector"]["matchLabels"]
    for name, spec in pod_specs(objs):
        owner = next(o for o in objs if o["metadata"]["name"] == name)
        labels = (owner["spec"].get("template", {}).get("metadata", {}).get("labels")
                  or owner["spec"].get("jobTemplate", {}).get("spec", {}).get("template", {}).get("metadata", {})
                  .get("labels")
                  or owner["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
                  ["metadata"]["labels"])
        assert selector.items() <= labels.items(), name


def test_grafana_dashboard_reads_the_gateway_metrics(rendered):
    env, objs = rendered
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("grafana-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["tuneloop.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(tuneloop_[a-z_]+)", e)}
    # the gateway's metric families, with the suffixes Prometheus exposes for them
    source = (ROOT / "src" / "tuneloop" / "deploy" / "gateway.py").read_text()
    exposed = set()
    for kind, name in re.findall(r'(Counter|Histogram)\(\s*"(tuneloop_[a-z_]+)"', source):
        exposed |= {f"{name}_total"} if kind == "Counter" else {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    # tuneloop monitor's quality gauges (its textfile, monitor/check.py): each name template with its parts
    monitor = (ROOT / "src" / "tuneloop" / "monitor" / "check.py").read_text()
    for template in re.findall(r'add\(f?"([a-z_{}]+)"', monitor):
        for metric in ("accuracy", "macro_f1", "precision", "recall"):
            for part in ("", "_lower", "_upper"):
                exposed.add("tuneloop_monitor_" + template.format(metric=metric, part=part))
    # the canary analysis' looks (feedback/canary_looks.py), served by the feedback service and the gateway
    looks = (ROOT / "src" / "tuneloop" / "feedback" / "canary_looks.py").read_text()
    exposed |= set(re.findall(r'MetricFamily\(\s*"(tuneloop_[a-z_]+)"', looks))
    assert used and used <= exposed, used - exposed
    assert {"tuneloop_requests_total", "tuneloop_request_latency_seconds_bucket",
            "tuneloop_completion_tokens_total", "tuneloop_feedback_score_sum"} <= used


def test_chart_version_follows_the_package():
    import tomllib

    chart = yaml.safe_load((check_chart.CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    from tuneloop.images import IMAGE, TRAIN_IMAGE

    objs = render(env_values("prod"))
    images = {c["image"] for _, s in pod_specs(objs) for c in s["containers"]}
    assert images == {IMAGE, TRAIN_IMAGE}


def test_schema_refuses_an_unknown_key():
    import helm_python as helm

    for bad in ({"mlflow": {"autth": {}}}, {"replicas": 3}, {"training": {"gpusPerNode": "eight"}}):
        with pytest.raises(helm.HelmValuesError, match="additional properties|expected integer|got string"):
            check_chart.render({**env_values("dev"), **bad})


@pytest.mark.parametrize("change, message", [
    ({"mlflow": {"auth": {"enabled": True, "existingSecret": ""}}}, "mlflow.auth.existingSecret is empty"),
    ({"environment": "prod", "mlflow": {"backendStore": {"existingSecret": ""}}},
     "mlflow.backendStore.existingSecret is empty"),
    ({"environment": "prod", "mlflow": {"auth": {"enabled": False}}}, "mlflow.auth.enabled must be true"),
    ({"environment": "staging", "feedback": {"database": {"existingSecret": ""}}},
     "feedback.database.existingSecret is empty"),
    ({"environment": "dev", "feedback": {"replicas": 2, "database": {"existingSecret": ""}}},
     "feedback.replicas > 1 needs"),
    ({"pipeline": {"schedule": {"enabled": True, "cron": "0 3 * * *"}}}, "wants 6 fields"),
    ({"rbac": {"pipelineServiceAccounts": []}}, "rbac.pipelineServiceAccounts is empty"),
    ({"stateVolume": {"existingClaim": ""}}, "stateVolume.existingClaim is empty"),
    ({"runConfig": {"state_dir": "/mnt/tuneloop/state"}}, "runConfig.state_dir (/mnt/tuneloop/state) must be "
                                                          "stateVolume.mountPath (/mnt/tuneloop)"),
    # prod installs into its Kubeflow profile namespace (pipeline.kfpNamespace = the release namespace)
    ({"namespace": {"create": True}}, "tuneloop is the Kubeflow profile namespace"),
    ({"namespace": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}},
     "set the Pod Security levels in namespace.podSecurity"),
    ({"containerSecurityContext": {"allowPrivilegeEscalation": True, "capabilities": {"add": ["SYS_ADMIN"]}}},
     "would be rejected: containerSecurityContext.allowPrivilegeEscalation must be false; "
     "capability SYS_ADMIN may not be added"),
    ({"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
     "seccompProfile.type must be RuntimeDefault or Localhost"),
    ({"mesh": {"istio": {"enabled": True}}}, "needs mesh.istio.cni true"),
    ({"mlflow": {"auth": {"users": {"existingSecret": ""}}}}, "mlflow.auth.users.existingSecret is empty"),
    ({"mlflow": {"auth": {"users": {"enabled": False}}}}, "mlflow.auth.users.enabled must be true"),
    ({"mlflow": {"auth": {"users": {"existingSecret": "tuneloop-mlflow-auth"}}}},
     "mlflow.auth.users.existingSecret must not be mlflow.auth.existingSecret"),
    ({"serviceAccounts": {"monitor": {"create": False}}}, "serviceAccounts.monitor.name is required"),
    ({"feedback": {"auth": {"existingSecret": ""}}}, "feedback.auth.existingSecret is empty"),
])
def test_fail_guards_refuse_impossible_combinations(change, message):
    import helm_python as helm

    values = env_values("prod")
    for key, sub in change.items():
        values[key] = {**values.get(key, {}), **sub} if isinstance(sub, dict) else sub
        for k2, v2 in (sub.items() if isinstance(sub, dict) else []):
            if isinstance(v2, dict):
                values[key][k2] = {**env_values("prod").get(key, {}).get(k2, {}), **v2}
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        check_chart.render(values)


def test_tracking_uri_defaults_to_the_chart_mlflow():
    objs = render(env_values("staging"))
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "tuneloop-config"]
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert cfg["registry"]["tracking_uri"] == "http://tuneloop-mlflow.tuneloop.svc.cluster.local:5000"


# -- accounts, Pod Security, network and mesh policies --------------------------------------------
def test_each_workload_runs_as_its_own_account_without_api_rights(rendered):
    env, objs = rendered
    values = env_values(env)
    accounts = {o["metadata"]["name"]: o for o in by_kind(objs, "ServiceAccount")}
    used = {o["metadata"]["name"]: spec["serviceAccountName"] for o in objs for _, spec in check_chart.pod_specs(o)}
    upload = values["pipeline"].get("jobServiceAccountName") or "tuneloop-pipeline-upload"
    assert used == {"tuneloop-mlflow": "tuneloop-mlflow", "tuneloop-feedback": "tuneloop-feedback",
                    "tuneloop-monitor": "tuneloop-monitor", "tuneloop-pipeline-upload": upload,
                    "tuneloop-mlflow-users": "tuneloop-mlflow-users", "tuneloop-deepspeed": "tuneloop-training"}
    assert set(accounts) == (set(used.values()) - {upload}) | {upload} - {"default-editor"} | {"tuneloop-pipeline"}
    # only the pipeline's account keeps an API token; the pods say so too
    assert {n: a["automountServiceAccountToken"] for n, a in accounts.items()} == {
        n: n == "tuneloop-pipeline" for n in accounts}
    assert all(spec["automountServiceAccountToken"] is False for _, spec in pod_specs(objs))
    # the training pods: the run config names the runtime's account for TrainJob patches and PyTorchJobs
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "tuneloop-config"]
    assert yaml.safe_load(cm["data"]["config.yaml"])["train"]["cluster"]["service_account"] == "tuneloop-training"
    assert check_chart.account_violations(objs, values) == []


def test_account_check_catches_sharing_tokens_and_dangling_names():
    values = env_values("dev")
    objs = render(values)
    deployments = {o["metadata"]["name"]: o for o in by_kind(objs, "Deployment")}
    deployments["tuneloop-feedback"]["spec"]["template"]["spec"]["serviceAccountName"] = "tuneloop-mlflow"
    (cron,) = by_kind(objs, "CronJob")
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] = "nobody"
    [sa] = [o for o in by_kind(objs, "ServiceAccount") if o["metadata"]["name"] == "tuneloop-monitor"]
    sa["automountServiceAccountToken"] = True
    problems = "\n".join(check_chart.account_violations(objs, values))
    [shared] = [line for line in problems.splitlines() if line.startswith("ServiceAccount tuneloop-mlflow is shared")]
    assert "Deployment/tuneloop-mlflow" in shared and "Deployment/tuneloop-feedback" in shared
    assert "CronJob/tuneloop-monitor spec.jobTemplate.spec.template.spec: ServiceAccount nobody is neither " \
        "rendered nor named as existing" in problems
    assert "ServiceAccount tuneloop-monitor has no RBAC, so automountServiceAccountToken must be false" in problems


def test_existing_accounts_can_be_named():
    values = with_changes(env_values("prod"), {"serviceAccounts": {"mlflow": {"create": False, "name": "mlflow-irsa"},
                                                                  "training": {"name": "gpu-trainer"}}})
    objs = render(values)
    assert "mlflow-irsa" not in {o["metadata"]["name"] for o in by_kind(objs, "ServiceAccount")}
    used = {o["metadata"]["name"]: spec["serviceAccountName"] for o in objs for _, spec in check_chart.pod_specs(o)}
    assert used["tuneloop-mlflow"] == "mlflow-irsa" and used["tuneloop-deepspeed"] == "gpu-trainer"
    assert check_chart.policy_violations(objs, values) == []


def test_every_pod_passes_the_restricted_profile_and_the_check_bites(rendered):
    env, objs = rendered
    for name, spec in pod_specs(objs):
        assert check_chart.restricted_violations(spec) == [], name
    # what the check refuses, one rule at a time
    (_, good) = pod_specs([o for o in objs if o["metadata"]["name"] == "tuneloop-feedback"
                           and o["kind"] == "Deployment"])[0]
    cases = {
        "hostNetwork must not be true": lambda p: p.update(hostNetwork=True),
        "type ['hostPath'] is not allowed": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "allowPrivilegeEscalation must be false": lambda p: p["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"),
        "capabilities.drop must contain ALL": lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
        "capabilities.add ['NET_RAW'] is not allowed": lambda p: p["containers"][0]["securityContext"][
            "capabilities"].update(add=["NET_RAW"]),
        "runAsNonRoot must be true": lambda p: [p["securityContext"].pop("runAsNonRoot"),
                                                p["containers"][0]["securityContext"].pop("runAsNonRoot")],
        "seccompProfile must be set": lambda p: p["securityContext"].pop("seccompProfile"),
        "runAsUser must not be 0": lambda p: p["securityContext"].update(runAsUser=0),
        "initContainers[init]: allowPrivilegeEscalation must be false": lambda p: p.setdefault(
            "initContainers", []).append({"name": "init", "image": "x", "securityContext": {
                "capabilities": {"drop": ["ALL"]}}}),
        "hostPort is not allowed": lambda p: p["containers"][0]["ports"][0].update(hostPort=8080),
    }
    for message, breaks in cases.items():
        spec = json.loads(json.dumps(good))
        breaks(spec)
        assert any(message in v for v in check_chart.restricted_violations(spec)), message


def test_a_weaker_namespace_lets_values_through_but_chart_check_still_fails_them():
    """enforce baseline turns the chart's guard off; helm/check_chart.py still refuses what would not
    pass `restricted`."""
    values = with_changes(env_values("dev"), {"namespace": {"podSecurity": {"enforce": "baseline"}},
                                              "containerSecurityContext": {"allowPrivilegeEscalation": True}})
    objs = render(values)
    problems = check_chart.policy_violations(objs, values)
    assert len([p for p in problems if "allowPrivilegeEscalation must be false" in p]) == 6


def test_namespace_is_opt_in_and_labelled_for_pod_security():
    assert by_kind(render(env_values("dev")), "Namespace") == []
    objs = render(with_changes(env_values("staging"), {"namespace": {
        "create": True, "podSecurity": {"warn": "restricted", "enforce": "baseline", "version": "v1.32"},
        "labels": {"istio-injection": "enabled"}}}))
    (ns,) = by_kind(objs, "Namespace")
    labels = ns["metadata"]["labels"]
    assert ns["metadata"]["name"] == "tuneloop" and "namespace" not in ns["metadata"]
    assert {k: v for k, v in labels.items() if k.startswith("pod-security")} == {
        "pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/enforce-version": "v1.32",
        "pod-security.kubernetes.io/audit": "restricted", "pod-security.kubernetes.io/audit-version": "v1.32",
        "pod-security.kubernetes.io/warn": "restricted", "pod-security.kubernetes.io/warn-version": "v1.32"}
    assert labels["istio-injection"] == "enabled"
    assert ns["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # uninstall keeps Secrets and PVCs
    assert check_chart.namespace_violations(objs) == []
    bad = json.loads(json.dumps(ns))
    bad["metadata"]["labels"]["pod-security.kubernetes.io/audit"] = "strict"
    assert check_chart.namespace_violations([bad]) == [
        "Namespace tuneloop: pod-security.kubernetes.io/audit is 'strict'"]
    import helm_python as helm

    for system in ("default", "kube-system"):
        with pytest.raises(helm.HelmRenderError, match=f"the release namespace {system} is a system namespace"):
            check_chart.render(with_changes(env_values("dev"), {"namespace": {"create": True}}), namespace=system)


def test_notes_say_how_to_label_an_existing_namespace():
    notes = check_chart.render(env_values("prod"))["tuneloop/templates/NOTES.txt"]
    assert "kubectl label --overwrite namespace tuneloop" in notes
    for mode in ("enforce", "audit", "warn"):
        assert f"pod-security.kubernetes.io/{mode}=restricted" in notes
    notes = check_chart.render(with_changes(env_values("dev"), {"namespace": {"create": True}}))[
        "tuneloop/templates/NOTES.txt"]
    assert "kubectl label" not in notes and "labelled for Pod Security: enforce=restricted" in notes


def _peers(policy: dict) -> list[dict]:
    return [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]


def test_feedback_service_admits_only_the_serving_pods_the_ingress_and_prometheus(rendered):
    env, objs = rendered
    values = env_values(env)
    policies = {o["metadata"]["name"]: o for o in by_kind(objs, "NetworkPolicy")}
    feedback = policies["tuneloop-feedback"]
    assert {p["port"] for r in feedback["spec"]["ingress"] for p in r["ports"]} == {8080}
    serving_pods = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tuneloop"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "tuneloop",
                                                    "app.kubernetes.io/instance": "tuneloop",
                                                    "app.kubernetes.io/component": "serving"}}}
    ingress = values.get("networkPolicy", {}).get("ingressNamespace")
    prometheus = values.get("networkPolicy", {}).get("prometheusNamespace")
    want = [serving_pods] + [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                             for ns in (ingress, prometheus) if ns]
    assert _peers(feedback) == want
    # the labels the platform puts on the predictor pods are the ones selected here
    from tuneloop.deploy import kserve

    cfg = _release_config(objs, Path(__import__("tempfile").mkdtemp()))
    isvc = kserve.inference_service(cfg, "1", "pvc://x/adapter", None)
    assert serving_pods["podSelector"]["matchLabels"].items() <= isvc["spec"]["predictor"]["labels"].items()
    assert isvc["metadata"]["namespace"] == "tuneloop"
    # the predictor pods are under the default deny (they carry the selector labels): Knative reaches them
    serving = policies["tuneloop-serving"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}}} \
        in _peers(serving)


def test_istio_policy_tells_the_feedback_paths_apart(rendered_with_options):
    env, objs = rendered_with_options
    (policy,) = by_kind(objs, "AuthorizationPolicy")
    assert check_chart.validate_object(policy) == ("crd", None)
    assert check_chart.authorization_policy_violations(policy) == []
    spec = policy["spec"]
    assert spec["action"] == "ALLOW"
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "feedback"
    allowed = {(tuple(r["from"][0]["source"].get("principals") or r["from"][0]["source"]["namespaces"]),
                tuple(r["to"][0]["operation"]["methods"]), tuple(r["to"][0]["operation"]["paths"]))
               for r in spec["rules"]}
    prometheus = env_values(env).get("networkPolicy", {}).get("prometheusNamespace")
    assert allowed == {
        (("cluster.local/ns/tuneloop/sa/tuneloop-serving",), ("POST",), ("/v1/kserve-events",)),
        (("cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",), ("POST",), ("/v1/feedback",)),
        *([((prometheus,), ("GET",), ("/metrics",))] if prometheus else [])}
    # the chart's Jobs run without a sidecar, which would keep them from completing
    for o in by_kind(objs, "Job") + by_kind(objs, "CronJob"):
        meta = o["spec"].get("template", {}).get("metadata") or o["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
        assert meta["labels"]["sidecar.istio.io/inject"] == "false", o["metadata"]["name"]
    # the real CRD's schema bites, and so do its CEL rules (checked in Python)
    bad = json.loads(json.dumps(policy))
    bad["spec"]["rules"][0]["to"][0]["operation"]["path"] = ["/v1/kserve-events"]
    assert "'path' was unexpected" in check_chart.validate_object(bad)[1]
    bad = json.loads(json.dumps(policy))
    bad["spec"]["targetRefs"] = [{"kind": "Service", "group": "", "name": "tuneloop-feedback"}]
    bad["spec"]["rules"][0]["from"][0]["source"]["serviceAccounts"] = ["tuneloop/tuneloop-serving"]
    assert check_chart.authorization_policy_violations(bad) == [
        "only one of targetRefs or selector can be set",
        "rules[0].from[0]: Cannot set serviceAccounts with namespaces or principals"]


def test_mlflow_clients_authenticate_as_their_own_user(rendered):
    env, objs = rendered

    def creds(env_list: list[dict]) -> tuple:
        e = {x["name"]: x.get("valueFrom", {}).get("secretKeyRef") for x in env_list}
        return (e["MLFLOW_TRACKING_USERNAME"]["name"], e["MLFLOW_TRACKING_USERNAME"]["key"],
                e["MLFLOW_TRACKING_PASSWORD"]["key"])

    (cron,) = by_kind(objs, "CronJob")
    monitor = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert creds(monitor["env"]) == ("tuneloop-mlflow-users", "monitor-username", "monitor-password")
    (runtime,) = by_kind(objs, "TrainingRuntime")
    ((_, spec),) = pod_specs([runtime])
    assert creds(spec["containers"][0]["env"]) == ("tuneloop-mlflow-users", "training-username",
                                                   "training-password")
    (job,) = [o for o in by_kind(objs, "Job") if o["metadata"]["name"] == "tuneloop-mlflow-users"]
    job_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in job["spec"]["template"]["spec"]["containers"][0]
               ["env"] if "valueFrom" in e}
    assert job_env.pop("MLFLOW_TRACKING_USERNAME") == {"name": "tuneloop-mlflow-auth", "key": "username"}
    assert job_env.pop("MLFLOW_TRACKING_PASSWORD") == {"name": "tuneloop-mlflow-auth", "key": "password"}
    assert job_env == {f"TUNELOOP_MLFLOW_{role.upper()}_{what.upper()}": {"name": "tuneloop-mlflow-users",
                                                                        "key": f"{role}-{what}"}
                       for role in ("pipeline", "monitor", "training", "serving") for what in ("username", "password")}
    # nothing but the users Job and the server sees the admin Secret
    for name, pod in pod_specs(objs):
        if name not in ("tuneloop-mlflow", "tuneloop-mlflow-users"):
            assert "tuneloop-mlflow-auth" not in json.dumps(pod), name


def test_dev_can_keep_the_admin_for_every_client():
    objs = render(with_changes(env_values("dev"), {"mlflow": {"auth": {"users": {"enabled": False}}}}))
    assert "tuneloop-mlflow-users" not in {o["metadata"]["name"] for o in objs}
    (cron,) = by_kind(objs, "CronJob")
    env = {e["name"]: e for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "tuneloop-mlflow-auth",
                                                                            "key": "password"}


# -- the chart's own service commands, run for real on this machine ------------------------------
# The prod values rendered by Helm; each container's command, args and env taken from the rendered
# Deployment as the kubelet would run them (Secrets filled in, $(VAR) expanded), on loopback
# against a real Postgres and moto's S3 server standing in for the cluster's database and bucket.


def _container(objs: list[dict], deployment: str) -> dict:
    [dep] = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"].endswith(deployment)]
    return dep["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict, secrets: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    import os
    import sys

    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the image's venv is on PATH
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[f"{ref['name']}/{ref['key']}"]
    env.update(overrides)
    return env


def test_prod_mlflow_server_runs_as_rendered_on_postgres_s3_and_basic_auth(postgres, s3_server, tmp_path,
                                                                          tiny_model_dir, monkeypatch):
    import os
    import subprocess
    import sys

    import boto3
    import httpx
    from conftest import free_port, register_version, start_until_healthy, tiny_config

    from tuneloop.config import load_config
    from tuneloop.registry import Registry

    objs = render(env_values("prod"))
    c = _container(objs, "-mlflow")
    secrets = {"tuneloop-mlflow-db/backend-store-uri": postgres("mlflow_prod"),
               "tuneloop-mlflow-db/auth-database-uri": postgres("mlflow_prod_auth"),
               "tuneloop-mlflow-s3/AWS_ACCESS_KEY_ID": "testing", "tuneloop-mlflow-s3/AWS_SECRET_ACCESS_KEY": "testing",
               "tuneloop-mlflow-auth/username": "platform-admin", "tuneloop-mlflow-auth/password": "not-a-real-secret-1",
               "tuneloop-mlflow-auth/flask-secret-key": "not-a-real-key-0123456789abcdef",
               **{f"tuneloop-mlflow-users/{role}-{what}": role if what == "username" else f"{role}-password-0123"
                  for role in ("pipeline", "monitor", "training", "serving") for what in ("username", "password")}}
    bucket = env_values("prod")["mlflow"]["artifacts"]["destination"].removeprefix("s3://").split("/")[0]
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    # what differs from the pod: the S3 endpoint (moto instead of AWS), the port, and where the auth
    # ini is written (the pod's /tmp is its own emptyDir)
    env = _env(c, secrets, {"MLFLOW_S3_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
                            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini")})
    port = free_port()
    script = c["args"][0]
    for old, new in (("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}"),
                     ("> /tmp/basic_auth.ini", f"> {tmp_path / 'basic_auth.ini'}")):
        assert old in script, f"the rendered MLflow command no longer has {old!r}"
        script = script.replace(old, new)
    url = f"http://127.0.0.1:{port}"
    proc = start_until_healthy([*c["command"], script], f"{url}/health", tmp_path / "mlflow.log", env)
    try:
        r = httpx.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1})
        assert r.status_code == 401, "prod MLflow must refuse anonymous requests"
        # the MLflow users hook Job, as rendered: the release's run config (pointed at this server),
        # the admin's and each user's credentials from the Secrets
        (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "tuneloop-config"]
        release_cfg = yaml.safe_load(cm["data"]["config.yaml"])
        release_cfg["registry"]["tracking_uri"] = url
        (tmp_path / "release.yaml").write_text(yaml.safe_dump(release_cfg))
        [job] = [o for o in by_kind(objs, "Job") if o["metadata"]["name"] == "tuneloop-mlflow-users"]
        jc = job["spec"]["template"]["spec"]["containers"][0]
        argv = [sys.executable if a == "python" else str(tmp_path / "release.yaml")
                if a == "/etc/tuneloop/config.yaml" else a for a in jc["command"]]
        done = subprocess.run(argv, env=_env(jc, secrets, {}), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "pipeline: user pipeline created" in done.stderr and "password-0123" not in done.stdout + done.stderr
        # the pipeline tasks authenticate with what the run config's kubernetes.secrets name: the pipeline user
        cfg = load_config(tiny_config(tmp_path, tiny_model_dir, registry__tracking_uri=url,
                                      registry__experiment=release_cfg["registry"]["experiment"],
                                      registry__model_name=release_cfg["registry"]["model_name"]))
        task_env = {e["name"]: secrets[f"{e['secret']}/{e['key']}"] for e in release_cfg["kubernetes"]["secrets"]
                    if e["name"].startswith("MLFLOW_TRACKING_")}
        assert task_env["MLFLOW_TRACKING_USERNAME"] == "pipeline"
        for k, v in task_env.items():
            monkeypatch.setenv(k, v)
        reg = Registry(cfg)
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text('{"r": 8}')
        reg.set_alias("champion", register_version(reg, adapter, "prod-1"))
        got = reg.download_adapter(reg.alias_version("champion"), tmp_path / "cache")
        assert (got / "adapter_config.json").read_text() == '{"r": 8}'
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                                               aws_secret_access_key="testing", region_name="us-east-1")
                .list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.endswith("adapter_config.json") for k in keys), f"artifacts did not land in S3: {keys}"
        # the monitor, with the credentials of the rendered CronJob: reads the champion, records its run,
        # cannot move the alias (prod's default permission is NO_PERMISSIONS)
        (cron,) = by_kind(objs, "CronJob")
        for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]:
            if e["name"] in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                ref = e["valueFrom"]["secretKeyRef"]
                monkeypatch.setenv(e["name"], secrets[f"{ref['name']}/{ref['key']}"])
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "monitor"
        mon = Registry(cfg)
        assert mon.alias_version("champion") is not None
        mon.record_run("monitor-check", {"tuneloop.stage": "monitor"}, {"window_requests": 1.0})
        from mlflow.exceptions import MlflowException

        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission denied"):
            mon.set_alias("champion", "1")
    finally:
        proc.terminate()
        proc.wait(30)


def test_prod_feedback_service_runs_as_rendered_on_postgres(postgres, tmp_path):
    import re as _re

    import httpx
    from conftest import free_port, start_until_healthy

    from tuneloop.feedback.store import FeedbackStore

    from tuneloop.feedback.auth import key_line, new_token

    objs = render(env_values("prod"))
    c = _container(objs, "-feedback")
    db = postgres("feedback_prod")
    events, feedback = new_token(), new_token()  # KServe's payload logger, the app forwarding users' ratings
    env = _env(c, {"tuneloop-feedback-db/database-url": db,
                   "tuneloop-feedback-auth/api-keys": "\n".join([key_line("kserve-logger", ["events"], events),
                                                                 key_line("app", ["feedback"], feedback)]),
                   "tuneloop-feedback-auth/user-id-secret": "not-a-real-user-id-secret-0123456789"}, {})
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "tuneloop-config"]
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"])  # the pod's /etc/tuneloop/config.yaml
    argv = [*c["command"], *(_re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"])]
    argv = [str(tmp_path / "config.yaml") if a == "/etc/tuneloop/config.yaml" else a for a in argv]
    assert not any(db in a for a in argv), "the database URL must not be on the command line"
    port = free_port()
    i = argv.index("--port")
    argv[i + 1: i + 2] = [str(port), "--host", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    proc = start_until_healthy(argv, f"{url}/healthz", tmp_path / "feedback.log", env)
    try:
        # the first write waits for the store's warm-up (Presidio's first load): a long timeout
        http = httpx.Client(timeout=120)
        h = {"ce-id": "ev-1", "ce-inferenceservicename": "tuneloop"}
        assert http.post(f"{url}/v1/feedback", json={"request_id": "ev-1", "rating": 5}).status_code == 401
        assert http.post(f"{url}/v1/feedback", json={"request_id": "ev-1", "rating": 5},
                         headers={"Authorization": f"Bearer {events}"}).status_code == 403  # events scope only
        http.post(f"{url}/v1/kserve-events", params={"version": "2", "variant": "canary", "access_token": events},
                  headers={**h, "ce-type": "org.kubeflow.serving.inference.request"},
                  json={"messages": [{"role": "user", "content": "refund please"}]}).raise_for_status()
        http.post(f"{url}/v1/kserve-events", params={"access_token": events},
                  headers={**h, "ce-type": "org.kubeflow.serving.inference.response"},
                  json={"choices": [{"message": {"content": "billing"}}]}).raise_for_status()
        http.post(f"{url}/v1/feedback", json={"request_id": "ev-1", "rating": 5},
                  headers={"Authorization": f"Bearer {feedback}"}).raise_for_status()
    finally:
        http.close()
        proc.terminate()
        proc.wait(30)
    [row] = FeedbackStore(db).rows()
    assert (row["model_version"], row["variant"], row["output"], row["score"]) == ("2", "canary", "billing", 1.0)


def _release_config(objs: list[dict], tmp_path: Path):  # noqa: ANN202 - the RunConfig of the ConfigMap
    from tuneloop.config import load_config

    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "tuneloop-config"]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_config(path)


def test_release_pipeline_and_monitor_reach_the_release_services(rendered, tmp_path):
    """What the chart installs fits together: the pipeline compiled from the release's run config
    (as the upload Job does) mounts the state volume at state_dir in every task and carries the
    MLflow credentials and the feedback database as env; the monitor reads the same store; KServe's
    payload logger posts to the chart's feedback service."""
    import jsonschema

    from tuneloop.deploy import kserve
    from tuneloop.orchestrate import compile_pipeline

    env, objs = rendered
    values = env_values(env)
    cfg = _release_config(objs, tmp_path)
    claim, mount = values["stateVolume"]["existingClaim"], cfg.state_dir
    feedback_secret = values.get("feedback", {}).get("database", {}).get("existingSecret")

    [upload] = [o for o in by_kind(objs, "Job") if o["metadata"]["name"] == "tuneloop-pipeline-upload"]
    job_script = upload["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "tuneloop compile --config /etc/tuneloop/config.yaml --out /tmp/pipeline.yaml" in job_script
    assert "--package /tmp/pipeline.yaml" in job_script
    out = compile_pipeline(tmp_path / "pipeline.yaml", cfg)
    executors = list(yaml.safe_load_all(out.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, spec in executors.items():
        [pvc] = spec["pvcMount"]
        assert (pvc["constant"], pvc["mountPath"]) == (claim, mount), name
        envs = {e["envVar"]: (s["secretName"], e["secretKey"]) for s in spec["secretAsEnv"] for e in s["keyToEnv"]}
        # the pipeline's own MLflow user, not the admin
        assert envs["MLFLOW_TRACKING_USERNAME"] == ("tuneloop-mlflow-users", "pipeline-username"), name
        assert envs["MLFLOW_TRACKING_PASSWORD"] == ("tuneloop-mlflow-users", "pipeline-password"), name
        if feedback_secret:
            assert envs[cfg.deploy.feedback_store_env] == (feedback_secret, "database-url"), name

    (cron,) = by_kind(objs, "CronJob")
    monitor = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    monitor_env = {e["name"]: e for e in monitor["containers"][0]["env"]}
    assert [m["mountPath"] for m in monitor["containers"][0]["volumeMounts"] if m["name"] == "state"] == [mount]
    feedback = _container(objs, "-feedback")
    if feedback_secret:  # Postgres: the monitor reads the same database the service writes
        assert monitor_env[cfg.deploy.feedback_store_env]["valueFrom"]["secretKeyRef"]["name"] == feedback_secret
    else:  # sqlite on the state volume, where the pipeline's ingest and the monitor look by default
        assert cfg.deploy.feedback_store_env is None
        url = {e["name"]: e for e in feedback["env"]}["DATABASE_URL"]["value"]
        assert url == f"sqlite:///{cfg.state_path / 'feedback.db'}"
        assert {"name": "data", "mountPath": mount} in feedback["volumeMounts"]

    isvc = kserve.inference_service(cfg, "3", kserve.storage_uri("mlflow-artifacts:/1/abc/artifacts/adapter", cfg)
                                    if cfg.deploy.kserve.artifact_store_uri else "pvc://x/adapter", 10)
    crd = yaml.safe_load((ROOT / "tests" / "crds" / "serving.kserve.io_inferenceservices.yaml").read_text())
    jsonschema.validate(isvc, next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
                        ["schema"]["openAPIV3Schema"])
    logger = isvc["spec"]["predictor"]["logger"]["url"]
    (svc,) = [o for o in by_kind(objs, "Service") if o["metadata"]["name"] == "tuneloop-feedback"]
    assert logger.startswith(f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:"
                             f"{svc['spec']['ports'][0]['port']}/v1/kserve-events"), logger
    assert isvc["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert isvc["spec"]["predictor"]["storageUris"][0]["uri"] == f"pvc://{claim}/models/base"


# -- alerts: the PrometheusRule ------------------------------------------------------------------------------
def _rule_names(groups: list[dict]) -> list[tuple[str, list[str]]]:
    return [(g["name"], [r.get("alert") or r.get("record") for r in g["rules"]]) for g in groups]


def test_prometheus_rule_is_opt_in(rendered):
    env, objs = rendered
    assert by_kind(objs, "PrometheusRule") == [], env


def test_prometheus_rule_is_the_plain_rules_file_and_valid_against_the_operator_crd(rendered_with_options):
    env, objs = rendered_with_options
    (rule,) = by_kind(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["namespace"] == "tuneloop"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # alerts.labels: the ruleSelector's
    assert check_chart.validate_object(rule) == ("crd", None)
    assert check_chart.prometheus_rule_violations(rule) == []
    how, out = check_chart.promtool_check(rule["spec"]["groups"])
    assert how in ("ok", "skipped"), out
    plain = yaml.safe_load((check_chart.CHART / "files" / "prometheus-rules.yaml").read_text())["groups"]
    assert _rule_names(rule["spec"]["groups"]) == _rule_names(plain)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for name, r in alerts.items():  # the plain file's rules, plus alerts.ruleLabels on every alert
        (orig,) = [o for g in plain for o in g["rules"] if o.get("alert") == name]
        assert r["expr"] == orig["expr"] and r["labels"] == {**orig["labels"], "team": "ml-platform"}, name
        assert r["labels"]["severity"] in ("critical", "warning", "info") and r["annotations"]["summary"], name
    assert {"TuneloopErrorRateHigh", "TuneloopLatencyP95High", "TuneloopLatencyP99High", "TuneloopCanaryRolledBack",
            "TuneloopFeedbackOutOfControl", "TuneloopPromptDrift", "TuneloopRequestLogRejected",
            "TuneloopRequestLogDropped", "TuneloopMonitorSLOBreach"} <= set(alerts)
    # the error-rate SLO of the run config's monitor section (default 0.01) is the threshold
    assert "tuneloop_variant:request_error_ratio:rate > 0.01 " in alerts["TuneloopErrorRateHigh"]["expr"]


def test_prometheus_rule_checks_bite():
    values = with_changes(env_values("staging"), {"alerts": {"enabled": True}})
    (rule,) = by_kind(render(values), "PrometheusRule")
    assert "team" not in json.dumps([r["labels"] for g in rule["spec"]["groups"] for r in g["rules"] if "labels" in r])
    bad = json.loads(json.dumps(rule))
    bad["spec"]["groups"][0]["rules"][3]["for"] = "5 minutes"
    assert "does not match" in check_chart.validate_object(bad)[1]
    bad = json.loads(json.dumps(rule))
    bad["spec"]["groups"][0]["rules"][3]["severity"] = "critical"  # belongs under labels
    assert "'severity' was unexpected" in check_chart.validate_object(bad)[1]
    bad = json.loads(json.dumps(rule))
    bad["spec"]["groups"][1]["name"] = bad["spec"]["groups"][0]["name"]
    bad["spec"]["groups"][0]["rules"][0]["alert"] = "Both"
    assert check_chart.prometheus_rule_violations(bad) == [
        "groups: the name 'tuneloop-serving' is used twice (spec.groups is a map keyed by name)",
        "groups[tuneloop-serving].rules[0]: exactly one of `alert` and `record`"]
    if shutil.which("promtool"):
        bad = json.loads(json.dumps(rule))
        bad["spec"]["groups"][0]["rules"][3]["expr"] = "rate(tuneloop_requests_total[5m] > 0"
        how, out = check_chart.promtool_check(bad["spec"]["groups"])
        assert how == "failed" and "parse error" in out
        assert any("promtool check rules" in v for v in check_chart.policy_violations([bad], values))


def test_alerts_groups_replace_the_bundled_rules():
    groups = [{"name": "custom", "rules": [{"alert": "GatewayDown", "expr": "up == 0", "for": "1m"}]}]
    values = with_changes(env_values("prod"), {"alerts": {"enabled": True, "groups": groups}})
    (rule,) = by_kind(render(values), "PrometheusRule")
    assert rule["spec"]["groups"] == groups and check_chart.validate_object(rule) == ("crd", None)


def test_tracing_reaches_the_pipeline_tasks_and_training_pods(rendered_with_options, tmp_path):
    """With tracing on, the pods the chart does not create - KFP's task pods and the training pods - get the
    same OTEL_* variables as the chart's own workloads, through the run config's kubernetes.env."""
    from tuneloop.orchestrate import compile_pipeline
    from tuneloop.train.k8s import container_env

    env, objs = rendered_with_options
    cfg = _release_config(objs, tmp_path)
    want = {"OTEL_EXPORTER_OTLP_ENDPOINT": check_chart.OPTIONS["tracing"]["otlpEndpoint"],
            "OTEL_SERVICE_NAME": "tuneloop-pipeline", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    assert want.items() <= cfg.kubernetes.env.items()
    feedback = {e["name"]: e.get("value") for e in _container(objs, "-feedback")["env"]}
    assert feedback["OTEL_EXPORTER_OTLP_ENDPOINT"] == want["OTEL_EXPORTER_OTLP_ENDPOINT"]
    out = compile_pipeline(tmp_path / "pipeline.yaml", cfg)
    docs = list(yaml.safe_load_all(out.read_text()))
    for name, ex in docs[0]["deploymentSpec"]["executors"].items():
        task_env = {e["name"]: e["value"] for e in ex["container"].get("env", [])}
        assert want.items() <= task_env.items(), name
    pod_env = {e["name"]: e.get("value") for e in container_env(cfg)}
    assert want.items() <= pod_env.items()
