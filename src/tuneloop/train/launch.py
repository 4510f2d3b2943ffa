"""Start a training worker (tuneloop.train.sft / .dpo) and wait for it; `train.backend` picks how.

`local`: torchrun on this host - CPU processes over gloo here (DeepSpeed's CPU accelerator),
GPUs over NCCL on a GPU node. The worker's output is streamed into this process's log, a
failure raises `TrainingFailed` with the worker's last lines, and a run past the configured
timeout is stopped. SIGTERM to this process is passed on, so the worker saves a checkpoint. A
rank that dies of a native crash (SIGABRT/SIGSEGV/SIGBUS, e.g. in gloo's teardown on CPU) gets
one relaunch, which resumes from the newest complete checkpoint.

`trainjob` / `pytorchjob`: the same torchrun command in a Kubeflow Trainer v2 TrainJob (on the
`cluster.runtime` ClusterTrainingRuntime) or a Training Operator v1 PyTorchJob, created with the
official kubernetes client. The job's inputs and outputs live on the state PVC, mounted at
`state_dir` in the training pods as in the pipeline's. The launcher polls the job and its pods,
prints their logs, names the pod's reason when it fails (OOMKilled, a missing Secret, an image
that cannot be pulled), creates the job again when its pods were preempted or evicted (the worker
resumes from the newest complete checkpoint), and deletes the job when it is over.

The object builders and the status readers are pure functions of the config / API objects; the
API clients are passed in, so tests drive the real launcher with recorded API responses.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.train.checkpoints import PREEMPTED_EXIT, PREEMPTED_LOG
from tuneloop.train.common import JobSpec, UnsupportedOnThisHost, check_host

log = logging.getLogger("tuneloop.launch")


class TrainingFailed(RuntimeError):
    pass


class Preempted(TrainingFailed):
    """The worker was stopped by SIGTERM after saving a checkpoint; a rerun resumes from it."""


class WorkerCrashed(TrainingFailed):
    """A rank died by a signal of its own (abort, segfault: native code in torch/gloo/DeepSpeed),
    not by an error of ours; a relaunch resumes from the newest complete checkpoint."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


CRASH_SIGNALS = {int(signal.SIGABRT): "SIGABRT", int(signal.SIGBUS): "SIGBUS", int(signal.SIGSEGV): "SIGSEGV"}
_EXITCODE = re.compile(r"exitcode\s*:\s*-(\d+)")


def crash_signal(torchrun_output: list[str]) -> str | None:
    """The crash signal a rank died of, from torchrun's failure report; None for other failures."""
    for line in torchrun_output:
        m = _EXITCODE.search(line)
        if m and int(m.group(1)) in CRASH_SIGNALS:
            return CRASH_SIGNALS[int(m.group(1))]
    return None


def worker_env(state_dir: Path) -> dict[str, str]:
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # small matmuls on CPU: 2 threads per rank was ~14x slower
    env.setdefault("TORCH_EXTENSIONS_DIR", str(state_dir / "torch_extensions"))  # DeepSpeed's CPU op, built once
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def checkpoint_dir(cfg: RunConfig, pipeline_run: str, stage: str) -> Path:
    """Durable checkpoints of one stage of one pipeline run: a rerun of that run finds them."""
    return cfg.state_path / "checkpoints" / pipeline_run / stage


def build_spec(cfg: RunConfig, stage: str, base_dir: Path, data_path: Path, out_dir: Path,
               init_adapter: Path | None = None, mlflow_run: dict[str, str] | None = None,
               pipeline_run: str = "adhoc") -> JobSpec:
    t = cfg.train
    section = t.sft if stage == "sft" else t.dpo
    mirror = f"{t.checkpoint.uri.rstrip('/')}/{pipeline_run}/{stage}" if t.checkpoint.uri else None
    return JobSpec(stage=stage, base_model_dir=str(base_dir), data_path=str(data_path), output_dir=str(out_dir),
                   hparams=section.model_dump(), lora=t.lora.model_dump(), deepspeed=t.deepspeed,
                   seed=t.seed, init_adapter_dir=str(init_adapter) if init_adapter else None,
                   mlflow=mlflow_run or {},
                   persistence_threshold_zero=os.environ.get("TUNELOOP_ZERO3_PARTITION_ALL") == "1",
                   method=t.method, attention=t.attention, bf16=t.bf16,
                   gradient_checkpointing=t.gradient_checkpointing, liger_kernels=t.liger_kernels,
                   save_merged=t.save_merged_model,
                   checkpoint_dir=str(checkpoint_dir(cfg, pipeline_run, stage).resolve()),
                   checkpoint_every=t.checkpoint.every_steps, checkpoint_keep=t.checkpoint.keep,
                   checkpoint_mirror=mirror)


