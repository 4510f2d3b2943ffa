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
