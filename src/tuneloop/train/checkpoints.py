"""Resumable checkpoints: only COMPLETE ones are ever resumed from; SIGTERM saves one first.

The HF Trainer writes `checkpoint-<step>/` (DeepSpeed shards of every rank, optimizer, scheduler,
RNG, trainer state). A checkpoint counts as complete only once every rank has finished writing
and rank 0 has put `tuneloop-complete.json` into it (written to a temporary name, then renamed,
so the marker itself is never half-written). A rerun resumes from the newest checkpoint that has
the marker; folders without one (a crash or SIGKILL mid-save) are deleted before training starts.

Durable storage is `checkpoint_dir` itself (the state directory locally, the shared PVC on a
cluster). With `mirror_uri` (e.g. s3://bucket/prefix) each complete checkpoint is also copied
there with fsspec, marker last, and a rerun on a fresh disk pulls the newest one back.

Resuming unpickles optimizer and RNG state (torch.load), so a checkpoint is verified before it is
loaded: the marker carries a manifest (size and sha256 of every file, written once every rank has
saved), and a checkpoint whose files do not match it - truncated, corrupted, swapped in the mirror,
or with files the manifest does not name - is never resumed from. With `TUNELOOP_CHECKPOINT_KEY` set
(from a Kubernetes Secret) the manifest is signed with HMAC-SHA256, so whoever can write to the
mirror but does not hold the key cannot forge one. Object keys that would land outside the
checkpoint's folder (`..`, absolute paths) are refused when pulling.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneloop.train")

MARKER = "tuneloop-complete.json"
PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a preempted worker exits with after saving (retryable for PyTorchJob)
PREEMPTED_LOG = "stopped by SIGTERM after a complete checkpoint"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_of(path: str | Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MARKER).is_file()


def newest_complete(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under root, or None."""
    if not root.is_dir():
        return None
    done = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return max(done)[1] if done else None


def newest_verified(root: Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; rejected ones are moved aside
    (`<name>.rejected`, kept for inspection, never resumed) and the next newest is tried."""
    while (ckpt := newest_complete(root)) is not None:
        try:
            verify(ckpt)
            return ckpt
        except CheckpointRejected as e:
            log.error("not resuming from it: %s", e)
            target = ckpt.with_name(ckpt.name + ".rejected")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(ckpt, target)
    return None


def discard_incomplete(root: Path) -> list[str]:
    """Delete checkpoint folders without the marker (left by a crash mid-save); returns their names."""
    gone = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and step_of(p) is not None and not is_complete(p):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


KEY_ENV = "TUNELOOP_CHECKPOINT_KEY"


class CheckpointRejected(RuntimeError):
    """A checkpoint that must not be loaded: its files do not match its manifest, or its signature is wrong."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file in a checkpoint folder but the marker."""
    return {f.relative_to(ckpt).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name not in (MARKER, MARKER + ".tmp")}


def _signature(files: dict[str, Any], step: int) -> str | None:
    key = os.environ.get(KEY_ENV)
    if not key:
        return None
    payload = json.dumps({"step": step, "files": files}, sort_keys=True).encode()
    return hmac.new(key.encode(), payload, hashlib.sha256).hexdigest()


def mark_complete(ckpt: Path, step: int) -> None:
    files = manifest(ckpt)
    body: dict[str, Any] = {"step": step, "time": time.time(), "files": files}
    sig = _signature(files, step)
    if sig is not None:
        body["hmac_sha256"] = sig
    tmp = ckpt / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MARKER)


def verify(ckpt: Path) -> None:
    """CheckpointRejected unless every file matches the marker's manifest (and its signature, when a
    key is configured); called before a checkpoint is resumed from."""
    try:
        body = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointRejected(f"{ckpt}: unreadable marker: {e}") from None
    files = body.get("files")
    if not isinstance(files, dict):
        raise CheckpointRejected(f"{ckpt}: the marker has no manifest (written by an older version?)")
    if os.environ.get(KEY_ENV) and not hmac.compare_digest(str(body.get("hmac_sha256", "")),
                                                           _signature(files, body.get("step", -1)) or ""):
        raise CheckpointRejected(f"{ckpt}: the manifest's signature does not match {KEY_ENV}")
    found = manifest(ckpt)
    if set(found) != set(files):
        extra, missing = sorted(set(found) - set(files)), sorted(set(files) - set(found))
        raise CheckpointRejected(f"{ckpt}: files differ from the manifest (extra {extra[:3]}, missing {missing[:3]})")
    bad = [name for name, meta in files.items() if found[name] != meta]
    if bad:
        raise CheckpointRejected(f"{ckpt}: {len(bad)} file(s) differ from the manifest, e.g. {bad[0]}")


