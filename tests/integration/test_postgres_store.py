"""The feedback store on a real PostgreSQL server (the cluster's database; sqlite is the local
default): the feedback service as its own process taking KServe payload-logger events and
feedback (authenticated: keys and the user-id secret from the environment a Secret fills), the
next ingest reading them through `deploy.feedback_store_env`, the gateway's request log, the
writer keeping rows through a refused row and a database outage, and KServe halves paired
through the database by two replicas, in either order and racing."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import httpx
import pytest
from conftest import free_port, start_until_healthy, tiny_config

pytestmark = pytest.mark.integration

ENV = "TUNELOOP_TEST_FEEDBACK_DB"
REQ, RESP = "org.kubeflow.serving.inference.request", "org.kubeflow.serving.inference.response"


def _keys() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The Secret's environment (hashed keys, the user-id secret) and each key's Authorization header."""
    from tuneloop.feedback.auth import key_line, new_token

    scopes = {"kserve": "events", "app": "feedback", "ops": "admin"}
    tokens = {n: new_token() for n in scopes}
    env = {"TUNELOOP_API_KEYS": ";".join(key_line(n, [s], tokens[n]) for n, s in scopes.items()),
           "TUNELOOP_USER_ID_SECRET": "x" * 48}
    return env, {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}


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
    secret_env, keys = _keys()
    proc = start_until_healthy([sys.executable, "-m", "tuneloop.cli", "feedback-service", "--host", "127.0.0.1",
                                "--port", str(port)], f"{url}/healthz", log_path,
                               {**os.environ, "DATABASE_URL": db, **secret_env})
    try:
        prompt = "my parcel never arrived, write to jane.doe@example.com"
        assert httpx.post(f"{url}/v1/feedback", json={"request_id": "x", "thumbs": "up"}).status_code == 401

        def served(ce_id: str, version: str, variant: str, answer: str) -> None:
            h = {"ce-id": ce_id, "ce-inferenceservicename": "tuneloop-demo", **keys["kserve"]}
            q = {"version": version, "variant": variant}
            # each half is PII-scrubbed before it is stored: the first waits for Presidio's first load
            r = httpx.post(f"{url}/v1/kserve-events", params=q, headers={**h, "ce-type": REQ}, timeout=120,
                           json={"messages": [{"role": "user", "content": prompt}], "user": "u-1"})
            assert r.json() == {"status": "pending"}, r.text
            r = httpx.post(f"{url}/v1/kserve-events", params=q, headers={**h, "ce-type": RESP}, timeout=60,
                           json={"choices": [{"message": {"content": answer}}]})
            assert r.json() == {"status": "recorded"}, r.text

        served("ev-champion", "3", "champion", "shipping")
        served("ev-canary", "4", "canary", "billing")
        fb = keys["app"]
        assert httpx.post(f"{url}/v1/feedback", json={"request_id": "ev-champion", "thumbs": "up"},
                          headers=fb).status_code == 200
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": "ev-canary", "rating": 1, "correction": "shipping"},
                       headers=fb)
        assert r.status_code == 200
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": "ev-canary", "rating": 5}, headers=fb)
        assert r.status_code == 409, "one feedback item per request"
        # the `app` key is not trusted: an admin reviews its correction before it becomes training data
        [corr] = httpx.get(f"{url}/admin/corrections", headers=keys["ops"]).json()["corrections"]
        assert corr["correction"] == "shipping" and corr["trusted"] is False
        r = httpx.post(f"{url}/admin/corrections/review", json={"ids": [corr["id"]], "trusted": True},
                       headers=keys["ops"])
        assert r.json()["changed"] == 1

        # values the database would refuse are refused at the API, naming the field
        ev = keys["kserve"]
        r = httpx.post(f"{url}/v1/kserve-events", headers={"ce-id": "x" * 100, "ce-type": "a.request", **ev},
                       json={"messages": []})
        assert r.status_code == 400 and "ce-id is 100 characters" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/kserve-events", params={"variant": "blue"},
                       headers={"ce-id": "ev-x", "ce-type": "a.request", **ev}, json={"messages": []})
        assert r.status_code == 400 and "`variant`" in r.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(20)

    monkeypatch.setenv(ENV, db)
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, deploy__feedback_store_env=ENV))
    assert cfg.feedback_db == db
    rows = FeedbackStore(cfg.feedback_db).rows()  # what the ingest stage reads
    assert len(rows) == 2 and all("jane.doe@example.com" not in r["prompt"] for r in rows), rows
    assert all(r["trusted"] for r in rows)
    assert {(r["model_version"], r["variant"]) for r in rows} == {("3", "champion"), ("4", "canary")}
    report = ingest(cfg.data, ChatFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir))), tmp_path / "next",
                    rows)
    # the up-voted champion answer beats the down-voted canary one; the correction beats the canary's answer
    assert report["feedback"]["preference"] == 2 and report["feedback"]["sft"] == 1, report["feedback"]


