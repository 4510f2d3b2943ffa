"""Keys that moved, read for one more release: each old key is rewritten to its new place before
validation, with a warning that names the new key (`tuneloop validate` prints them).

Kubernetes settings used to be spoken in three dialects (`train.cluster.*`, `platform.*`,
`deploy.kserve.*` / `deploy.namespace`); they now live in the `kubernetes` section and one
pod-resources model (config/kubernetes.py).
"""

from __future__ import annotations

import copy
from typing import Any

from tuneloop.config.base import ConfigError

MOVED: list[tuple[str, str]] = [
    ("train.cluster.namespace", "kubernetes.namespace"),
    ("deploy.namespace", "kubernetes.namespace"),
    ("train.cluster.state_pvc", "kubernetes.state_pvc"),
    ("platform.state_pvc", "kubernetes.state_pvc"),
    ("platform.secrets", "kubernetes.secrets"),
    ("train.cluster.secret_env", "kubernetes.secrets"),
    ("train.cluster.gpus_per_node", "train.cluster.resources.accelerators"),
    ("train.cluster.gpu_resource", "train.cluster.resources.accelerator_type"),
    ("train.cluster.node_selector", "train.cluster.resources.node_selector"),
    ("train.cluster.tolerations", "train.cluster.resources.tolerations"),
    ("deploy.kserve.gpus", "deploy.kserve.resources.accelerators"),
    ("deploy.kserve.cpu", "deploy.kserve.resources.cpu"),
    ("deploy.kserve.memory", "deploy.kserve.resources.memory"),
    ("deploy.kserve.node_selector", "deploy.kserve.resources.node_selector"),
    ("deploy.kserve.tolerations", "deploy.kserve.resources.tolerations"),
]
_LISTS = {"kubernetes.secrets"}  # several old lists merge into one


def _parent(raw: dict[str, Any], dotted: str, create: bool) -> tuple[dict[str, Any] | None, str]:
    *path, leaf = dotted.split(".")
    node: Any = raw
    for key in path:
        if not isinstance(node, dict):
            return None, leaf
        if key not in node or node[key] is None:
            if not create:
                return None, leaf
            node[key] = {}
        node = node[key]
    return (node if isinstance(node, dict) else None), leaf


def migrate(raw: dict[str, Any], source: str = "<config>") -> tuple[dict[str, Any], list[str]]:
    """(a copy of raw with every moved key at its new place, one warning per old key found).
    ConfigError when an old and a new key (or two old keys) give different values."""
    raw = copy.deepcopy(raw)
    warnings: list[str] = []
    moved_from: dict[str, str] = {}
    # the train pods' resources used to be a {cpu, memory} mapping beside gpus_per_node: same keys, kept
    for old, new in MOVED:
        node, leaf = _parent(raw, old, create=False)
        if node is None or leaf not in node:
            continue
        value = node.pop(leaf)
        warnings.append(f"{source}: {old} is deprecated and read for one more release; use {new}")
        target, tleaf = _parent(raw, new, create=True)
        if target is None:
            raise ConfigError(f"{source}: {old}: cannot move it to {new} (a parent of {new} is not a mapping)")
        if tleaf not in target:
            target[tleaf] = list(value) if new in _LISTS and isinstance(value, list) else value
        elif new in _LISTS and isinstance(value, list) and isinstance(target[tleaf], list):
            by_name = {s.get("name"): s for s in target[tleaf] if isinstance(s, dict)}
            for item in value:
                name = item.get("name") if isinstance(item, dict) else None
                if name in by_name and by_name[name] != item:
                    raise ConfigError(f"{source}: {old}: secret env {name!r} is also in {moved_from.get(new, new)} "
                                      f"with another Secret; keep one entry in {new}")
                if name not in by_name:
                    target[tleaf].append(item)
                    by_name[name] = item
        elif target[tleaf] != value:
            raise ConfigError(f"{source}: {old} ({value!r}) and {moved_from.get(new, new)} ({target[tleaf]!r}) "
                              f"disagree; both are now {new}: set it once")
        moved_from.setdefault(new, old)
    return raw, warnings
