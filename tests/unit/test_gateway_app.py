"""The serving gateway's HTTP surface, in process (FastAPI TestClient) over the tiny model, with the
gateway's own local token (no keys configured: it makes one in <state_dir>/auth/token)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.deploy.gateway import MAX_NEW_TOKENS, Gateway, create_app
from tuneloop.feedback.auth import local_token
from tuneloop.feedback.service import MAX_BODY_BYTES

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def gw(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    cfg = load_config(tiny_config(tmp_path_factory.mktemp("gateway"), tiny_model_dir))
    gw = Gateway(cfg)
    state = gw.reload()
    assert state == {"champion": "base", "canary": None, "shadow": None, "canary_percent": 0,
                     "faults": {}}  # no registry aliases yet
    return gw


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(create_app(gw), headers={"Authorization": f"Bearer {local_token(gw.cfg.state_path)}"}) as c:
        yield c


def ask(client: Any, content: str = "Where is my parcel?", **extra: Any) -> Any:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}
    return client.post(CHAT, json=body)


def metric(client: Any, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    text = client.get("/metrics").text
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def error_message(r: Any) -> str:
    body = r.json()
    assert body["error"]["code"] == r.status_code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def test_healthz(client: Any) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "champion": "base", "canary": None, "shadow": None, "canary_percent": 0,
                        "faults": {}}


def test_models_lists_the_base_model(client: Any) -> None:
    assert client.get("/v1/models").json()["data"] == [
        {"id": "base", "object": "model", "tuneloop_variant": "champion"}]


def test_chat_completion_is_openai_shaped_and_logged(client: Any, gw: Gateway) -> None:
    r = ask(client, user="alice", metadata={"slice": "ticket_routing"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])
    assert isinstance(body["created"], int)
    assert body["model"] == "tiny-model/base"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] > 5 and 0 < u["completion_tokens"] <= 3
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert body["tuneloop"] == {"variant": "champion", "version": "base"}
    logged = {x["request_id"]: x for x in gw.store.requests()}
    row = logged[body["id"]]
    assert row["variant"] == "champion" and row["model_version"] == "base" and row["status"] == "ok"
    assert row["latency_ms"] > 0 and row["score"] is None


def test_generation_is_greedy_and_repeatable(client: Any) -> None:
    a, b = ask(client, "Hello there"), ask(client, "Hello there")
    assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
    assert a.json()["id"] != b.json()["id"]


def test_feedback_is_recorded(client: Any, gw: Gateway) -> None:
    rid = ask(client, "My card was charged twice", metadata={"slice": "ticket_routing"}).json()["id"]
    before = metric(client, "tuneloop_feedback_score_count", version="base", variant="champion")
    r = client.post("/v1/feedback", json={"request_id": rid, "thumbs": "down", "correction": "billing"})
    assert r.status_code == 200 and r.json() == {"status": "recorded"}
    rows = [x for x in gw.store.rows() if x["request_id"] == rid]
    assert len(rows) == 1
    assert rows[0]["score"] == 0.0 and rows[0]["correction"] == "billing"
    assert rows[0]["prompt"] == "My card was charged twice" and rows[0]["slice"] == "ticket_routing"
    assert rows[0]["trusted"] is True and rows[0]["key"] == "local"  # the local key has the `trusted` scope
    # one feedback item per request: a second one is refused, whatever it says
    r = client.post("/v1/feedback", json={"request_id": rid, "rating": 5})
    assert r.status_code == 409 and "already has its feedback" in error_message(r)
    assert {x["request_id"]: x for x in gw.store.requests()}[rid]["score"] == 0.0
    # the feedback histogram is labelled by the version that answered
    assert metric(client, "tuneloop_feedback_score_count", version="base", variant="champion") == before + 1


@pytest.mark.parametrize("body,needle", [
    ({"request_id": "0" * 32, "thumbs": "up"}, "unknown request_id"),
])
def test_feedback_unknown_request_is_404(client: Any, body: dict[str, Any], needle: str) -> None:
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 404 and needle in error_message(r)


@pytest.mark.parametrize("body,needle", [
    ({"thumbs": "up"}, "`request_id`"),
    ({"request_id": 7, "thumbs": "up"}, "`request_id`"),
    ({"request_id": "x"}, "give one of"),
    ({"request_id": "x", "thumbs": "maybe"}, "`thumbs`"),
    ({"request_id": "x", "rating": 9}, "`rating`"),
    ({"request_id": "x", "correction": 3}, "`correction`"),
    ([1, 2], "`request_id`"),
])
def test_bad_feedback_is_400(client: Any, body: Any, needle: str) -> None:
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 400 and needle in error_message(r)


def test_malformed_json_is_400(client: Any) -> None:
    r = client.post(CHAT, content=b'{"messages": [{"role": "user", "content": "hi"',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in error_message(r)
    r = client.post(CHAT, content=b'\xff\xfe{}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in error_message(r)
    r = client.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in error_message(r)


def test_oversized_body_is_413(client: Any) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]})
    r = client.post(CHAT, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY_BYTES) in error_message(r)
    r = client.post("/v1/feedback", content=json.dumps({"request_id": "x", "correction": "y" * MAX_BODY_BYTES}))
    assert r.status_code == 413


@pytest.mark.parametrize("body,needle", [
    ({}, "`messages` must be a non-empty list"),
    ({"messages": []}, "`messages` must be a non-empty list"),
    ({"messages": "hello"}, "`messages` must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "`messages[0]`"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}, "`messages[1]`"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "`messages[0].content[0]`"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "`messages[0]`"),
    ({"messages": ["hi"]}, "`messages[0]`"),
    ([{"role": "user", "content": "hi"}], "JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_NEW_TOKENS + 1}, "`max_tokens`"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "`max_tokens`"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "`max_tokens`"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, ""),
])
def test_bad_chat_requests_are_400(client: Any, body: Any, needle: str) -> None:
    r = client.post(CHAT, json=body)
    assert r.status_code == 400, r.text
    assert needle in error_message(r)


def test_pinned_models(client: Any) -> None:
    r = ask(client, model="no-such-version")
    assert r.status_code == 404
    assert "no-such-version" in error_message(r)
    for pinned in ("base", "champion"):
        r = ask(client, model=pinned)
        assert r.status_code == 200 and r.json()["tuneloop"]["version"] == "base"


def test_metrics_count_requests_by_version(client: Any) -> None:
    ok = dict(version="base", variant="champion", status="ok")
    before = metric(client, "tuneloop_requests_total", **ok)
    assert ask(client).status_code == 200
    assert ask(client, model="nope").status_code == 404
    assert client.post(CHAT, json={"messages": []}).status_code == 400
    assert metric(client, "tuneloop_requests_total", **ok) == before + 1  # refused requests are not served ones
    assert metric(client, "tuneloop_request_latency_seconds_count", version="base", variant="champion") >= 1
    assert metric(client, "tuneloop_completion_tokens_total", version="base", variant="champion") >= 1
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_model_failure_is_500_counted_and_logged(client: Any, gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    err = dict(version="base", variant="champion", status="error")
    before = metric(client, "tuneloop_requests_total", **err)
    monkeypatch.setattr(gw, "generate", broken)
    r = ask(client, "this one fails")
    assert r.status_code == 500 and "simulated" in error_message(r)
    assert metric(client, "tuneloop_requests_total", **err) == before + 1
    failed = [x for x in gw.store.requests() if x["status"] == "error"]
    assert failed and failed[-1]["model_version"] == "base"
    monkeypatch.undo()
    assert ask(client).status_code == 200


def test_serving_survives_bad_requests(client: Any) -> None:
    client.post(CHAT, content=b"{", headers={"content-type": "application/json"})
    client.post(CHAT, content=b"x" * (MAX_BODY_BYTES + 1))
    client.post(CHAT, json={"messages": [{"role": "wizard", "content": "?"}]})
    client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "model": "ghost"})
    client.post("/v1/feedback", json={"request_id": "ghost", "thumbs": "up"})
    assert client.get("/healthz").json()["status"] == "ok"
    r = ask(client, "Still there?")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_reload_keeps_serving_the_base_model(client: Any) -> None:
    r = client.post("/admin/reload")
    assert r.status_code == 200 and r.json()["champion"] == "base"
    assert ask(client).status_code == 200


def test_fault_injection_fails_only_the_chosen_variant_and_clears(client: Any, gw: Gateway) -> None:
    r = client.post("/admin/faults", json={"variant": "champion", "error_rate": 1.0})
    assert r.status_code == 200 and r.json()["faults"] == {"champion": {"error_rate": 1.0, "added_latency_ms": 0.0}}
    bad = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
    assert client.post("/admin/faults", json={"variant": "champion"}).json()["faults"] == {}
    ok = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200
    assert client.post("/admin/faults", json={"variant": "nope", "error_rate": 1}).status_code == 400
    assert client.post("/admin/faults", json={"variant": "canary", "error_rate": 2}).status_code == 400


@pytest.mark.parametrize("raw", [
    b'{"variant": "champion", "added_latency_ms": NaN}',
    b'{"variant": "champion", "added_latency_ms": Infinity}',
    b'{"variant": "champion", "added_latency_ms": 1e400}',
    b'{"variant": "champion", "added_latency_ms": 1e12}',
    b'{"variant": "champion", "error_rate": NaN}',
    b'{"variant": "champion", "error_rate": "0.5"}',
    b'{"variant": "champion", "error_rate": true}',
])
def test_fault_injection_refuses_non_finite_and_huge_values(client: Any, gw: Gateway, raw: bytes) -> None:
    """NaN compares false with every bound, so `not 0 <= NaN` let it through; 1e12 ms slept for 31 years."""
    r = client.post("/admin/faults", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "champion" not in gw.faults
