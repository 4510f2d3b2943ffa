"""Resumable checkpoints: only COMPLETE ones are ever resumed from; SIGTERM saves one first.

The HF Trainer writes `checkpoint-<step>/` (DeepSpeed shards of every rank, optimizer, scheduler,
RNG, trainer state). A checkpoint counts as complete only once every rank has finished writing
and rank 0 has put `tuneloop-complete.json` into it (written to a temporary name, then renamed,
so the marker itself is never half-written). A rerun resumes from the newest checkpoint that has
the marker; folders without one (a crash or SIGKILL mid-save) are deleted before training starts.

Durable storage is `checkpoint_dir` itself (the state directory locally, the shared PVC on a
cluster). With `mirror_uri` (e.g. s3://bucket/prefix) each complete checkpoint is also copied
there with fsspec, marker last, and a rerun on a fresh disk pulls the newest one back.
"""

from __future__ import annotations

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


def discard_incomplete(root: Path) -> list[str]:
    """Delete checkpoint folders without the marker (left by a crash mid-save); returns their names."""
    gone = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and step_of(p) is not None and not is_complete(p):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def mark_complete(ckpt: Path, step: int) -> None:
    tmp = ckpt / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MARKER)


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