def _worth_showing(line: str) -> bool:
    return "tuneloop." in line or "Error" in line or "error:" in line or any(
        s in line for s in ("terminate called", "what():", "Fatal Python error", "Segmentation fault", "Aborted"))


def _output_of(spec: JobSpec) -> Path:
    return Path(spec.output_dir) / ("model" if spec.method == "full" else "adapter")


def _result(spec: JobSpec) -> dict[str, Any]:
    out = Path(spec.output_dir)
    metrics = out / "train_metrics.json"
    if not any(_output_of(spec).glob("*.safetensors")) or not metrics.exists():
        raise TrainingFailed(f"{spec.stage}: worker exited 0 but wrote no {_output_of(spec).name} in {out}")
    return json.loads(metrics.read_text())


def launch_local(spec: JobSpec, nproc: int, state_dir: Path, timeout_s: float,
                 grace_s: int = 300) -> dict[str, Any]:
    try:
        check_host(spec)
    except UnsupportedOnThisHost as e:
        raise TrainingFailed(f"{spec.stage}: {e}") from None
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = spec.write(out / "job_spec.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--shutdown_timeout={grace_s}", "-m", f"tuneloop.train.{spec.stage}", str(spec_path)]
    log.info("launching %s: %s", spec.stage, " ".join(cmd[2:]))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=worker_env(state_dir), start_new_session=True)
    terminated = threading.Event()

    def forward_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001 - preemption of this task: pass it on
        terminated.set()
        os.killpg(proc.pid, signal.SIGTERM)

    previous = _install(signal.SIGTERM, forward_sigterm)
    assert proc.stdout is not None
    checkpointed_on_sigterm = False
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            checkpointed_on_sigterm = checkpointed_on_sigterm or PREEMPTED_LOG in line
            if _worth_showing(line):
                print(line, flush=True)
            if time.monotonic() - started > timeout_s:
                raise TrainingFailed(f"{spec.stage}: stopped after the {timeout_s:.0f}s timeout")
        rc = proc.wait()
    finally:
        _install(signal.SIGTERM, previous)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the worker checkpoints, torchrun waits grace_s for it
            try:
                proc.wait(grace_s + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if terminated.is_set() or (rc != 0 and checkpointed_on_sigterm):
        raise Preempted(f"{spec.stage}: stopped by SIGTERM; the newest complete checkpoint in "
                        f"{spec.checkpoint_dir} is resumed by a rerun")
    if rc != 0:
        message = f"{spec.stage} worker exited with {rc}; last lines:\n" + "\n".join(tail)
        crashed = crash_signal(list(tail))
        raise WorkerCrashed(message, crashed) if crashed else TrainingFailed(message)
    return _result(spec)


def _install(sig: int, handler: Any) -> Any:
    """signal.signal where allowed (main thread); returns the previous handler."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(sig, handler)


def launch(cfg: RunConfig, spec: JobSpec, pipeline_run: str = "adhoc") -> dict[str, Any]:
    """Run one training stage with the configured backend; returns the worker's train_metrics."""
    t = cfg.train
    if t.backend != "local":
        return ClusterLauncher(cfg).run(spec, pipeline_run)  # the cluster's restart policy handles crashes
    try:
        return launch_local(spec, t.nproc_per_node, cfg.state_path, t.timeout_minutes * 60,
                            t.cluster.termination_grace_seconds)
    except WorkerCrashed as e:  # once: a second crash is reported as it is
        log.warning("%s: a rank died of %s; relaunching once, from the newest complete checkpoint",
                    spec.stage, e.signal_name)
        return launch_local(spec, t.nproc_per_node, cfg.state_path, t.timeout_minutes * 60,
                            t.cluster.termination_grace_seconds)


# -- cluster objects (pure) ---------------------------------------------------------------------
TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION = "kubeflow.org", "v1"
TRAINJOB_CONTAINER = "node"  # the trainer container / replicated job of Kubeflow Trainer's torch runtimes
PYTORCHJOB_CONTAINER = "pytorch"  # the Training Operator requires this container name
LAUNCHER = "tuneloop.io/launcher"


def job_name(stage: str, pipeline_run: str, attempt: int = 0) -> str:
    """RFC 1035 label, at most 63 characters, stable for one stage of one pipeline run."""
    digest = hashlib.sha256(pipeline_run.encode()).hexdigest()[:10]
    return f"tuneloop-{stage}-{digest}" + (f"-r{attempt}" if attempt else "")


def job_labels(stage: str, pipeline_run: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "tuneloop", "app.kubernetes.io/component": f"train-{stage}",
            "tuneloop.io/pipeline-run": hashlib.sha256(pipeline_run.encode()).hexdigest()[:10]}


def container_env(cfg: RunConfig) -> list[dict[str, Any]]:
    c = cfg.train.cluster
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": str(cfg.state_path / "torch_extensions"), **c.env}
    if c.gpus_per_node == 0:
        env["DS_ACCELERATOR"] = "cpu"
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    out += [{"name": s.name, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}} for s in c.secret_env]
    return out


