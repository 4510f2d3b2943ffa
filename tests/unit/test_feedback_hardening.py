"""The feedback path against poisoning and overload, on the real FeedbackStore (sqlite) behind the real
feedback service: one feedback item per request, rate limits, trust in corrections, KServe halves
paired through the database by any replica and bounded, multi-part content, a bad row costing
only itself."""

from __future__ import annotations

import time
from typing import Any

import pytest
from authkit import make_guard
from fastapi.testclient import TestClient

from tuneloop.data.feedback import feedback_to_training
from tuneloop.feedback.service import create_feedback_service
from tuneloop.feedback.store import FeedbackStore

pytestmark = pytest.mark.unit

REQ, RESP = "org.kubeflow.serving.inference.request", "org.kubeflow.serving.inference.response"
KEYS = {"kserve": "events", "app": "feedback", "reviewer-tool": "feedback,trusted", "ops": "admin"}


def _service(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, db: str = "fb.db", limits: dict | None = None,
             **auth: Any) -> tuple[TestClient, FeedbackStore, dict[str, dict[str, str]]]:
    store = FeedbackStore(tmp_path / db)
    guard, h = make_guard(monkeypatch, KEYS, limits, **auth)
    return TestClient(create_feedback_service(store, guard)), store, h


def _served(c: TestClient, h: dict, ce_id: str, prompt: Any = "where is my parcel?", answer: str = "billing",
            user: str = "u-1") -> None:
    ev = {"ce-id": ce_id, **h["kserve"]}
    c.post("/v1/kserve-events", params={"version": "3", "variant": "champion"}, headers={**ev, "ce-type": REQ},
           json={"messages": [{"role": "user", "content": prompt}], "user": user}).raise_for_status()
    r = c.post("/v1/kserve-events", headers={**ev, "ce-type": RESP},
               json={"choices": [{"message": {"content": answer}}]})
    assert r.json() == {"status": "recorded"}, r.text


def test_one_feedback_item_per_request(tmp_path, monkeypatch):
    c, store, h = _service(tmp_path, monkeypatch)
    _served(c, h, "ev-1")
    assert c.post("/v1/feedback", json={"request_id": "ev-1", "thumbs": "down"}, headers=h["app"]).status_code == 200
    for again in ({"thumbs": "up"}, {"correction": "shipping"}, {"rating": 5}):
        r = c.post("/v1/feedback", json={"request_id": "ev-1", **again}, headers=h["app"])
        assert r.status_code == 409 and "already has its feedback" in r.json()["error"]["message"]
    assert [(r["score"], r["correction"]) for r in store.rows()] == [(0.0, None)]
    # a second store (another replica) on the same database refuses it too: the database enforces it
    other = FeedbackStore(tmp_path / "fb.db")
    from tuneloop.feedback.store import FeedbackExists

    with pytest.raises(FeedbackExists):
        other.add_feedback("ev-1", score=1.0, once=True)


def test_feedback_rate_limits_per_user_and_per_key(tmp_path, monkeypatch):
    limits = {"feedback_per_user": {"per_minute": 1, "burst": 2}, "feedback_per_key": {"per_minute": 1, "burst": 5}}
    c, _, h = _service(tmp_path, monkeypatch, limits=limits)
    for i in range(6):
        _served(c, h, f"a{i}", user="mallory" if i < 3 else f"user-{i}")
    codes = [c.post("/v1/feedback", json={"request_id": f"a{i}", "thumbs": "down"}, headers=h["app"])
             for i in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]  # mallory's bucket holds 2
    assert int(codes[2].headers["retry-after"]) >= 1 and "per user" in codes[2].json()["error"]["message"]
    # other users go on until the key's own bucket (5 in all, the refused one included) is empty
    assert c.post("/v1/feedback", json={"request_id": "a3", "thumbs": "up"}, headers=h["app"]).status_code == 200
    assert c.post("/v1/feedback", json={"request_id": "a4", "thumbs": "up"}, headers=h["app"]).status_code == 200
    r = c.post("/v1/feedback", json={"request_id": "a5", "thumbs": "up"}, headers=h["app"])
    assert r.status_code == 429 and "per key" in r.json()["error"]["message"] and "retry-after" in r.headers
    # another key has its own bucket
    r = c.post("/v1/feedback", json={"request_id": "a5", "thumbs": "up"}, headers=h["reviewer-tool"])
    assert r.status_code == 200


