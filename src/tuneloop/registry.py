"""MLflow: one parent run per pipeline run, a nested run per stage, the model registry.

A registered model version is an MLflow model (a logged model of the pipeline run, built by
deploy/mlflow_model.py: a pyfunc whose folder is also the LoRA adapter folder) plus tags that say
which base model it applies to and where it came from (data hash, pipeline run, git sha); its
source run is the pipeline run. (A bare adapter folder is still registered as it is, from the
pipeline run's artifacts.) Aliases carry the rollout state:
    challenger  passed the gate, registered
    canary      serving a share of traffic
    shadow      receiving a mirror of all traffic, answers logged only (deploy.canary.mode: shadow)
    champion    serving everyone
    previous    the champion before the last promotion (rollback target)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

log = logging.getLogger("tuneloop.registry")

ALIASES = ("challenger", "canary", "shadow", "champion", "previous")
TAG_PIPELINE_RUN = "tuneloop.pipeline_run_id"
TAG_KFP_RUN = "tuneloop.kfp_run_id"
TAG_DATA_HASH = "tuneloop.data_hash"
TAG_GIT_SHA = "tuneloop.git_sha"
TAG_STAGE = "tuneloop.stage"
TAG_BASE_MODEL = "tuneloop.base_model"
TAG_BASE_PATH = "tuneloop.base_model_path"
TAG_CANARY_PERCENT = "tuneloop.canary_percent"
TAG_TRAINED_SLICES = "tuneloop.trained_slices"  # slices the version learned: each must stay evaluated
TAG_HOST = "tuneloop.host"  # the host of the process that opened the run
TAG_PROCESS = "tuneloop.process"  # that process: "pid:start" (start time in clock ticks since boot, so a reused
TAG_DRIVER = "tuneloop.driver"  # pid is told apart); the driver: the process running the whole pipeline here
NOTE = "mlflow.note.content"  # a run's description in the MLflow UI


class RegistryUnavailable(RuntimeError):
    """The registry did not answer (as opposed to answering "no such alias")."""


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TUNELOOP_GIT_SHA", "unknown")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None where unreadable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def process_id(pid: int | None = None) -> str | None:
    """"pid:start" of a process on this host (None where /proc cannot tell)."""
    pid = os.getpid() if pid is None else pid
    f = _stat(pid)
    return f"{pid}:{f[19]}" if f and len(f) > 19 else None


def process_alive(ident: str) -> bool | None:
    """Whether the process "pid:start" still runs on this host; None when this host cannot tell."""
    if not Path("/proc/self/stat").exists():
        return None
    pid = ident.split(":")[0]
    return pid.isdigit() and process_id(int(pid)) == ident


def driver_id() -> str | None:
    """The process that runs the whole pipeline on this host: this one, or - in a kfp.local task (a
    `sh -c ... python -m kfp.dsl.executor_main` child of the driver) - the nearest Python ancestor.
    None in a cluster task (no Python ancestor in the pod) or where /proc cannot tell."""
    if os.environ.get("_KFP_RUNTIME") != "true":
        return process_id()
    pid = os.getppid()
    for _ in range(6):
        f = _stat(pid)
        if f is None or pid <= 1:
            return None
        try:
            if Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python"):
                return process_id(pid)
        except OSError:
            pass
        pid = int(f[1])
    return None


def opened_by() -> dict[str, str]:
    """Tags naming the process that opens a run (what a later run needs to tell it was abandoned)."""
    ident = process_id()
    return {TAG_HOST: socket.gethostname(), **({TAG_PROCESS: ident} if ident else {})}


class Registry:
    """Thin wrapper over MlflowClient bound to one config's tracking URI and model name."""

    def __init__(self, cfg: RunConfig, name: str | None = None) -> None:
        """`name`: the registered model this handle works on (default registry.model_name)."""
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = cfg.tracking_uri
        if self.uri.startswith("sqlite:"):
            cfg.state_path.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(self.uri, self.uri)
        self.name = name or cfg.registry.model_name

    # -- experiments and runs --
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.registry.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.cfg.registry.experiment,
                                                 artifact_location=self.cfg.artifact_location)
        except Exception:  # created concurrently by another task
            return self.client.get_experiment_by_name(self.cfg.registry.experiment).experiment_id

    def pipeline_run_of_kfp(self, kfp_run_id: str) -> Any | None:
        """The parent run opened for a KFP run id (None if none was)."""
        if not kfp_run_id:
            return None
        found = self.client.search_runs([self.experiment_id()], f"tags.`{TAG_KFP_RUN}` = '{kfp_run_id}'",
                                        max_results=20)
        found = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        return found[0] if found else None

    def start_pipeline_run(self, run_name: str, kfp_run_id: str, params: dict[str, Any]) -> str:
        """The parent run of one pipeline run (idempotent on the KFP run id)."""
        exp = self.experiment_id()
        found = self.pipeline_run_of_kfp(kfp_run_id)
        if found is not None:
            return found.info.run_id
        driver = driver_id()
        run = self.client.create_run(exp, run_name=run_name, tags={
            TAG_KFP_RUN: kfp_run_id, TAG_GIT_SHA: git_sha(), "tuneloop.loop": self.cfg.name, **opened_by(),
            **({TAG_DRIVER: driver} if driver else {})})
        for k, v in params.items():
            self.client.log_param(run.info.run_id, k, str(v)[:6000])
        return run.info.run_id

    @contextlib.contextmanager
    def stage_run(self, parent_id: str, stage: str) -> Iterator[str]:
        """A nested run for one stage; FAILED if the stage raises."""
        parent = self.client.get_run(parent_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=stage, tags={
            "mlflow.parentRunId": parent_id, TAG_STAGE: stage,
            TAG_KFP_RUN: parent.data.tags.get(TAG_KFP_RUN, ""), TAG_GIT_SHA: parent.data.tags.get(TAG_GIT_SHA, ""),
            **opened_by()})
        rid = run.info.run_id
        try:
            yield rid
        except BaseException as e:
            self._record_failure(rid, stage, e)
            raise
        self.client.set_terminated(rid, "FINISHED")

    def _record_failure(self, run_id: str, stage: str, error: BaseException) -> None:
        """A failed stage's run says why: the error's first line as tag, and as description with the
        message's last lines (a training worker's last log lines); the whole message as error.txt;
        KILLED for an interrupt or SIGTERM."""
        import tempfile
        import traceback

        lines = str(error).strip().splitlines() or [type(error).__name__]
        first = lines[0][:500]
        note = f"**{stage} failed** ({type(error).__name__}): {first}"
        if len(lines) > 1:
            tail = "\n".join(line[:240] for line in lines[1:][-15:])
            note += f"\n\nlast lines (all of them in `failure/error.txt`):\n\n```\n{tail}\n```"
        try:
            self.client.set_tag(run_id, "tuneloop.error", first)
            self.client.set_tag(run_id, "tuneloop.outcome", f"FAILED: {first}")
            self.client.set_tag(run_id, NOTE, note[:8000])
            with tempfile.TemporaryDirectory() as d:
                Path(d, "error.txt").write_text(
                    f"{type(error).__name__}: {error}\n\n" + "".join(traceback.format_exception(error)))
                self.client.log_artifacts(run_id, d, "failure")
        finally:
            killed = isinstance(error, (KeyboardInterrupt, SystemExit))
            self.client.set_terminated(run_id, "KILLED" if killed else "FAILED")

    def finish_pipeline_run(self, parent_id: str, outcome: str, status: str | None = None) -> None:
        self.client.set_tag(parent_id, "tuneloop.outcome", outcome)
        status = status or ("FAILED" if outcome.startswith("failed") else "FINISHED")
        self.client.set_terminated(parent_id, status)

    def close_run(self, run_id: str, status: str, outcome: str, tags: dict[str, str] | None = None) -> None:
        """Close a run someone else left open (KILLED/FAILED) with the outcome and why."""
        for k, v in {"tuneloop.outcome": outcome, **(tags or {})}.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status)

    # -- runs an earlier process left open --
    def _timeouts(self) -> tuple[float, float, float]:
        """(a training task's timeout, any other task's, the retries' backoff in all) in seconds, as the
        pipeline sets them (pipelines/continuous_training.py)."""
        p = self.cfg.platform
        backoff = sum(min(p.retry_backoff_s * 2 ** i, 3600) for i in range(p.retries))
        return self.cfg.train.timeout_minutes * 60 + 600, p.task_timeout_minutes * 60, backoff

    def abandoned_runs(self, keep_kfp_run: str = "", now: float | None = None) -> tuple[list, list]:
        """Runs of this experiment that an earlier process left RUNNING: ([(stage run, why)],
        [(pipeline run, why)]). Nothing is changed here; the caller closes them.

        A stage run is abandoned when the process that opened it (tags tuneloop.host/.process) is gone
        from this host - its pid no longer runs, or runs another program (a reused pid has another start
        time) - or, anywhere, when it has been open longer than its task's timeout plus 10 minutes (KFP
        ended that task). A pipeline run is abandoned when none of its stage runs is still open (or all
        open ones are abandoned) and either its driver on this host is gone, or nothing happened in it
        (no stage run opened or closed) for longer than a task may take plus the retries' backoff plus 10
        minutes: then no task of it is running or will start. Runs without tuneloop's tags, the pipeline
        run of `keep_kfp_run` (a retried task of this run) and runs of other hosts within their time are
        never touched."""
        now_ms = (time.time() if now is None else now) * 1000
        train_s, task_s, backoff_s = self._timeouts()
        host, margin = socket.gethostname(), 600
        found = self.client.search_runs([self.experiment_id()], "attributes.status = 'RUNNING'", max_results=1000)
        found = [r for r in found if TAG_KFP_RUN in r.data.tags]

        def gone(r: Any, key: str) -> bool:
            ident = r.data.tags.get(key)
            return bool(ident) and r.data.tags.get(TAG_HOST) == host and process_alive(ident) is False

        stages: list[tuple[Any, str]] = []
        for r in found:
            if "mlflow.parentRunId" not in r.data.tags:
                continue
            stage = r.data.tags.get(TAG_STAGE, r.info.run_name)
            limit = (train_s if stage in ("sft", "dpo") else task_s) + margin
            if gone(r, TAG_PROCESS):
                stages.append((r, f"its process ({r.data.tags[TAG_PROCESS].split(':')[0]} on {host}) is gone"))
            elif now_ms - r.info.start_time > limit * 1000:
                stages.append((r, f"open for {(now_ms - r.info.start_time) / 60000:.0f} min, longer than its "
                                  f"task's timeout ({limit / 60:.0f} min with margin)"))
        closing = {r.info.run_id for r, _ in stages}
        parents: list[tuple[Any, str]] = []
        quiet_s = max(train_s, task_s) + backoff_s + margin
        for r in found:
            if "mlflow.parentRunId" in r.data.tags or (keep_kfp_run and r.data.tags.get(TAG_KFP_RUN) == keep_kfp_run):
                continue
            children = self.stage_runs(r.info.run_id)
            if any(c.info.status == "RUNNING" and c.info.run_id not in closing for c in children):
                continue
            last = max([r.info.start_time] + [t for c in children for t in (c.info.start_time, c.info.end_time) if t])
            if gone(r, TAG_DRIVER):
                parents.append((r, f"the process that ran it ({r.data.tags[TAG_DRIVER].split(':')[0]} on {host}) "
                                   "is gone"))
            elif now_ms - last > quiet_s * 1000:
                parents.append((r, f"nothing happened in it for {(now_ms - last) / 60000:.0f} min (a live run's "
                                   f"next task starts within {quiet_s / 60:.0f} min)"))
        return stages, parents

    def versions_of_pipeline_run(self, parent_id: str) -> list[Any]:
        from mlflow.exceptions import MlflowException

        try:
            return list(self.client.search_model_versions(f"name = '{self.name}' and "
                                                          f"tags.`{TAG_PIPELINE_RUN}` = '{parent_id}'"))
        except MlflowException:  # no registered model yet
            return []

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def record_run(self, run_name: str, tags: dict[str, str], metrics: dict[str, float],
                   artifacts: Path | None = None, artifact_path: str | None = None) -> str:
        """A finished stand-alone run (e.g. one monitor check) in the experiment; returns its id."""
        run = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags)
        rid = run.info.run_id
        self.log_metrics(rid, metrics)
        if artifacts is not None:
            self.log_artifacts(rid, artifacts, artifact_path)
        self.client.set_terminated(rid)
        return rid

    def pipeline_run(self, run_name: str) -> Any | None:
        """The parent run of the pipeline run with this name (None if there is none)."""
        runs = self.client.search_runs([self.experiment_id()], f"attributes.run_name = '{run_name}'", max_results=5)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return parents[0] if parents else None

    def stage_runs(self, parent_id: str, stage: str | None = None) -> list[Any]:
        """The stage runs of one pipeline run, oldest first (only `stage`'s when given)."""
        exp = self.client.get_run(parent_id).info.experiment_id
        query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        if stage is not None:
            query += f" and tags.`{TAG_STAGE}` = '{stage}'"
        return self.client.search_runs([exp], query, max_results=100, order_by=["attributes.start_time ASC"])

    def download_run_artifact(self, run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst) if dst else None, tracking_uri=self.uri))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Numbers as people read them in the runs table: 6 significant digits (0.6666666666666666 ->
        0.666667; 211797.12345 -> 211797); whole numbers stay exact."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, _round(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i:i + 900])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i:i + 90])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_dataset(self, run_id: str, path: Path, name: str, digest: str, context: str) -> None:
        """Record a dataset as an MLflow run input (lineage: data hash -> run)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        df = pd.read_json(path, lines=True) if path.stat().st_size else pd.DataFrame()
        ds = mlflow.data.from_pandas(df, source=str(path), name=name, digest=digest[:36])
        self.client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                              tags=[InputTag("mlflow.data.context", context)])])

    # -- registry --
    def alias_version(self, alias: str) -> Any | None:
        """The version an alias points at; None when the alias (or the registered model) does not exist.
        Any other failure - the server or its database unreachable, a timeout, a permission error - is
        RegistryUnavailable: "unknown" must never read as "not set" (a reload would drop the canary)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as e:
            code, message = getattr(e, "error_code", ""), str(e)
            # a missing registered model is RESOURCE_DOES_NOT_EXIST; a missing alias comes back as
            # INVALID_PARAMETER_VALUE "Registered model alias X not found." (sqlalchemy and REST stores)
            if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in message):
                return None
            raise RegistryUnavailable(f"alias {alias!r} of {self.name}: {code}: {message[:300]}") from e
        except Exception as e:  # noqa: BLE001 - whatever the transport raised: not an answer
            raise RegistryUnavailable(f"alias {alias!r} of {self.name}: {type(e).__name__}: {str(e)[:300]}") from e

    def register(self, run_id: str, adapter_dir: Path, tags: dict[str, str]) -> Any:
        """Register a new version, alias `challenger`; its source run is the pipeline run (tag
        tuneloop.pipeline_run_id), whatever stage run `run_id` registers it. An MLflow model folder (an
        `MLmodel` file in `adapter_dir`, see deploy/mlflow_model.py) becomes a logged model of the pipeline
        run and the version points at it; a bare adapter folder is logged as the pipeline run's `adapter`
        artifacts. A retry of the same pipeline run returns the version it already created."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.name, description="LoRA adapters trained by tuneloop.")
        except MlflowException:
            pass  # exists
        pipeline_run = tags[TAG_PIPELINE_RUN]
        existing = self.client.search_model_versions(f"name = '{self.name}' and "
                                                     f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run}'")
        if existing:
            mv = existing[0]
            log.info("register: version %s already registered for pipeline run %s", mv.version, pipeline_run)
        elif (adapter_dir / "MLmodel").exists():
            model_id = self._log_model(pipeline_run, adapter_dir, tags)
            # source models:/<id>, as mlflow.register_model records it: MLflow links the version to the logged
            # model by it, and keeps where the files are as the version's storage location (adapter_uri)
            mv = self.client.create_model_version(self.name, f"models:/{model_id}", run_id=pipeline_run, tags=tags,
                                                  model_id=model_id)
        else:
            self.log_artifacts(pipeline_run, adapter_dir, "adapter")
            source = f"{self.client.get_run(pipeline_run).info.artifact_uri}/adapter"
            mv = self.client.create_model_version(self.name, source, run_id=pipeline_run, tags=tags)
        self.client.set_registered_model_alias(self.name, "challenger", mv.version)
        return mv

    def _log_model(self, pipeline_run: str, model_dir: Path, tags: dict[str, str]) -> str:
        """An MLflow 3 logged model of the pipeline run (listed under its "Logged models" and as its output)
        from a saved model folder; returns its id."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        exp = self.client.get_run(pipeline_run).info.experiment_id
        lm = self.client.create_logged_model(exp, name=self.name, source_run_id=pipeline_run, tags=tags,
                                             model_type="pyfunc: base model + LoRA adapter")
        try:
            mm = Model.load(str(model_dir / "MLmodel"))  # the saved model learns whose it is
            mm.model_id, mm.model_uuid, mm.run_id, mm.artifact_path = lm.model_id, lm.model_id, pipeline_run, \
                lm.artifact_location
            mm.save(str(model_dir / "MLmodel"))
            self.client.log_model_artifacts(lm.model_id, str(model_dir))
        except BaseException:
            self.client.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(pipeline_run, [LoggedModelOutput(lm.model_id, step=0)])
        return lm.model_id

    def set_alias(self, alias: str, version: str) -> None:
        """Point an alias at a version and check that it does (idempotent: a retry sets the same)."""
        self.client.set_registered_model_alias(self.name, alias, str(version))
        now = self.alias_version(alias)
        if now is None or str(now.version) != str(version):
            raise RuntimeError(f"registry: alias {alias!r} of {self.name} reads "
                               f"{'nothing' if now is None else 'v' + str(now.version)} after moving it to v{version}")

    def delete_alias(self, alias: str) -> None:
        """Remove an alias; one that is already gone is fine (a retry), any other error is raised, and
        the alias is checked to be gone."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model_alias(self.name, alias)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        if self.alias_version(alias) is not None:
            raise RuntimeError(f"registry: alias {alias!r} of {self.name} is still set after deleting it")

    def aliases(self) -> dict[str, str]:
        out = {}
        for a in ALIASES:
            mv = self.alias_version(a)
            if mv is not None:
                out[a] = str(mv.version)
        return out

    def adapter_uri(self, version: Any) -> str:
        """Where a version's adapter files are (an artifact URI): the logged model's folder for an MLflow
        model version (its source is models:/<id>), the source itself for a bare adapter version."""
        if not str(version.source).startswith("models:/"):
            return version.source
        return self.client.get_model_version_download_uri(self.name, str(version.version))

    def download_adapter(self, version: Any, dest: Path) -> Path:
        """The adapter folder of a version, fetched once into dest/v<version>."""
        import mlflow.artifacts

        target = dest / f"v{version.version}"
        if (target / "adapter_config.json").exists():
            return target
        tmp = dest / f".v{version.version}.partial"
        tmp.mkdir(parents=True, exist_ok=True)
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=self.adapter_uri(version), dst_path=str(tmp),
                                                        tracking_uri=self.uri))
        os.replace(path, target)
        return target

    def model_version(self, version: str) -> Any:
        return self.client.get_model_version(self.name, version)

    def set_version_description(self, version: str, text: str) -> None:
        self.client.update_model_version(self.name, version, description=text)

    def version_tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, version).tags)

    def set_version_tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, version, key, value)


def _round(v: float) -> float:
    """6 significant digits for a fractional number; whole numbers (and inf/nan) as they are."""
    v = float(v)
    return v if v != v or v in (float("inf"), float("-inf")) or v.is_integer() else float(f"{v:.6g}")
