"""Start a training worker (tuneloop.train.sft / .dpo) and wait for it; `train.backend` picks how.

`local`: torchrun on this host (train/local.py). `trainjob` / `pytorchjob`: the same torchrun command
in a Kubeflow Trainer v2 TrainJob or a Training Operator v1 PyTorchJob (train/k8s.py builds the
objects, train/cluster.py follows them). Either way the worker reads its JobSpec (train/spec.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.train.local import GuardStopped, OutOfMemory, WorkerCrashed, launch_local
from tuneloop.train.spec import JobSpec, build_spec  # noqa: F401 - build_spec: the launch API

log = logging.getLogger("tuneloop.launch")


def launch(cfg: RunConfig, spec: JobSpec, pipeline_run: str = "adhoc") -> dict[str, Any]:
    """Run one training stage with the configured backend; returns the worker's train_metrics."""
    refuse_known_stop(spec)
    try:
        return _launch(cfg, spec, pipeline_run)
    except GuardStopped as e:
        remember_stop(spec, e)
        raise


def _launch(cfg: RunConfig, spec: JobSpec, pipeline_run: str) -> dict[str, Any]:
    t = cfg.train
    if t.backend != "local":
        from tuneloop.train.cluster import ClusterLauncher

        return ClusterLauncher(cfg).run(spec, pipeline_run)  # the cluster's restart policy handles crashes
    refuse_known_oom(spec)
    try:
        return launch_local(spec, t.nproc_per_node, cfg.state_path, t.timeout_minutes * 60,
                            t.cluster.termination_grace_seconds)
    except OutOfMemory as e:
        remember_oom(spec, str(e).splitlines()[0])
        raise
    except WorkerCrashed as e:  # once: a second crash is reported as it is
        log.warning("%s: a rank died of %s; relaunching once, from the newest complete checkpoint",
                    spec.stage, e.signal_name)
        return launch_local(spec, t.nproc_per_node, cfg.state_path, t.timeout_minutes * 60,
                            t.cluster.termination_grace_seconds)




def _oom_marker(spec: JobSpec) -> Path | None:
    """Where a stage of a pipeline run remembers that its settings were killed for memory: next to its
    checkpoints, keyed by the training settings, so a retry of the task (KFP retries failed tasks) with
    the same settings fails at once instead of being killed again."""
    if not spec.checkpoint_dir:
        return None
    digest = hashlib.sha256(spec.train.model_dump_json().encode()).hexdigest()[:12]
    return Path(spec.checkpoint_dir).parent / f".{spec.stage}-oom-{digest}.txt"


def remember_oom(spec: JobSpec, reason: str) -> None:
    marker = _oom_marker(spec)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(reason)


def refuse_known_oom(spec: JobSpec) -> None:
    marker = _oom_marker(spec)
    if marker is not None and marker.exists():
        raise OutOfMemory(f"not retried: an earlier attempt of this run with the same training settings ran out "
                          f"of memory. {marker.read_text()}")


def _stop_marker(spec: JobSpec) -> Path | None:
    """Where a stage of a pipeline run remembers that a guard stopped it (rl: reward hacking), keyed like the OOM
    marker: a retry of the task with the same settings would resume from the checkpoint before the breach and
    drift into it again, so it fails at once with the same reason."""
    m = _oom_marker(spec)
    return m.with_name(m.name.replace("-oom-", "-stopped-")) if m is not None else None


def remember_stop(spec: JobSpec, e: GuardStopped) -> None:
    marker = _stop_marker(spec)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"message": str(e), "details": e.details}))


def refuse_known_stop(spec: JobSpec) -> None:
    marker = _stop_marker(spec)
    if marker is not None and marker.exists():
        seen = json.loads(marker.read_text())
        raise GuardStopped(f"not retried: an earlier attempt of this run with the same training settings was "
                           f"stopped. {seen['message']}", seen.get("details", {}))