def test_untrusted_corrections_are_stored_flagged_and_left_out_of_training(tmp_path, monkeypatch):
    c, store, h = _service(tmp_path, monkeypatch)  # trust_corrections: trusted_keys (the default)
    _served(c, h, "r1", "where is my parcel?", "billing")
    _served(c, h, "r2", "reset my password", "billing")
    c.post("/v1/feedback", json={"request_id": "r1", "thumbs": "down", "correction": "refund now"},
           headers=h["app"]).raise_for_status()
    c.post("/v1/feedback", json={"request_id": "r2", "thumbs": "down", "correction": "account"},
           headers=h["reviewer-tool"]).raise_for_status()
    rows = {r["request_id"]: r for r in store.rows()}
    assert rows["r1"]["trusted"] is False and rows["r1"]["correction"] == "refund now" and rows["r1"]["key"] == "app"
    assert rows["r2"]["trusted"] is True
    stats: dict[str, int] = {}
    sft, pairs = feedback_to_training(list(rows.values()), stats)
    assert [s["response"] for s in sft] == ["account"]
    assert [p["chosen"] for p in pairs] == ["account"]
    assert stats["corrections_untrusted"] == 1 and stats["corrections_trusted"] == 1


def test_reviewed_policy_trusts_only_what_an_admin_reviewed(tmp_path, monkeypatch):
    c, store, h = _service(tmp_path, monkeypatch, trust_corrections="reviewed")
    _served(c, h, "r1")
    c.post("/v1/feedback", json={"request_id": "r1", "correction": "shipping"},
           headers=h["reviewer-tool"]).raise_for_status()  # even a trusted key waits for the review
    assert feedback_to_training(store.rows())[0] == []
    listed = c.get("/admin/corrections", headers=h["ops"]).json()["corrections"]
    assert [(x["request_id"], x["correction"], x["trusted"]) for x in listed] == [("r1", "shipping", False)]
    r = c.post("/admin/corrections/review", json={"ids": [listed[0]["id"]], "trusted": True}, headers=h["ops"])
    assert r.json() == {"status": "reviewed", "changed": 1}
    assert [s["response"] for s in feedback_to_training(store.rows())[0]] == ["shipping"]
    assert c.get("/admin/corrections", headers=h["ops"]).json()["corrections"] == []
    r = c.post("/admin/corrections/review", json={"ids": "all", "trusted": True}, headers=h["ops"])
    assert r.status_code == 400


def test_all_policy_trusts_every_correction(tmp_path, monkeypatch):
    c, store, h = _service(tmp_path, monkeypatch, trust_corrections="all")
    _served(c, h, "r1")
    c.post("/v1/feedback", json={"request_id": "r1", "correction": "shipping"}, headers=h["app"]).raise_for_status()
    assert store.rows()[0]["trusted"] is True


def test_halves_pair_through_the_database_on_any_replica_in_any_order(tmp_path, monkeypatch):
    guard, h = make_guard(monkeypatch, KEYS)  # one Secret, two replicas, each with its own store
    store_a = FeedbackStore(tmp_path / "fb.db")
    a = TestClient(create_feedback_service(store_a, guard))
    b = TestClient(create_feedback_service(FeedbackStore(tmp_path / "fb.db"), guard))
    ev = lambda ce, t: {"ce-id": ce, "ce-type": t, **h["kserve"]}  # noqa: E731
    req = {"messages": [{"role": "user", "content": "where is my parcel?"}], "user": "u-1"}
    resp = {"choices": [{"message": {"content": "shipping"}}]}
    assert a.post("/v1/kserve-events", json=req, headers=ev("x1", REQ)).json() == {"status": "pending"}
    assert b.post("/v1/kserve-events", json=resp, headers=ev("x1", RESP)).json() == {"status": "recorded"}
    assert b.post("/v1/kserve-events", json=resp, headers=ev("x2", RESP)).json() == {"status": "pending"}
    # a restart between the halves: nothing was in any process's memory
    c = TestClient(create_feedback_service(FeedbackStore(tmp_path / "fb.db"), guard))
    assert c.post("/v1/kserve-events", json=req, headers=ev("x2", REQ)).json() == {"status": "recorded"}
    rows = {r["request_id"]: r for r in store_a.requests()}
    assert set(rows) == {"x1", "x2"} and rows["x1"]["latency_ms"] >= 0
    info = store_a.request_info("x1")
    assert info is not None and info["user_id"].startswith("u_") and "u-1" not in info["user_id"]
    store_a.sweep_pending(600, 1 << 20)
    assert store_a.halves_pending == 0


