"""The request log's spool: what `log_request` acknowledged survives a SIGKILL, is replayed once by the
next process, never twice, and a live process's spool is left alone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuneloop.feedback.store import FeedbackStore

pytestmark = pytest.mark.unit
ROW = dict(user_id="u_1", model_version="1", variant="champion", slice="", output="ok", status="ok", latency_ms=1.0)


def _killed_after_logging(db: Path, spool: Path, ids: list[str]) -> None:
    """A process logs rows (the writer is held off), says so, and is SIGKILLed before any write."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from tuneloop.feedback.store import FeedbackStore
        store = FeedbackStore({str(db)!r}, spool_dir={str(spool)!r})
        store.FLUSH_EVERY_S = 3600
        for rid in {ids!r}:
            store.log_request(request_id=rid, prompt="p-" + rid, **{ROW!r})
        print("acknowledged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and "acknowledged" in done.stdout, done.stderr[-2000:]


def test_a_sigkill_loses_nothing_that_was_acknowledged(tmp_path):
    db, spool = tmp_path / "fb.db", tmp_path / "spool"
    _killed_after_logging(db, spool, ["a", "b", "c"])
    assert FeedbackStore(db).requests() == []  # nothing had reached the database
    assert len(list(spool.glob("*.jsonl"))) == 1
    store = FeedbackStore(db, spool_dir=spool)  # the next start replays it
    assert [r["request_id"] for r in store.requests()] == ["a", "b", "c"]
    assert list(spool.glob("*.jsonl")) == [] and store.rejected == 0
    store.close()
    assert list(spool.iterdir()) == []


def test_a_spool_replayed_after_its_rows_were_written_adds_nothing_twice(tmp_path):
    db, spool = tmp_path / "fb.db", tmp_path / "spool"
    _killed_after_logging(db, spool, ["a", "b"])
    (segment,) = spool.glob("*.jsonl")
    copy = segment.read_bytes()
    FeedbackStore(db, spool_dir=spool).flush()  # replayed and written
    segment.write_bytes(copy + b'{"request_id": "torn')  # as if killed between commit and delete, mid-write
    store = FeedbackStore(db, spool_dir=spool)
    assert [r["request_id"] for r in store.requests()] == ["a", "b"] and store.rejected == 0


def test_a_live_process_keeps_its_own_spool(tmp_path):
    db, spool = tmp_path / "fb.db", tmp_path / "spool"
    first = FeedbackStore(db, spool_dir=spool)
    first.FLUSH_EVERY_S = 3600
    first.log_request(request_id="mine", prompt="p", **ROW)
    second = FeedbackStore(db, spool_dir=spool)  # another process on the same state dir
    assert second.backlog == 0 and second.requests() == []
    first.flush()
    assert [r["request_id"] for r in second.requests()] == ["mine"]
    assert list(spool.glob("*.jsonl")) == []


def test_rows_wait_in_the_spool_through_an_outage(tmp_path):
    db, spool = tmp_path / "fb.db", tmp_path / "spool"
    store = FeedbackStore(db, spool_dir=spool)
    store.FLUSH_EVERY_S = 3600
    from sqlalchemy.exc import OperationalError

    real = store.engine

    class Down:
        dialect = real.dialect

        def begin(self):  # noqa: ANN202
            raise OperationalError("INSERT", {}, Exception("database is down"))

    store.engine = Down()  # type: ignore[assignment]
    store.log_request(request_id="x", prompt="p", **ROW)
    with pytest.raises(OperationalError):
        store.flush()
    store.log_request(request_id="y", prompt="p", **ROW)
    with pytest.raises(OperationalError):
        store.flush()
    kept = sorted(json.loads(line)["request_id"] for f in spool.glob("*.jsonl") for line in f.read_text().splitlines())
    assert kept == ["x", "y"] and store.backlog == 2
    store.engine = real
    store.flush()
    assert [r["request_id"] for r in store.requests()] == ["x", "y"] and list(spool.glob("*.jsonl")) == []
