"""Run, compile, submit and schedule the pipeline; read a finished run back for the summary.

Locally the pipeline runs through kfp.local's SubprocessRunner in this environment, with
the `tuneloop serve` gateway standing in for KServe (started for the run if none answers).
On a cluster the same pipeline function is submitted with kfp.Client.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig

log = logging.getLogger("tuneloop.orchestrate")


def compiled_path() -> Path:
    """The committed YAML: next to the pipeline source (falls back to the installed package)."""
    import tuneloop.pipelines as p

    return Path(p.__file__).parent / "continuous_training.yaml"


def pipeline_for(cfg: RunConfig | None):  # noqa: ANN201 - a KFP pipeline
    """The pipeline with a config's platform settings (the default platform without a config)."""
    from tuneloop.pipelines.continuous_training import build_pipeline, continuous_training

    if cfg is None:
        return continuous_training
    check_cluster_paths(cfg)
    return build_pipeline(cfg.platform, cfg.kubernetes, cfg.train.timeout_minutes, cfg.train.nproc_per_node,
                          cfg.state_dir)


def check_cluster_paths(cfg: RunConfig) -> None:
    """A cluster run's tasks see the state volume (kubernetes.state_pvc) at state_dir and nothing
    else of the submitting machine: every local path the tasks read must lie below state_dir.
    ConfigError naming the first key that does not."""
    from pathlib import PurePosixPath

    from tuneloop.config import ConfigError

    if not cfg.kubernetes.state_pvc:
        return
    state = PurePosixPath(cfg.state_dir)
    if not state.is_absolute():
        raise ConfigError(f"state_dir: {cfg.state_dir!r} must be an absolute path on a cluster: kubernetes.state_pvc "
                          "is mounted there in every task")
    paths = [("base_model.path", cfg.base_model.path)]
    paths += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(cfg.data.sources)]
    paths += [(f"data.eval[{i}].path", s.path) for i, s in enumerate(cfg.data.eval)]
    paths += [("deploy.canary.traffic_file", cfg.deploy.canary.traffic_file)]
    for key, p in paths:
        if p and p.startswith("/") and state not in PurePosixPath(p).parents:
            raise ConfigError(f"{key}: {p} is not below state_dir {cfg.state_dir}; the pipeline's tasks only see "
                              f"the state volume ({cfg.kubernetes.state_pvc}), mounted at state_dir")


def compile_pipeline(out: Path, cfg: RunConfig | None = None) -> Path:
    from kfp import compiler

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_for(cfg), str(out))
    return out


def compiled_is_current(committed: Path) -> tuple[bool, str]:
    """Compile to a temp file and compare with the committed YAML; (same, unified diff)."""
    import difflib

    with tempfile.TemporaryDirectory() as d:
        fresh = compile_pipeline(Path(d) / "p.yaml").read_text()
    old = committed.read_text() if committed.exists() else ""
    diff = "".join(difflib.unified_diff(old.splitlines(True), fresh.splitlines(True), str(committed), "compiled"))
    return not diff, diff


def new_run_name(cfg: RunConfig) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_local(cfg: RunConfig, run_name: str | None = None, warm_tasks: bool = True) -> dict[str, Any]:
    """Run the whole pipeline on this machine; returns the summary read back from MLflow. With `warm_tasks`,
    kfp.local's task processes are forked from one warm interpreter (tuneloop.warm_tasks) instead of started
    cold."""
    from kfp import local

    from tuneloop.deploy.canary import start_gateway, stop_gateway
    from tuneloop.env import apply_defaults
    from tuneloop.pipelines.continuous_training import continuous_training
    from tuneloop.warm_tasks import warm_kfp_local_tasks

    run_name = run_name or new_run_name(cfg)
    apply_defaults()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with warm_kfp_local_tasks(warm_tasks):  # started first: its imports overlap the gateway's start
        gateway = start_gateway(cfg) if cfg.deploy.backend == "local" else None
        try:
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(cfg.state_path / "kfp"),
                       raise_on_error=True)
            continuous_training(config=cfg.to_pipeline_param(), run_name=run_name)
        finally:
            stop_gateway(gateway)
    summary = read_summary(cfg, run_name)
    summary["pipeline_wall_s"] = time.perf_counter() - started
    return summary


def read_summary(cfg: RunConfig, run_name: str) -> dict[str, Any]:
    """Stages, outcomes, wall times, gate figures, model version and aliases of one run."""
    from tuneloop.registry import Registry

    reg = Registry(cfg)
    parent = reg.pipeline_run(run_name)
    if parent is None:
        raise RuntimeError(f"no MLflow run named {run_name!r} in experiment {cfg.registry.experiment}")
    pid, exp = parent.info.run_id, parent.info.experiment_id
    stages = []
    extra: dict[str, Any] = {}
    for ch in reg.stage_runs(pid):
        name = ch.data.tags.get("tuneloop.stage", ch.info.run_name)
        stages.append({"stage": name, "status": ch.info.status, "outcome": ch.data.tags.get("tuneloop.outcome", ""),
                       "wall_s": ch.data.metrics.get("stage_wall_s")})
        for stage, artifact in (("evaluate", "evaluation/gate.json"), ("evaluate", "evaluation/metrics.json"),
                                ("validate_data", "validation/report.json"), ("analyze_canary", "canary/canary.json"),
                                ("reward", "reward/reward_eval.json"), ("rl", "rl/rl_watch.json"),
                                ("repair", "repair/ladder.json")):
            if name == stage:
                try:
                    extra[artifact] = json.loads(reg.download_run_artifact(ch.info.run_id, artifact).read_text())
                except Exception:  # noqa: BLE001 - a stage that failed early has no artifact
                    pass
    version = parent.data.tags.get("tuneloop.model_version")
    return {"run_name": run_name, "parent_run_id": pid, "experiment_id": exp, "tracking_uri": reg.uri,
            "outcome": parent.data.tags.get("tuneloop.outcome", parent.info.status), "stages": stages,
            "gate": extra.get("evaluation/gate.json"), "metrics": extra.get("evaluation/metrics.json"),
            "validation": extra.get("validation/report.json"), "canary": extra.get("canary/canary.json"),
            "reward": extra.get("reward/reward_eval.json"), "rl": extra.get("rl/rl_watch.json"),
            "repair": extra.get("repair/ladder.json"),
            "model_name": cfg.registry.model_name, "model_version": version, "aliases": reg.aliases()}