def node_resources(cfg: RunConfig) -> dict[str, Any]:
    c = cfg.train.cluster
    res = dict(c.resources)
    if c.gpus_per_node:
        res[c.gpu_resource] = str(c.gpus_per_node)
    return {"requests": dict(res), "limits": dict(res)}


def _pod_spec(cfg: RunConfig, container: dict[str, Any]) -> dict[str, Any]:
    """The training pod's placement, state volume and grace period around one container."""
    c = cfg.train.cluster
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": c.termination_grace_seconds,
        "volumes": [{"name": "state", "persistentVolumeClaim": {"claimName": c.state_pvc}}],
        "containers": [{**container, "volumeMounts": [{"name": "state", "mountPath": str(cfg.state_path)}]}],
    }
    if c.node_selector:
        pod["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in c.tolerations]
    if c.service_account:
        pod["serviceAccountName"] = c.service_account
    return pod


def _torchrun(stage: str, spec_path: str, grace_s: int, extra: list[str] | None = None) -> list[str]:
    return ["torchrun", *(extra or []), f"--shutdown_timeout={grace_s}", "-m", f"tuneloop.train.{stage}", spec_path]


def build_trainjob(cfg: RunConfig, name: str, stage: str, spec_path: str,
                   labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A trainer.kubeflow.org/v1alpha1 TrainJob: numNodes x numProcPerNode on the torch runtime, which
    sets torchrun's PET_* variables; placement, volumes and grace period go in as a runtime patch."""
    t, c = cfg.train, cfg.train.cluster
    from tuneloop.images import TRAIN_IMAGE

    pod = _pod_spec(cfg, {"name": TRAINJOB_CONTAINER})
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": c.namespace, "labels": dict(labels or {})},
        "spec": {
            "runtimeRef": {"apiGroup": TRAINER_GROUP, "kind": "ClusterTrainingRuntime", "name": c.runtime},
            "trainer": {
                "image": c.image or TRAIN_IMAGE,
                "command": _torchrun(stage, spec_path, c.termination_grace_seconds),
                "numNodes": t.num_nodes,
                "numProcPerNode": t.nproc_per_node,
                "resourcesPerNode": node_resources(cfg),
                "env": container_env(cfg),
            },
            "runtimePatches": [{"manager": LAUNCHER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": TRAINJOB_CONTAINER,
                                    "template": {"spec": {"template": {"spec": pod}}}}]}}}}],
        },
    }


