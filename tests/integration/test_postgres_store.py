"""The feedback store on a real PostgreSQL server (the cluster's database; sqlite is the local
default): the feedback service as its own process taking KServe payload-logger events and
feedback, the next ingest reading them through `deploy.feedback_store_env`, the gateway's
request log, and the writer keeping rows through a refused row and a database outage."""

from __future__ import annotations

import logging
import os
import sys
import time

import httpx
import pytest
from conftest import free_port, start_until_healthy, tiny_config

pytestmark = pytest.mark.integration

ENV = "TUNELOOP_TEST_FEEDBACK_DB"


def _admin(db_url: str):  # noqa: ANN202 - a psycopg connection to the server's maintenance database
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(db_url)
    return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname="postgres", autocommit=True)


def test_feedback_service_process_on_postgres_feeds_the_next_ingest(postgres, tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    from transformers import AutoTokenizer

    from tuneloop.config import load_config
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.data.ingest import ingest
    from tuneloop.feedback.store import FeedbackStore

    db = postgres("feedback_service")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "service.log"
    proc = start_until_healthy([sys.executable, "-m", "tuneloop.cli", "feedback-service", "--host", "127.0.0.1",
                                "--port", str(port)], f"{url}/healthz", log_path, {**os.environ, "DATABASE_URL": db})
    try:
        prompt = "my parcel never arrived, write to jane.doe@example.com"

        def served(ce_id: str, version: str, variant: str, answer: str) -> None:
            h = {"ce-id": ce_id, "ce-inferenceservicename": "tuneloop-demo"}
            q = {"version": version, "variant": variant}
            r = httpx.post(f"{url}/v1/kserve-events", params=q, headers={**h, "ce-type": "org.kubeflow.serving.inference.request"},
                           json={"messages": [{"role": "user", "content": prompt}], "user": "u-1"})
            assert r.json() == {"status": "pending"}, r.text
            r = httpx.post(f"{url}/v1/kserve-events", params=q,
                           headers={**h, "ce-type": "org.kubeflow.serving.inference.response"},
                           json={"choices": [{"message": {"content": answer}}]})
            assert r.json() == {"status": "recorded"}, r.text

        served("ev-champion", "3", "champion", "shipping")
        served("ev-canary", "4", "canary", "billing")
        assert httpx.post(f"{url}/v1/feedback", json={"request_id": "ev-champion", "thumbs": "up"}).status_code == 200
        assert httpx.post(f"{url}/v1/feedback", json={"request_id": "ev-canary", "rating": 1}).status_code == 200
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": "ev-canary", "correction": "shipping"})
        assert r.status_code == 200

        # values the database would refuse are refused at the API, naming the field
        r = httpx.post(f"{url}/v1/kserve-events", headers={"ce-id": "x" * 100, "ce-type": "a.request"},
                       json={"messages": []})
        assert r.status_code == 400 and "ce-id is 100 characters" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/kserve-events", params={"variant": "blue"},
                       headers={"ce-id": "ev-x", "ce-type": "a.request"}, json={"messages": []})
        assert r.status_code == 400 and "`variant`" in r.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(20)

    monkeypatch.setenv(ENV, db)
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, deploy__feedback_store_env=ENV))
    assert cfg.feedback_db == db
    rows = FeedbackStore(cfg.feedback_db).rows()  # what the ingest stage reads
    assert len(rows) == 3 and all("jane.doe@example.com" not in r["prompt"] for r in rows), rows
    assert {(r["model_version"], r["variant"]) for r in rows} == {("3", "champion"), ("4", "canary")}
    report = ingest(cfg.data, ChatFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir))), tmp_path / "next",
                    rows)
    # the up-voted champion answer beats the down-voted canary one; the correction beats the canary's answer
    assert report["feedback"]["preference"] == 2 and report["feedback"]["sft"] == 1, report["feedback"]


def test_gateway_request_log_on_postgres(postgres, tmp_path, tiny_model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from tuneloop.config import load_config
    from tuneloop.deploy.gateway import Gateway, create_app

    class Stub:
        def answer(self, messages, max_tokens):  # noqa: ANN001, ANN201
            return "shipping", 5, 1

    monkeypatch.setenv(ENV, postgres("gateway_log"))
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, deploy__feedback_store_env=ENV))
    gw = Gateway(cfg, backend_factory=lambda version: Stub())
    gw.reload()
    c = TestClient(create_app(gw))
    chat = {"messages": [{"role": "user", "content": "where is my parcel?"}], "metadata": {"slice": "ticket_routing"}}
    r = c.post("/v1/chat/completions", json={**chat, "user": "u" * 129})
    assert r.status_code == 400 and "`user` is 129 characters; the limit is 128" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={**chat, "metadata": {"slice": "s" * 65}})
    assert r.status_code == 400 and "`metadata.slice`" in r.json()["error"]["message"]
    rid = c.post("/v1/chat/completions", json={**chat, "user": "u-7"}).json()["id"]
    assert c.post("/v1/feedback", json={"request_id": rid, "thumbs": "down"}).status_code == 200
    [row] = gw.store.rows()
    assert (row["request_id"], row["slice"], row["output"], row["score"]) == (rid, "ticket_routing", "shipping", 0.0)
    assert [r["request_id"] for r in gw.store.requests()] == [rid], "refused requests are not logged"
    metrics = c.get("/metrics").text
    assert "tuneloop_request_log_rejected_total 0.0" in metrics and "tuneloop_request_log_backlog 0.0" in metrics


def test_request_log_keeps_rows_through_a_refused_row_and_an_outage(postgres, caplog):
    from sqlalchemy import create_engine, text

    from tuneloop.feedback.store import FeedbackStore

    db = postgres("request_log")
    store = FeedbackStore(db)
    store.RETRY_S = 0.2
    row = dict(user_id="u", model_version="1", slice="", prompt="p", output="o", status="ok", latency_ms=1.0)
    caplog.set_level(logging.WARNING, logger="tuneloop.feedback")

    # one row the database refuses (a variant longer than its column) costs that row only, by name
    store.log_request(request_id="a", variant="champion", **row)
    store.log_request(request_id="bad", variant="v" * 40, **row)
    store.log_request(request_id="b", variant="canary", **row)
    store.flush()
    assert [r["request_id"] for r in store.requests()] == ["a", "b"]
    assert store.rejected == 1 and "request bad refused by the database" in caplog.text

    # the database goes away: the writer keeps the rows and writes them once it is back
    with _admin(db) as admin:
        admin.execute("ALTER DATABASE request_log ALLOW_CONNECTIONS false")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'request_log'")
        for rid in ("c", "d"):
            store.log_request(request_id=rid, variant="champion", **row)
        deadline = time.monotonic() + 30
        while "write failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "write failed, 2 rows kept" in caplog.text, caplog.text
        assert store.backlog == 2
        admin.execute("ALTER DATABASE request_log ALLOW_CONNECTIONS true")
    check = create_engine(db)  # a separate reader: the writer thread must do this on its own
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with check.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM requests")).scalar()
        if n == 4:
            break
        time.sleep(0.2)
    assert n == 4 and store.dropped == 0
    check.dispose()
