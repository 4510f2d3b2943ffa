"""The cluster launcher: create the TrainJob / PyTorchJob (train/k8s.py builds it) with the official
kubernetes client, follow it and its pods to the end (status changes, pod problems and pod logs echoed),
create it again when its pods were preempted or evicted (the worker resumes from the newest complete
checkpoint), and delete it when it is over. The job's inputs and outputs live on the state PVC,
mounted at `state_dir` in the training pods as in the pipeline's tasks. The API clients are passed in,
so tests drive the real launcher with recorded API responses.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.train.common import STOPPED_FILE
from tuneloop.train.k8s import KINDS, JobStatus, PodProblem, job_labels, job_name, pod_problem, weight
from tuneloop.train.local import TrainingFailed, install_signal, read_result, stopped_by_guard, worth_showing
from tuneloop.train.spec import JobSpec

log = logging.getLogger("tuneloop.launch")


class ClusterLauncher:
    """Create the TrainJob / PyTorchJob, follow it to its end, retry it after a preemption, clean up."""

    def __init__(self, cfg: RunConfig, custom_api: Any = None, core_api: Any = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 echo: Callable[[str], None] | None = None) -> None:
        self.cfg, self.kind = cfg, KINDS[cfg.train.backend]
        if custom_api is None or core_api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            custom_api, core_api = client.CustomObjectsApi(), client.CoreV1Api()
        self.custom, self.core = custom_api, core_api
        self.sleep, self.clock = sleep, clock
        self.echo = echo or (lambda line: print(line, flush=True))
        self.ns = cfg.kubernetes.namespace

    # the job's files live on the state PVC, which the training pods mount at state_dir
    def stage_job_dir(self, spec: JobSpec, pipeline_run: str) -> tuple[JobSpec, Path]:
        state = self.cfg.state_path.resolve()
        base = Path(spec.base_model_dir).resolve()
        if state not in base.parents:
            raise TrainingFailed(f"{spec.stage}: the base model {base} is not under state_dir {state}; the training "
                                 "pods only see state_dir (kubernetes.state_pvc)")
        job_dir = state / "jobs" / pipeline_run / spec.stage
        if job_dir.exists():
            shutil.rmtree(job_dir / "out", ignore_errors=True)
        (job_dir / "out").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.data_path, job_dir / "data.jsonl")
        init = None
        if spec.init_adapter_dir:
            init = job_dir / "init_adapter"
            shutil.copytree(spec.init_adapter_dir, init, dirs_exist_ok=True)
        reward = None
        if spec.reward_adapter_dir:  # rl: the reward model's adapter travels like the init adapter
            reward = job_dir / "reward_adapter"
            shutil.copytree(spec.reward_adapter_dir, reward, dirs_exist_ok=True)
        job_spec = spec.model_copy(update={"data_path": str(job_dir / "data.jsonl"),
                                           "output_dir": str(job_dir / "out"),
                                           "init_adapter_dir": str(init) if init else None,
                                           "reward_adapter_dir": str(reward) if reward else None})
        job_spec.write(job_dir / "job_spec.json")
        return job_spec, job_dir

    def run(self, spec: JobSpec, pipeline_run: str) -> dict[str, Any]:
        job_spec, job_dir = self.stage_job_dir(spec, pipeline_run)
        (job_dir / "out" / STOPPED_FILE).unlink(missing_ok=True)
        try:
            final = self.run_job(spec.stage, pipeline_run, str(job_dir / "job_spec.json"))
        except TrainingFailed:
            stopped = stopped_by_guard(job_dir / "out")  # a guard's reason beats "the job failed"
            if stopped is not None:
                raise stopped from None
            raise
        result = read_result(job_spec)
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for part in ("adapter", "model", "merged"):
            if (job_dir / "out" / part).is_dir():
                shutil.copytree(job_dir / "out" / part, out / part, dirs_exist_ok=True)
        for name in ("train_metrics.json", "reward_eval.json", "rl_watch.json"):
            if (job_dir / "out" / name).exists():
                shutil.copyfile(job_dir / "out" / name, out / name)
        log.info("%s: %s %s succeeded", spec.stage, self.kind.name, final)
        return result

    def run_job(self, stage: str, pipeline_run: str, spec_path: str) -> str:
        """Create and follow the job; returns the name of the attempt that succeeded."""
        c = self.cfg.train.cluster
        deadline = self.clock() + self.cfg.train.timeout_minutes * 60
        interrupted: list[int] = []

        def on_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001 - the KFP task is being stopped
            interrupted.append(signum)
            raise TrainingFailed(f"{stage}: the launcher was stopped (SIGTERM); the {self.kind.name} is deleted")

        previous = install_signal(signal.SIGTERM, on_sigterm)
        try:
            for attempt in range(c.max_restarts + 1):
                name = job_name(stage, pipeline_run, attempt)
                body = self.kind.build(self.cfg, name, stage, spec_path, job_labels(stage, pipeline_run))
                self._create(body)
                try:
                    status, problem, preempted = self.follow(name, deadline)
                finally:
                    if c.delete_finished or interrupted:
                        self._delete(name)
                if status.phase == "succeeded":
                    return name
                why = f"{self.kind.name} {name} failed"
                if status.reason or status.message:
                    why += f" ({status.reason}: {status.message})".replace(" ()", "")
                if problem is not None:
                    why += f"; {problem}"
                if preempted and attempt < c.max_restarts:
                    self.echo(f"[tuneloop.launch] {why}; preempted: creating it again, it resumes from the newest "
                              f"complete checkpoint (restart {attempt + 1}/{c.max_restarts})")
                    continue
                raise TrainingFailed(why + ("; preempted too often" if preempted else ""))
            raise AssertionError("unreachable")
        finally:
            install_signal(signal.SIGTERM, previous)

    def _create(self, body: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        k, name = self.kind, body["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(k.group, k.version, self.ns, k.plural, body)
        except ApiException as e:
            if e.status != 409:
                raise TrainingFailed(f"creating {k.name} {name} in {self.ns}: {e.status} {e.reason}: "
                                     f"{(e.body or '')[:500]}") from None
            # a rerun of the same pipeline run: the old attempt is still there; replace it
            self._delete(name)
            self.custom.create_namespaced_custom_object(k.group, k.version, self.ns, k.plural, body)
        self.echo(f"[tuneloop.launch] created {k.name} {self.ns}/{name}")

    def _delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        try:
            self.custom.delete_namespaced_custom_object(k.group, k.version, self.ns, k.plural, name,
                                                        propagation_policy="Background")
            self.echo(f"[tuneloop.launch] deleted {k.name} {self.ns}/{name}")
        except ApiException as e:
            if e.status != 404:
                log.warning("could not delete %s %s: %s %s", k.name, name, e.status, e.reason)

    def follow(self, name: str, deadline: float) -> tuple[JobStatus, PodProblem | None, bool]:
        """Poll until the job ends: echo status changes, pod problems and pod logs. Returns the final
        status, the most telling pod problem seen, and whether any pod was preempted."""
        from kubernetes.client.exceptions import ApiException

        c, k = self.cfg.train.cluster, self.kind
        last_status: JobStatus | None = None
        seen: dict[tuple[str, str], float] = {}  # (pod, reason) -> first seen
        worst: PodProblem | None = None
        log_marks: dict[str, str] = {}  # pod -> timestamp of the last line shown
        while True:
            try:
                obj = self.custom.get_namespaced_custom_object(k.group, k.version, self.ns, k.plural, name)
            except ApiException as e:
                if e.status == 404:
                    return JobStatus("failed", "Deleted", f"{k.name} {name} disappeared"), worst, False
                raise
            status = k.status(obj)
            if status != last_status:
                self.echo(f"[tuneloop.launch] {k.name} {name}: {status.phase}"
                          + (f" ({status.reason}: {status.message})" if status.reason or status.message else ""))
                last_status = status
            pods = self.core.list_namespaced_pod(self.ns, label_selector=k.pod_selector.format(name=name)).items
            for pod in pods:
                self._stream_logs(pod, log_marks)
                problem = pod_problem(pod)
                if problem is None:
                    continue
                key = (problem.pod, problem.reason)
                if key not in seen:
                    seen[key] = self.clock()
                    self.echo(f"[tuneloop.launch] {problem}")
                if worst is None or weight(problem) > weight(worst):  # the first of the most telling kind
                    worst = problem
                if problem.fatal_waiting and self.clock() - seen[key] > c.image_pull_grace_seconds:
                    return JobStatus("failed", problem.reason, problem.message), problem, False
            if status.phase in ("succeeded", "failed"):
                # retried only when preemption is all that went wrong: a pod that failed on its own (OOMKilled,
                # an error) makes its peers exit too, and those exits must not pass for a preemption
                return status, worst, worst is not None and worst.preempted
            if self.clock() > deadline:
                return (JobStatus("failed", "Timeout", f"still {status.phase} after "
                                                       f"{self.cfg.train.timeout_minutes} min"), worst, False)
            self.sleep(c.poll_seconds)

    def _stream_logs(self, pod: Any, marks: dict[str, str]) -> None:
        """Echo the pod's new log lines (timestamps keep each line from being shown twice)."""
        from kubernetes.client.exceptions import ApiException

        name = pod.metadata.name
        if pod.status is None or pod.status.phase not in ("Running", "Succeeded", "Failed"):
            return
        try:
            text = self.core.read_namespaced_pod_log(name, self.ns, container=self.kind.container, timestamps=True,
                                                     since_seconds=int(self.cfg.train.cluster.poll_seconds * 3) + 60
                                                     if name in marks else None)
        except ApiException:
            return
        for raw in (text or "").splitlines():
            stamp, _, line = raw.partition(" ")
            if stamp <= marks.get(name, ""):
                continue
            marks[name] = stamp
            if worth_showing(line) or "Traceback" in line:
                self.echo(f"[{name}] {line}")
