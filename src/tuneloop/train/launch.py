"""Start a training worker (tuneloop.train.sft / .dpo) and wait for it; `train.backend` picks how.

`local`: torchrun on this host (train/local.py). `trainjob` / `pytorchjob`: the same torchrun command
in a Kubeflow Trainer v2 TrainJob or a Training Operator v1 PyTorchJob (train/k8s.py builds the
objects, train/cluster.py follows them). Either way the worker reads its JobSpec (train/spec.py).
"""

from __future__ import annotations

import logging
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.train.local import WorkerCrashed, launch_local
from tuneloop.train.spec import JobSpec, build_spec  # noqa: F401 - build_spec: the launch API

log = logging.getLogger("tuneloop.launch")


def launch(cfg: RunConfig, spec: JobSpec, pipeline_run: str = "adhoc") -> dict[str, Any]:
    """Run one training stage with the configured backend; returns the worker's train_metrics."""
    t = cfg.train
    if t.backend != "local":
        from tuneloop.train.cluster import ClusterLauncher

        return ClusterLauncher(cfg).run(spec, pipeline_run)  # the cluster's restart policy handles crashes
    try:
        return launch_local(spec, t.nproc_per_node, cfg.state_path, t.timeout_minutes * 60,
                            t.cluster.termination_grace_seconds)
    except WorkerCrashed as e:  # once: a second crash is reported as it is
        log.warning("%s: a rank died of %s; relaunching once, from the newest complete checkpoint",
                    spec.stage, e.signal_name)
        return launch_local(spec, t.nproc_per_node, cfg.state_path, t.timeout_minutes * 60,
                            t.cluster.termination_grace_seconds)


