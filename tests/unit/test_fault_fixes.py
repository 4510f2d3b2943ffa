"""Bugs the fault suite (bench/fault_suite.py) found, each pinned here.

- Text that JSON carries but no database can hold - a lone surrogate (`"\\ud800"`, no UTF-8 form) or NUL
  (Postgres refuses it) - made the request log's writer drop its whole batch (other users' rows included,
  uncounted), answered 500 on the feedback path, and reached the gateway's tokenizer as a "model error".
- A database that hangs instead of refusing (a partition, a frozen server) let waiting store calls take
  every thread of Starlette's shared pool: /healthz and the gateway's chat stopped answering."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from authkit import make_guard
from conftest import free_port, tiny_config
from fastapi.testclient import TestClient

from tuneloop.config import load_config
from tuneloop.deploy.gateway import Gateway, create_app
from tuneloop.feedback.auth import local_token
from tuneloop.feedback.service import DB_THREADS, create_feedback_service
from tuneloop.feedback.store import FeedbackStore, storable

pytestmark = pytest.mark.unit

SUR, NUL, BAD = "\ud800", "\x00", "\ufffd"
REQ, RESP = "org.kubeflow.serving.inference.request", "org.kubeflow.serving.inference.response"
ROW = dict(user_id="u", model_version="1", variant="champion", slice="", output="ok", status="ok", latency_ms=1.0)


def _raw(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as the JSON escape \ud800


def test_storable_replaces_only_what_no_database_holds():
    assert storable(f"a{NUL}b{SUR}c\udfffd") == f"a{BAD}b{BAD}c{BAD}d"
    assert storable("plain, é, 😀") == "plain, é, 😀" and storable(3) == 3 and storable(None) is None


def test_a_row_no_database_can_hold_no_longer_loses_its_batch(tmp_path):
    """One row with a lone surrogate failed the batch's insert with UnicodeEncodeError (not a DBAPIError):
    the writer logged `0 rows kept`, every row of the batch was gone, and the spool segment was released."""
    store = FeedbackStore(tmp_path / "fb.db", spool_dir=tmp_path / "spool")
    store.log_request(request_id="a", prompt="fine", **ROW)
    store.log_request(request_id="b", prompt=f"broken {SUR} text", **{**ROW, "slice": f"s{NUL}"})
    store.log_request(request_id="c", prompt=f"nul {NUL} text", **ROW)
    store.log_request(request_id="d", prompt="also fine", **ROW)
    store.flush()
    got = {r["request_id"] for r in store.requests()}
    assert got == {"a", "b", "c", "d"} and store.rejected == 0 and store.backlog == 0
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from tuneloop.feedback.store import Request

    with Session(store.engine) as s:
        b = s.get(Request, "b")
        assert b is not None and b.prompt == f"broken {BAD} text" and b.slice == f"s{BAD}"
        assert s.scalars(select(Request.prompt).where(Request.request_id == "c")).one() == f"nul {BAD} text"
    assert list((tmp_path / "spool").glob("*.jsonl")) == []  # written, so released


def test_an_insert_error_that_is_not_a_dbapi_error_costs_only_its_row(tmp_path, monkeypatch):
    """Whatever the driver raises for one row, the others are written and that one is counted."""
    store = FeedbackStore(tmp_path / "fb.db")
    dialect = store.engine.dialect

    def picky(real: Any) -> Any:
        def run(cursor, statement, parameters, context=None):  # noqa: ANN001, ANN202
            if "poison" in str(parameters):
                raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")
            return real(cursor, statement, parameters, context)
        return run

    monkeypatch.setattr(dialect, "do_execute", picky(dialect.do_execute))
    monkeypatch.setattr(dialect, "do_executemany", picky(dialect.do_executemany))
    for rid, prompt in (("a", "fine"), ("b", "poison"), ("c", "fine too")):
        store.log_request(request_id=rid, prompt=prompt, **ROW)
    store.flush()
    assert {r["request_id"] for r in store.requests()} == {"a", "c"} and store.rejected == 1 and store.backlog == 0


def test_the_feedback_service_stores_unstorable_text_instead_of_answering_500(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "fb.db")
    guard, h = make_guard(monkeypatch, {"kserve": "events", "app": "feedback"})
    c = TestClient(create_feedback_service(store, guard))
    ev = lambda ce, t: {"ce-id": ce, "ce-type": t, "Content-Type": "application/json", **h["kserve"]}  # noqa: E731
    for ce, prompt, answer in (("s1", f"where {SUR} is it", "billing"), ("s2", "q", f"x {NUL} y")):
        r = c.post("/v1/kserve-events", params={"version": "1"}, headers=ev(ce, REQ),
                   content=_raw({"messages": [{"role": "user", "content": prompt}], "user": "u"}))
        assert r.status_code == 200, r.text
        r = c.post("/v1/kserve-events", headers=ev(ce, RESP),
                   content=_raw({"choices": [{"message": {"content": answer}}]}))
        assert r.json() == {"status": "recorded"}, r.text
    fb = {**h["app"], "Content-Type": "application/json"}
    r = c.post("/v1/feedback", headers=fb,
               content=_raw({"request_id": "s1", "thumbs": "down", "correction": f"c {SUR}"}))
    assert r.status_code == 200, r.text
    r = c.post("/v1/feedback", headers=fb, content=_raw({"request_id": f"s2{SUR}", "thumbs": "up"}))
    assert r.status_code == 404
    rows = {r["request_id"]: r for r in store.rows()}
    assert rows["s1"]["prompt"] == f"where {BAD} is it" and rows["s1"]["correction"] == f"c {BAD}"
    assert store.request_info("s2") is not None


def _gateway(tmp_path: Path, tiny_model_dir: Path) -> tuple[Gateway, TestClient, list[Any]]:
    seen: list[Any] = []

    class Recorder:
        def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
            seen.append(messages)
            return "ok", 3, 1

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir))
    gw = Gateway(cfg, backend_factory=lambda v: Recorder())
    gw.reload()
    token = local_token(cfg.state_path)
    return gw, TestClient(create_app(gw), headers={"Authorization": f"Bearer {token}",
                                                   "Content-Type": "application/json"}), seen


def test_the_gateway_refuses_lone_surrogates_as_the_clients_mistake(tmp_path, tiny_model_dir):
    """A lone surrogate in the content reached the tokenizer (a 500 counted as the model's error, so a client
    could fail a canary with it); in `user` it crashed the user-id HMAC (500)."""
    gw, c, seen = _gateway(tmp_path, tiny_model_dir)
    msg = lambda content: [{"role": "user", "content": content}]  # noqa: E731
    for body, field in (({"messages": msg(f"hi {SUR}")}, "messages[0].content"),
                        ({"messages": msg([{"type": "text", "text": f"x {SUR}"}])}, "messages[0].content"),
                        ({"messages": msg("hi"), "user": f"u{SUR}"}, "user"),
                        ({"messages": msg("hi"), "metadata": {"slice": f"s{SUR}"}}, "metadata.slice")):
        r = c.post("/v1/chat/completions", content=_raw(body))
        assert r.status_code == 400 and f"`{field}` is not valid Unicode" in r.json()["error"]["message"], r.text
    assert seen == [] and gw.store.requests() == []  # refused before generating, not logged as served
    # NUL is text the model can take: served, and stored as U+FFFD
    r = c.post("/v1/chat/completions", content=_raw({"messages": msg(f"a {NUL} b"), "user": f"n{NUL}"}))
    assert r.status_code == 200, r.text
    [row] = gw.store.requests()
    from sqlalchemy.orm import Session

    from tuneloop.feedback.store import Request

    with Session(gw.store.engine) as s:
        assert s.get(Request, row["request_id"]).prompt == f"a {BAD} b"


# -- a database that hangs (a partition, a frozen server) instead of refusing --
class _Held:
    """Makes a store's `request_info` wait until released, counting the calls that are waiting."""

    def __init__(self, store: FeedbackStore) -> None:
        self.release, self.waiting, self.lock = threading.Event(), 0, threading.Lock()
        real = store.request_info

        def held(request_id: str) -> Any:
            with self.lock:
                self.waiting += 1
            self.release.wait(60)
            return real(request_id)

        store.request_info = held  # type: ignore[method-assign]