class Mirror:
    """A copy of the complete checkpoints under an fsspec URI (s3://..., gs://..., file://...)."""

    def __init__(self, uri: str) -> None:
        import fsspec

        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def _remote(self, name: str) -> str:
        return f"{self.root}/{name}"

    def push_files(self, ckpt: Path) -> None:
        """Upload this node's files of a checkpoint (everything but the marker)."""
        for f in sorted(ckpt.rglob("*")):
            if f.is_file() and f.name != MARKER:
                dest = self._remote(f"{ckpt.name}/{f.relative_to(ckpt).as_posix()}")
                self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(f), dest)

    def push_marker(self, ckpt: Path) -> None:
        self.fs.put_file(str(ckpt / MARKER), self._remote(f"{ckpt.name}/{MARKER}"))

    def newest_complete(self) -> str | None:
        if not self.fs.exists(self.root):
            return None
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        done = [(step_of(n), n) for n in names if step_of(n) is not None and self.fs.exists(self._remote(f"{n}/{MARKER}"))]
        return max(done)[1] if done else None

    def pull(self, name: str, local_root: Path) -> Path:
        dest = local_root / name
        tmp = local_root / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        base = self._remote(name)
        for src in self.fs.find(base):
            rel = src[len(base):].lstrip("/")
            target = (tmp / rel).resolve()
            if not src.startswith(base + "/") or tmp.resolve() not in target.parents:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointRejected(f"{self.uri}/{name}: object {src!r} lies outside the checkpoint's folder")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(src, str(tmp / rel))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest


def prepare_resume(root: Path, mirror_uri: str | None = None) -> Path | None:
    """On every rank, before training: clean up, fetch from the mirror if it is ahead, agree on the
    newest complete checkpoint (None: start from scratch)."""
    if _local_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        gone = discard_incomplete(root)
        if gone and _rank() == 0:
            log.warning("discarded incomplete checkpoint(s) %s in %s", ", ".join(gone), root)
        if mirror_uri:
            mirror = Mirror(mirror_uri)
            remote, local = mirror.newest_complete(), newest_complete(root)
            if remote and (local is None or step_of(remote) > step_of(local)):
                log.info("pulling %s from %s", remote, mirror_uri)
                mirror.pull(remote, root)
        newest_verified(root)  # rejected checkpoints are moved aside before any rank looks
    barrier()
    return newest_complete(root)


def preemption_callback(mirror_uri: str | None = None):
    """A TrainerCallback that (1) marks every saved checkpoint complete once all ranks wrote it and
    copies it to the mirror, and (2) on SIGTERM saves a checkpoint at the end of the current step
    and stops training; `callback.preempted` then tells the worker to exit with PREEMPTED_EXIT."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class Preemption(TrainerCallback):
        def __init__(self) -> None:
            self.signalled = False
            self.preempted = False
            self.mirror = Mirror(mirror_uri) if mirror_uri else None
            signal.signal(signal.SIGTERM, self._on_sigterm)

        def _on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002
            self.signalled = True

        def _any_rank_signalled(self, args: Any) -> bool:
            # A preempted pod may be one node of many: every rank must agree to save together.
            if not (dist.is_available() and dist.is_initialized()):
                return self.signalled
            flag = torch.tensor([1.0 if self.signalled else 0.0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self._any_rank_signalled(args):
                if _rank() == 0:
                    log.warning("SIGTERM: saving a checkpoint at step %d, then stopping", state.global_step)
                self.preempted = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kw):  # noqa: ANN001
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            barrier()  # every rank has written its shards, RNG state and (rank 0) the trainer state
            if self.mirror is not None and _local_rank() == 0:
                self.mirror.push_files(ckpt)
            if _rank() == 0:
                mark_complete(ckpt, state.global_step)
            barrier()  # every node's files are in the mirror before its marker goes up
            if self.mirror is not None and _rank() == 0:
                self.mirror.push_marker(ckpt)
            if _rank() == 0:
                log.info("checkpoint %s complete", ckpt)
            return control

    return Preemption()
