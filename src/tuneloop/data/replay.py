"""The champion's training data: found through the MLflow registry, used for replay and drift.

champion alias -> model version -> its `tuneloop.pipeline_run_id` tag (the parent run of the
pipeline run that made it) -> that run's `ingest` stage run -> its `dataset/sft.jsonl`
artifact, fetched once into <state_dir>/champion-data/v<version>/. The same file is the
replay pool of ingest (a share of it is mixed into the new run's SFT records) and the
reference of validate_data's drift report.

Replay picks records by a hash of (seed, id), so the choice is reproducible and streams:
one pass collects the hashes, a second keeps the n smallest. Because the champion's own
training set already held its replay, older data keeps a geometrically shrinking share.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.jsonl import iter_jsonl

log = logging.getLogger("tuneloop.replay")
REPLAY_SEED = "tuneloop-replay"


@dataclass
class ChampionData:
    version: str
    run_id: str  # the champion's ingest stage run
    sft: Path


def champion_training_data(reg: Any, cache_dir: Path) -> ChampionData | None:
    """The champion's SFT training records, or None when there is no champion (or it has no data)."""
    from tuneloop.registry import TAG_PIPELINE_RUN

    mv = reg.alias_version("champion")
    if mv is None:
        return None
    parent = (mv.tags or {}).get(TAG_PIPELINE_RUN)
    if not parent:
        log.warning("champion v%s has no %s tag: its training data cannot be found", mv.version, TAG_PIPELINE_RUN)
        return None
    runs = [r for r in reversed(reg.stage_runs(parent, "ingest")) if r.info.status == "FINISHED"]
    if not runs:
        log.warning("champion v%s: pipeline run %s has no finished ingest stage", mv.version, parent)
        return None
    run_id = runs[0].info.run_id
    target = cache_dir / f"v{mv.version}" / "sft.jsonl"
    if not target.exists():
        tmp = cache_dir / f".v{mv.version}.partial"
        tmp.mkdir(parents=True, exist_ok=True)
        got = reg.download_run_artifact(run_id, "dataset/sft.jsonl", tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, target)
    return ChampionData(str(mv.version), run_id, target)


def _key(rid: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{REPLAY_SEED}\0{rid}".encode()).digest()[:8], "big")


def count_records(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def sample_records(path: Path, n: int) -> Iterator[dict[str, Any]]:
    """The n records with the smallest hash of their id, in file order, as raw ingest records."""
    if n <= 0:
        return
    keys = np.fromiter((_key(str(r["id"])) for r in iter_jsonl(path)), dtype=np.uint64)
    cut = np.partition(keys, n - 1)[n - 1] if n < len(keys) else np.iinfo(np.uint64).max
    kept = 0
    for r in iter_jsonl(path):
        if kept < n and _key(str(r["id"])) <= cut:
            kept += 1
            yield to_raw(r)


def to_raw(r: dict[str, Any]) -> dict[str, Any]:
    """An ingest output record (sft.jsonl) -> the raw schema ingest reads (multi-turn kept)."""
    raw: dict[str, Any] = {"id": r["id"], "slice": r.get("slice")}
    if r.get("turns"):
        raw["messages"] = [*r["turns"], {"role": "assistant", "content": r["response"]}]
    else:
        raw["prompt"], raw["response"] = r["user_text"], r["response"]
    return raw