def submit(cfg: RunConfig, host: str, experiment: str, run_name: str | None,
           namespace: str | None = None) -> str:
    """Create a run on a Kubeflow Pipelines endpoint; returns the run id."""
    import kfp

    name = run_name or new_run_name(cfg)
    client = kfp.Client(host=host, namespace=namespace)
    run = client.create_run_from_pipeline_func(
        pipeline_for(cfg), arguments={"config": cfg.to_pipeline_param(), "run_name": name},
        run_name=name, experiment_name=experiment, enable_caching=False,
        service_account=cfg.kubernetes.service_account)
    return run.run_id


def schedule(cfg: RunConfig, host: str, experiment: str, cron: str, job_name: str,
             namespace: str | None = None, max_concurrency: int = 1, replace: bool = False) -> str:
    """Create a recurring run (cron in KFP's 6-field form, seconds first); returns its id.
    With `replace`, recurring runs of the same name in the experiment are deleted first, so
    scheduling again (a Helm upgrade) updates the schedule instead of adding a second one."""
    import kfp

    client = kfp.Client(host=host, namespace=namespace)
    exp = client.create_experiment(experiment, namespace=namespace)
    if replace:
        same_name = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS",
                                                "string_value": job_name}]})
        found = client.list_recurring_runs(experiment_id=exp.experiment_id, page_size=100, filter=same_name)
        for old in found.recurring_runs or []:
            client.delete_recurring_run(old.recurring_run_id)
            log.info("deleted recurring run %s (%s)", old.recurring_run_id, job_name)
    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(Path(d) / "pipeline.yaml", cfg)
        rr = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron,
            max_concurrency=max_concurrency, pipeline_package_path=str(package),
            params={"config": cfg.to_pipeline_param(), "run_name": job_name}, enable_caching=False,
            service_account=cfg.kubernetes.service_account)
    return rr.recurring_run_id


def upload_pipeline(host: str, pipeline_name: str, version_name: str, package: Path | None = None,
                    description: str | None = None, namespace: str | None = None) -> dict[str, str]:
    """Upload the compiled pipeline to Kubeflow Pipelines: a new pipeline the first time, a new
    version of it afterwards. Returns {"pipeline_id", "version_id"}."""
    import kfp

    package = package or compiled_path()
    client = kfp.Client(host=host, namespace=namespace)
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline_name, description=description,
                                             namespace=namespace).pipeline_id
    version = client.upload_pipeline_version(str(package), pipeline_version_name=version_name,
                                             pipeline_id=pipeline_id, description=description)
    return {"pipeline_id": pipeline_id, "version_id": version.pipeline_version_id}


def run_direct(cfg: RunConfig, run_name: str | None = None, work: Path | None = None) -> dict[str, Any]:
    """The same DAG as pipelines/continuous_training.py, calling the stage functions in this
    process with no orchestrator (for debugging and as the overhead benchmark's baseline).
    The gateway must already be running for the local deploy backend."""
    from tuneloop import stages
    from tuneloop.pipelines.continuous_training import STOP_DATA_GATE, STOP_EVALUATION_GATE

    run_name = run_name or new_run_name(cfg)
    work = work or Path(tempfile.mkdtemp(prefix="tuneloop-direct-"))
    pid = stages.check_prerequisites(cfg, run_name, run_name)["parent_run_id"]
    stages.ingest_stage(cfg, pid, work / "dataset")
    if not stages.validate_stage(cfg, pid, work / "dataset", work / "validation")["passed"]:
        stages.stop_stage(cfg, pid, STOP_DATA_GATE)
        return read_summary(cfg, run_name)
    stages.sft_stage(cfg, pid, work / "dataset", work / "sft")
    stages.dpo_stage(cfg, pid, work / "dataset", work / "sft", work / "dpo")
    stages.reward_stage(cfg, pid, work / "dataset", work / "reward")
    stages.rl_stage(cfg, pid, work / "dpo", work / "reward", work / "rl")
    stages.merge_stage(cfg, pid, work / "dataset", work / "rl", work / "merge")
    stages.evaluate_stage(cfg, pid, work / "dataset", work / "merge", work / "evaluation")
    repaired = stages.repair_stage(cfg, pid, work / "dataset", work / "merge", work / "evaluation", work / "repair")
    if not repaired["passed"]:
        stages.stop_stage(cfg, pid, STOP_EVALUATION_GATE)
        return read_summary(cfg, run_name)
    r = work / "repair"
    version = stages.register_stage(cfg, pid, r, r / "evaluation", r / "dataset")["version"]
    deployed_at = stages.deploy_canary_stage(cfg, pid, version)["deployed_at"]
    decision = stages.analyze_canary_stage(cfg, pid, version, deployed_at, work / "canary")["decision"]
    (stages.promote_stage if decision == "promote" else stages.rollback_stage)(cfg, pid, version)
    return read_summary(cfg, run_name)