def test_gateway_request_log_on_postgres(postgres, tmp_path, tiny_model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from tuneloop.config import load_config
    from tuneloop.deploy.gateway import Gateway, create_app
    from tuneloop.feedback.auth import client_headers

    class Stub:
        def answer(self, messages, max_tokens):  # noqa: ANN001, ANN201
            return "shipping", 5, 1

    monkeypatch.setenv(ENV, postgres("gateway_log"))
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, deploy__feedback_store_env=ENV))
    gw = Gateway(cfg, backend_factory=lambda version: Stub())
    gw.reload()
    c = TestClient(create_app(gw), headers=client_headers(cfg.state_path))
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


def _replica(db: str, monkeypatch, env: dict[str, str]):  # noqa: ANN001, ANN202 - one feedback-service replica
    from fastapi.testclient import TestClient

    from tuneloop.config.deploy import AuthConfig, LimitsConfig
    from tuneloop.feedback.auth import Guard
    from tuneloop.feedback.service import create_feedback_service
    from tuneloop.feedback.store import FeedbackStore

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store = FeedbackStore(db)
    return TestClient(create_feedback_service(store, Guard.from_config(AuthConfig(), LimitsConfig()))), store


def test_kserve_halves_pair_across_two_replicas_on_postgres(postgres, monkeypatch):
    """prod runs two feedback-service replicas: a request's halves may land on different ones, in either
    order, at the same moment, or around a restart; each pair must become exactly one row."""
    from sqlalchemy import create_engine, text

    db = postgres("halves")
    env, keys = _keys()
    (a, store_a), (b, store_b) = _replica(db, monkeypatch, env), _replica(db, monkeypatch, env)
    ev = lambda ce, t: {"ce-id": ce, "ce-type": t, **keys["kserve"]}  # noqa: E731
    req = {"messages": [{"role": "user", "content": [{"type": "text", "text": "where is my parcel?"}]}], "user": "u-1"}
    resp = {"choices": [{"message": {"content": "shipping"}}]}
    q = {"version": "5", "variant": "canary"}
    assert a.post("/v1/kserve-events", params=q, json=req, headers=ev("one", REQ)).json() == {"status": "pending"}
    assert b.post("/v1/kserve-events", json=resp, headers=ev("one", RESP)).json() == {"status": "recorded"}
    assert a.post("/v1/kserve-events", json=resp, headers=ev("two", RESP)).json() == {"status": "pending"}
    c, _ = _replica(db, monkeypatch, env)  # a third process (a restart) takes the other half
    assert c.post("/v1/kserve-events", params=q, json=req, headers=ev("two", REQ)).json() == {"status": "recorded"}

    # race: each pair's halves sent at once to the two replicas
    n, errors = 40, []

    def send(client, ce: str, kind: str) -> None:  # noqa: ANN001
        try:
            r = client.post("/v1/kserve-events", params=q, json=req if kind == REQ else resp, headers=ev(ce, kind))
            r.raise_for_status()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = []
    for i in range(n):
        first, second = (a, b) if i % 2 else (b, a)
        threads += [threading.Thread(target=send, args=(first, f"race-{i}", REQ)),
                    threading.Thread(target=send, args=(second, f"race-{i}", RESP))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rows = {r["request_id"]: r for r in store_a.requests()}
    assert set(rows) == {"one", "two"} | {f"race-{i}" for i in range(n)}
    assert {(r["model_version"], r["variant"]) for r in rows.values()} == {("5", "canary")}
    check = create_engine(db)
    with check.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM kserve_pending")).scalar() == 0
        prompts = {p for (p,) in conn.execute(text("SELECT DISTINCT prompt FROM requests"))}
        users = {u for (u,) in conn.execute(text("SELECT DISTINCT user_id FROM requests"))}
    check.dispose()
    assert prompts == {"where is my parcel?"} and len(users) == 1 and "u-1" not in users.pop()

    # a half whose other half never comes is dropped by age, once, by whichever replica sweeps first
    a.post("/v1/kserve-events", params=q, json=req, headers=ev("orphan", REQ)).raise_for_status()
    store_a.sweep_pending(max_age_s=600, max_bytes=1 << 20, now=time.time() + 3600)
    store_b.sweep_pending(max_age_s=600, max_bytes=1 << 20, now=time.time() + 3600)
    assert store_a.halves_expired + store_b.halves_expired == 1 and store_b.halves_pending == 0
