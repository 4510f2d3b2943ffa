"""The feedback path never blocks the service's event loop (a fresh clone's `make test` once timed out on
the first POST /v1/feedback: Presidio's first load and the database write ran on the loop, ~10 s).

A real uvicorn server on loopback; the store's write is held open by the test (a database that is slow
or locked), and /healthz must still answer while the feedback request waits for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import uvicorn
from conftest import free_port

from tuneloop.feedback.service import create_feedback_service
from tuneloop.feedback.store import FeedbackStore


class HeldStore(FeedbackStore):
    """A real store whose next write waits until the test lets it go."""

    def __init__(self, db: Path) -> None:
        super().__init__(db)
        self.hold = threading.Event()
        self.entered = threading.Event()

    def flush(self) -> None:
        if threading.current_thread().name != "feedback-writer":
            self.entered.set()
            self.hold.wait(30)
        super().flush()


def _serve(app, port: int) -> tuple[uvicorn.Server, threading.Thread]:  # noqa: ANN001
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, t


def test_a_slow_feedback_write_does_not_stop_healthz(tmp_path, monkeypatch):
    from authkit import make_guard

    guard, headers = make_guard(monkeypatch, {"app": "feedback"})
    store = HeldStore(tmp_path / "fb.db")
    store.log_request(request_id="r1", user_id="u", model_version="1", variant="champion", slice="", prompt="p",
                      output="o", status="ok", latency_ms=1.0)
    store.hold.set()
    store.flush()  # the request is stored; from here on a reader's flush is held
    store.hold.clear()
    store.entered.clear()
    port = free_port()
    server, thread = _serve(create_feedback_service(store, guard), port)
    base = f"http://127.0.0.1:{port}"
    answers: dict[str, int] = {}
    try:
        poster = threading.Thread(target=lambda: answers.update(
            feedback=httpx.post(f"{base}/v1/feedback", json={"request_id": "r1", "thumbs": "up"}, headers=headers["app"],
                                timeout=60)
            .status_code))
        poster.start()
        assert store.entered.wait(30), "the feedback request never reached the store"
        # the write is in progress and held: the event loop must still answer
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        assert "feedback" not in answers  # still waiting for its write
        store.hold.set()
        poster.join(60)
        assert answers["feedback"] == 200
        assert store.rows()[0]["score"] == 1.0
    finally:
        store.hold.set()
        server.should_exit = True
        thread.join(10)


def test_warm_up_loads_the_scrubber_before_the_first_request(tmp_path):
    from tuneloop.config import PiiConfig
    from tuneloop.data.pii import PiiScrubber

    scrubber = PiiScrubber(PiiConfig())
    store = FeedbackStore(tmp_path / "fb.db", scrubber=scrubber)
    assert scrubber._analyzer is None
    store.warm_up()
    assert scrubber._analyzer is not None and store._writer is not None
