"""Kubernetes objects for a training stage, as pure functions of the run config and API answers.

Builders: a Kubeflow Trainer v2 TrainJob (on the `train.cluster.runtime` ClusterTrainingRuntime) or a
Training Operator v1 PyTorchJob, running the same torchrun command as a local launch. The pods take
their resources and placement from `train.cluster.resources`, their namespace, state volume (mounted
at `state_dir`, as in the pipeline's tasks) and Secrets from the `kubernetes` section.
Readers: the job's status from its conditions, and what is wrong with a pod (preempted, OOMKilled,
an image that cannot be pulled, a missing Secret). train/cluster.py drives them with a real client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.env import DEFAULTS
from tuneloop.train.checkpoints import PREEMPTED_EXIT

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
    env = {**DEFAULTS, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": str(cfg.state_path / "torch_extensions"), **cfg.kubernetes.env, **c.env}
    if c.gpus_per_node(cfg.train.nproc_per_node) == 0:
        env["DS_ACCELERATOR"] = "cpu"
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    own = {s.name: s for s in c.secrets}  # the training pods' own entries win over the shared ones
    secrets = [own.pop(s.name, s) for s in cfg.kubernetes.secrets] + list(own.values())
    out += [{"name": s.name, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}} for s in secrets]
    return out


def pod_labels(cfg: RunConfig) -> dict[str, str]:
    """Labels of every training pod: the ones the platform's NetworkPolicies select on
    (`kubernetes.pod_labels`, filled by the chart) and the component."""
    return {**cfg.kubernetes.pod_labels, "app.kubernetes.io/component": "training"}


def node_resources(cfg: RunConfig) -> dict[str, Any]:
    """One training pod's requests = limits (GPUs: one per training process unless set)."""
    return cfg.train.cluster.resources.container_resources(cfg.train.nproc_per_node)


# Pod Security Standard `restricted`: the images run as uid 10001 (docker/Dockerfile*), nothing else
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                      "capabilities": {"drop": ["ALL"]}}


def _pod_spec(cfg: RunConfig, container: dict[str, Any]) -> dict[str, Any]:
    """The training pod around one container: hardened (non-root, read-only root filesystem with /tmp and a
    memory-backed /dev/shm for NCCL, no service-account token: the worker talks to MLflow, not to the
    API server), placed, with the state volume at state_dir and a grace period for the SIGTERM checkpoint."""
    c = cfg.train.cluster
    mounts = [{"name": "state", "mountPath": str(cfg.state_path)}, {"name": "tmp", "mountPath": "/tmp"},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": c.termination_grace_seconds,
        "automountServiceAccountToken": False,
        "securityContext": dict(POD_SECURITY),
        "volumes": [{"name": "state", "persistentVolumeClaim": {"claimName": cfg.kubernetes.state_pvc}},
                    {"name": "tmp", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        "containers": [{**container, "securityContext": dict(CONTAINER_SECURITY), "volumeMounts": mounts}],
        **c.resources.placement(),
    }
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
    pod.pop("automountServiceAccountToken")  # not patchable in a TrainJob; the chart's runtime sets it to false
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": cfg.kubernetes.namespace, "labels": dict(labels or {})},
        "spec": {
            "runtimeRef": {"apiGroup": TRAINER_GROUP, "kind": c.runtime_kind, "name": c.runtime},
            "trainer": {
                "image": c.image or TRAIN_IMAGE,
                "command": _torchrun(stage, spec_path, c.termination_grace_seconds),
                "numNodes": t.num_nodes,
                "numProcPerNode": t.nproc_per_node,
                "resourcesPerNode": node_resources(cfg),
                "env": container_env(cfg),
            },
            "runtimePatches": [{"manager": LAUNCHER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": TRAINJOB_CONTAINER, "template": {"spec": {"template": {
                    "metadata": {"labels": pod_labels(cfg)}, "spec": pod}}}}]}}}}],
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
                "template": {"metadata": {"labels": {**dict(labels or {}), **pod_labels(cfg)}}, "spec": pod_spec}}

    replicas = {"Master": replica(1)}
    if t.num_nodes > 1:
        replicas["Worker"] = replica(t.num_nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": cfg.kubernetes.namespace, "labels": dict(labels or {})},
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


def weight(p: PodProblem) -> int:
    """Which problem explains a failure best: an own failure > a preemption > waiting to be scheduled."""
    return 0 if p.reason == "Unschedulable" else 1 if p.preempted else 2