def test_waiting_halves_are_bounded_by_age_and_bytes_and_counted(tmp_path, monkeypatch):
    c, store, h = _service(tmp_path, monkeypatch)
    now = time.time()
    store.kserve_half("old", "request", {"prompt": "p", "user_id": "", "model_version": "1", "variant": "champion"},
                      now=now - 3600)
    for i in range(5):
        store.kserve_half(f"n{i}", "response", {"output": "x" * 1000}, now=now + i)
    store.sweep_pending(max_age_s=600, max_bytes=3 * 1100, now=now + 10)
    assert store.halves_expired == 1 and store.halves_evicted == 2 and store.halves_pending == 3
    assert store.halves_pending_bytes <= 3 * 1100
    metrics = c.get("/metrics").text
    assert "tuneloop_kserve_halves_expired_total 1.0" in metrics
    assert "tuneloop_kserve_halves_evicted_total 2.0" in metrics
    # the newest survive: their requests still pair
    r = c.post("/v1/kserve-events", headers={"ce-id": "n4", "ce-type": REQ, **h["kserve"]},
               json={"messages": [{"role": "user", "content": "q"}]})
    assert r.json() == {"status": "recorded"}


def test_multi_part_content_is_stored_as_its_text_and_a_bad_row_costs_only_itself(tmp_path, monkeypatch):
    """A list content reached the scrubber, which raised and lost the whole batch, uncounted."""
    c, store, h = _service(tmp_path, monkeypatch)
    parts = [{"type": "text", "text": "where is"}, {"type": "image_url", "image_url": {"url": "data:"}},
             {"type": "text", "text": "my parcel?"}]
    _served(c, h, "mp", parts)
    assert store.rows() == [] and store.request_info("mp") is not None
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from tuneloop.feedback.store import Request

    with Session(store.engine) as s:
        assert s.scalars(select(Request.prompt).where(Request.request_id == "mp")).one() == "where is\nmy parcel?"


class PickyScrubber:
    def scrub(self, text: str) -> str:
        if "boom" in text:
            raise RuntimeError("analyzer failed")
        return text.replace("jane@example.com", "<EMAIL_ADDRESS>")


def test_a_row_that_cannot_be_scrubbed_costs_only_itself(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db", scrubber=PickyScrubber())
    row = dict(user_id="u", model_version="1", variant="champion", slice="", output="ok", status="ok", latency_ms=1.0)
    store.log_request(request_id="a", prompt="mail jane@example.com", **row)
    store.log_request(request_id="b", prompt="boom", **row)
    store.log_request(request_id="c", prompt=["not", "text"], **row)
    store.log_request(request_id="d", prompt="fine", **row)
    store.flush()
    assert [r["request_id"] for r in store.requests()] == ["a", "d"]
    assert store.scrub_failed == 2 and store.backlog == 0


def test_a_store_made_by_the_previous_version_is_migrated(tmp_path):
    """Feedback written before the trust flag existed reads as untrusted; one-per-request applies from now."""
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE requests (request_id VARCHAR(64) PRIMARY KEY, created FLOAT, user_id VARCHAR(128),
            model_version VARCHAR(64), variant VARCHAR(16), slice VARCHAR(64), prompt TEXT, output TEXT,
            status VARCHAR(16), latency_ms FLOAT);
        CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id VARCHAR(64), created FLOAT,
            score FLOAT, correction TEXT);
        INSERT INTO requests VALUES ('r1', 1.0, 'u', '1', 'champion', '', 'q', 'a', 'ok', 1.0);
        INSERT INTO feedback (request_id, created, score, correction) VALUES ('r1', 2.0, 0.0, 'poison');
        INSERT INTO feedback (request_id, created, score, correction) VALUES ('r1', 3.0, 1.0, NULL);
    """)
    con.commit()
    con.close()
    store = FeedbackStore(db)
    rows = store.rows()
    assert [(r["correction"], r["trusted"]) for r in rows] == [("poison", False), (None, False)]
    assert feedback_to_training(rows)[0] == []
    assert store.add_feedback("r1", score=1.0, once=True) is True  # the legacy items are not API ones
    from tuneloop.feedback.store import FeedbackExists

    with pytest.raises(FeedbackExists):
        store.add_feedback("r1", score=0.0, once=True)
    assert FeedbackStore(db).corrections()[0]["correction"] == "poison"  # waiting for a review
