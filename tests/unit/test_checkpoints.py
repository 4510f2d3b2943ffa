"""Checkpoint bookkeeping: only marked checkpoints count, unmarked ones are discarded, the mirror
round-trips (through fsspec's local filesystem, as it would through s3://)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.train.checkpoints import MARKER, Mirror, discard_incomplete, mark_complete, newest_complete, \
    prepare_resume, step_of

pytestmark = pytest.mark.unit


def _ckpt(root: Path, step: int, complete: bool) -> Path:
    d = root / f"checkpoint-{step}"
    (d / "global_step").mkdir(parents=True)
    (d / "global_step" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard" * step)
    (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    if complete:
        mark_complete(d, step)
    return d


def test_the_newest_complete_checkpoint_wins_and_half_written_ones_go(tmp_path: Path) -> None:
    assert newest_complete(tmp_path / "none") is None
    _ckpt(tmp_path, 10, True)
    _ckpt(tmp_path, 20, True)
    _ckpt(tmp_path, 30, False)  # killed while saving
    (tmp_path / "datasets").mkdir()
    assert newest_complete(tmp_path).name == "checkpoint-20"
    assert discard_incomplete(tmp_path) == ["checkpoint-30"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20", "datasets"]
    assert not list(tmp_path.rglob(MARKER + ".tmp")), "the marker is renamed into place"
    assert step_of("checkpoint-20") == 20 and step_of("datasets") is None


def test_mirror_round_trip_pulls_the_newest_complete_one(tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    mirror = Mirror(remote.as_uri())
    for step, complete in ((4, True), (8, True)):
        d = _ckpt(local, step, complete)
        mirror.push_files(d)
        mirror.push_marker(d)
    half = _ckpt(local, 12, True)
    mirror.push_files(half)  # its node died before the marker went up
    assert mirror.newest_complete() == "checkpoint-8"
    fresh = tmp_path / "fresh-disk"
    resumed = prepare_resume(fresh, remote.as_uri())
    assert resumed == fresh / "checkpoint-8"
    assert (resumed / "global_step" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes() == b"shard" * 8
    assert (resumed / MARKER).exists()


def test_a_checkpoint_whose_files_changed_is_never_resumed_from(tmp_path: Path) -> None:
    _ckpt(tmp_path, 10, True)
    bad = _ckpt(tmp_path, 20, True)
    shard = bad / "global_step" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"evil pickle" + b"x" * 89)  # same size as before, other bytes
    assert prepare_resume(tmp_path) == tmp_path / "checkpoint-10"
    assert (tmp_path / "checkpoint-20.rejected").is_dir() and not (tmp_path / "checkpoint-20").exists()


def test_files_the_manifest_does_not_name_are_refused(tmp_path: Path) -> None:
    from tuneloop.train.checkpoints import CheckpointRejected, verify

    d = _ckpt(tmp_path, 5, True)
    verify(d)
    (d / "extra.pt").write_bytes(b"not in the manifest")
    with pytest.raises(CheckpointRejected, match="extra"):
        verify(d)


def test_a_signed_manifest_needs_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from tuneloop.train.checkpoints import KEY_ENV, CheckpointRejected, verify

    monkeypatch.setenv(KEY_ENV, "k" * 32)
    d = _ckpt(tmp_path, 7, True)
    verify(d)
    body = json.loads((d / MARKER).read_text())
    (d / "trainer_state.json").write_text('{"global_step": 99}')  # tampered, manifest rewritten by the attacker
    body["files"]["trainer_state.json"]["sha256"] = __import__("hashlib").sha256(b'{"global_step": 99}').hexdigest()
    body["files"]["trainer_state.json"]["size"] = len('{"global_step": 99}')
    (d / MARKER).write_text(json.dumps(body))
    with pytest.raises(CheckpointRejected, match="signature"):
        verify(d)


def test_mirror_objects_outside_the_checkpoint_folder_are_refused(tmp_path: Path) -> None:
    from tuneloop.train.checkpoints import CheckpointRejected

    remote = tmp_path / "remote"
    mirror = Mirror(remote.as_uri())
    d = _ckpt(tmp_path / "local", 3, True)
    mirror.push_files(d)
    mirror.push_marker(d)

    class Hostile(Mirror):
        def pull(self, name, local_root):  # noqa: ANN001, ANN201
            real_find = self.fs.find
            self.fs.find = lambda base: [*real_find(base), f"{base}/../../escape.pt"]  # type: ignore[method-assign]
            return super().pull(name, local_root)

    with pytest.raises(CheckpointRejected, match="outside the checkpoint's folder"):
        Hostile(remote.as_uri()).pull("checkpoint-3", tmp_path / "fresh")
    assert not (tmp_path / "escape.pt").exists()