def _serve(app: Any) -> tuple[Any, str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, f"http://127.0.0.1:{port}"


def _pile(url: str, headers: dict[str, str], n: int) -> list[threading.Thread]:
    """n feedback calls at once, each waiting on the held database."""
    def one(i: int) -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/feedback", json={"request_id": f"r{i}", "thumbs": "up"}, headers=headers, timeout=60)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def _wait_for(cond: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_calls_waiting_on_a_hung_database_do_not_stop_healthz(tmp_path, monkeypatch):
    """Store calls ran in Starlette's shared pool (40 threads): 60 feedback calls waiting on a frozen database
    took every thread, and /healthz waited behind them (the liveness probe then kills the pod)."""
    store = FeedbackStore(tmp_path / "fb.db")
    guard, h = make_guard(monkeypatch, {"app": "feedback"})
    held = _Held(store)
    server, url = _serve(create_feedback_service(store, guard))
    try:
        threads = _pile(url, h["app"], 60)
        _wait_for(lambda: held.waiting >= DB_THREADS)
        time.sleep(1.0)  # the rest arrive and queue
        assert held.waiting == DB_THREADS  # the database gets its own pool's threads, no more
        t = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200 and time.monotonic() - t < 2
        assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200
    finally:
        held.release.set()
        server.should_exit = True
    for t in threads:
        t.join(30)
    assert held.waiting == 60  # every queued call ran once the database answered


def test_the_gateway_keeps_serving_chat_while_feedback_waits_on_a_hung_database(tmp_path, tiny_model_dir):
    gw, _, seen = _gateway(tmp_path, tiny_model_dir)
    held = _Held(gw.store)
    headers = {"Authorization": f"Bearer {local_token(gw.cfg.state_path)}"}
    server, url = _serve(create_app(gw))
    try:
        threads = _pile(url, headers, 60)
        _wait_for(lambda: held.waiting >= DB_THREADS)
        time.sleep(1.0)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                       headers=headers, timeout=5)
        assert r.status_code == 200 and seen
        assert httpx.get(f"{url}/healthz", timeout=5).json()["status"] == "ok"
    finally:
        held.release.set()
        server.should_exit = True
    for t in threads:
        t.join(30)