def build_pytorchjob(cfg: RunConfig, name: str, stage: str, spec_path: str,
                     labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob: one Master and num_nodes-1 Workers; torchrun gets the rendezvous
    from the operator's MASTER_ADDR / MASTER_PORT / RANK (node rank). restartPolicy ExitCode restarts a
    pod that exited with a signal code (128-255, e.g. 143 after a preemption checkpoint) in place."""
    t, c = cfg.train, cfg.train.cluster
    from tuneloop.images import TRAIN_IMAGE

    rendezvous = [f"--nnodes={t.num_nodes}", f"--nproc_per_node={t.nproc_per_node}", "--node_rank=$(RANK)",
                  "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)"]
    pod_spec = _pod_spec(cfg, {"name": PYTORCHJOB_CONTAINER, "image": c.image or TRAIN_IMAGE,
                               "command": _torchrun(stage, spec_path, c.termination_grace_seconds, rendezvous),
                               "env": container_env(cfg), "resources": node_resources(cfg)})

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "ExitCode",
                "template": {"metadata": {"labels": dict(labels or {})}, "spec": pod_spec}}

    replicas = {"Master": replica(1)}
    if t.num_nodes > 1:
        replicas["Worker"] = replica(t.num_nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": c.namespace, "labels": dict(labels or {})},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": c.max_restarts,
                          "activeDeadlineSeconds": t.timeout_minutes * 60},
            "pytorchReplicaSpecs": replicas,
        },
    }


# -- status (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobStatus:
    phase: str  # pending | running | restarting | suspended | succeeded | failed
    reason: str = ""
    message: str = ""


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def trainjob_status(obj: dict[str, Any]) -> JobStatus:
    """TrainJob conditions: Complete / Failed are terminal, Suspended waits (e.g. for a Kueue quota)."""
    conds = _true_conditions(obj)
    for kind, phase in (("Failed", "failed"), ("Complete", "succeeded"), ("Suspended", "suspended")):
        if kind in conds:
            return JobStatus(phase, conds[kind].get("reason", ""), conds[kind].get("message", ""))
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    running = any((j.get("active") or 0) > 0 or (j.get("ready") or 0) > 0 for j in jobs)
    return JobStatus("running" if running else "pending")


def pytorchjob_status(obj: dict[str, Any]) -> JobStatus:
    """PyTorchJob conditions (Created, Running, Restarting, Succeeded, Failed, Suspended): the newest true one."""
    conds = (obj.get("status") or {}).get("conditions") or []
    true = [c for c in conds if c.get("status") == "True"]
    if not true:
        return JobStatus("pending")
    for kind, phase in (("Failed", "failed"), ("Succeeded", "succeeded")):
        for c in true:
            if c["type"] == kind:
                return JobStatus(phase, c.get("reason", ""), c.get("message", ""))
    last = max(true, key=lambda c: c.get("lastTransitionTime") or "")
    phase = {"Running": "running", "Restarting": "restarting", "Suspended": "suspended"}.get(last["type"], "pending")
    return JobStatus(phase, last.get("reason", ""), last.get("message", ""))


@dataclass(frozen=True)
class Kind:
    name: str
    group: str
    version: str
    plural: str
    container: str
    pod_selector: str  # label selector with {name}
    build: Callable[..., dict[str, Any]]
    status: Callable[[dict[str, Any]], JobStatus]


KINDS = {
    "trainjob": Kind("TrainJob", TRAINER_GROUP, TRAINER_VERSION, "trainjobs", TRAINJOB_CONTAINER,
                     "jobset.sigs.k8s.io/jobset-name={name}", build_trainjob, trainjob_status),
    "pytorchjob": Kind("PyTorchJob", PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, "pytorchjobs", PYTORCHJOB_CONTAINER,
                       "training.kubeflow.org/job-name={name}", build_pytorchjob, pytorchjob_status),
}

PREEMPTION_REASONS = {"PreemptionByScheduler", "PreemptionByKubeScheduler", "DeletionByTaintManager",
                      "EvictionByEvictionAPI", "DeletionByPodGC", "TerminationByKubelet", "Evicted", "Preempted",
                      "Preempting", "Shutdown", "NodeShutdown", "Terminated"}
FATAL_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError"}


@dataclass(frozen=True)
class PodProblem:
    pod: str
    reason: str
    message: str
    preempted: bool = False  # the pod was taken away (preemption, eviction, node shutdown): resume elsewhere
    fatal_waiting: bool = False  # the container cannot start (image, missing Secret/ConfigMap)

    def __str__(self) -> str:
        return f"pod {self.pod}: {self.reason}" + (f" ({self.message})" if self.message else "")


def pod_problem(pod: Any) -> PodProblem | None:
    """What is wrong with one pod (a kubernetes.client.V1Pod), if anything, most telling reason first."""
    name, st = pod.metadata.name, pod.status
    if st is None:
        return None
    for c in st.conditions or []:
        if c.type == "DisruptionTarget" and c.status == "True":
            return PodProblem(name, c.reason or "DisruptionTarget", c.message or "", preempted=True)
    if st.reason in PREEMPTION_REASONS:
        return PodProblem(name, st.reason, st.message or "", preempted=True)
    for cs in st.container_statuses or []:
        for state in (cs.state, cs.last_state):
            term = state.terminated if state else None
            if term is not None and term.exit_code not in (0, None):
                preempted = term.exit_code == PREEMPTED_EXIT  # our worker, after its SIGTERM checkpoint
                reason = term.reason or "Error"
                return PodProblem(name, f"{reason}, exit code {term.exit_code}", term.message or "",
                                  preempted=preempted)
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason in FATAL_WAITING:
            return PodProblem(name, waiting.reason, waiting.message or "", fatal_waiting=True)
    for c in st.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
            return PodProblem(name, "Unschedulable", c.message or "")
    return None


def _weight(p: PodProblem) -> int:
    """Which problem explains a failure best: an own failure > a preemption > waiting to be scheduled."""
    return 0 if p.reason == "Unschedulable" else 1 if p.preempted else 2


# -- the cluster launcher -------------------------------------------------------------------------
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
        self.ns = cfg.train.cluster.namespace

    # the job's files live on the state PVC, which the training pods mount at state_dir
    def stage_job_dir(self, spec: JobSpec, pipeline_run: str) -> tuple[JobSpec, Path]:
        state = self.cfg.state_path.resolve()
        base = Path(spec.base_model_dir).resolve()
        if state not in base.parents:
            raise TrainingFailed(f"{spec.stage}: the base model {base} is not under state_dir {state}; the training "
                                 "pods only see state_dir (cluster.state_pvc)")
        job_dir = state / "jobs" / pipeline_run / spec.stage
        if job_dir.exists():
            shutil.rmtree(job_dir / "out", ignore_errors=True)
        (job_dir / "out").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.data_path, job_dir / "data.jsonl")
        init = None
        if spec.init_adapter_dir:
            init = job_dir / "init_adapter"
            shutil.copytree(spec.init_adapter_dir, init, dirs_exist_ok=True)
        job_spec = JobSpec(**{**spec.__dict__, "data_path": str(job_dir / "data.jsonl"),
                              "output_dir": str(job_dir / "out"),
                              "init_adapter_dir": str(init) if init else None})
        job_spec.write(job_dir / "job_spec.json")
        return job_spec, job_dir

    def run(self, spec: JobSpec, pipeline_run: str) -> dict[str, Any]:
        job_spec, job_dir = self.stage_job_dir(spec, pipeline_run)
        final = self.run_job(spec.stage, pipeline_run, str(job_dir / "job_spec.json"))
        result = _result(job_spec)
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for part in ("adapter", "model", "merged"):
            if (job_dir / "out" / part).is_dir():
                shutil.copytree(job_dir / "out" / part, out / part, dirs_exist_ok=True)
        shutil.copyfile(job_dir / "out" / "train_metrics.json", out / "train_metrics.json")
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

        previous = _install(signal.SIGTERM, on_sigterm)
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
            _install(signal.SIGTERM, previous)

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
                if worst is None or _weight(problem) > _weight(worst):  # the first of the most telling kind
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
            if _worth_showing(line) or "Traceback" in line:
                self.echo(f"[{name}] {line}")
