"""Authentication of the gateway and the feedback service: keys hashed at rest, 401 without or with a
wrong token, 403 without the scope, the local gateway's own token, auth that cannot be left
unconfigured on a cluster, and the explicit (loud) development switch."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from authkit import USER_SECRET, make_guard
from conftest import tiny_config
from fastapi.testclient import TestClient

from tuneloop.config import load_config
from tuneloop.config.deploy import AuthConfig, LimitsConfig
from tuneloop.feedback.auth import (AuthNotConfigured, Guard, KeyRing, UserHasher, client_headers, hash_token,
                                    key_line, local_token, new_token, parse_keys)
from tuneloop.feedback.service import create_feedback_service
from tuneloop.feedback.store import FeedbackStore

pytestmark = pytest.mark.unit


class Stub:
    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        return "ok", 3, 1


def _gateway(tmp_path: Path, tiny_model_dir: Path, **overrides: Any) -> Any:
    from tuneloop.deploy.gateway import Gateway

    gw = Gateway(load_config(tiny_config(tmp_path, tiny_model_dir, **overrides)), backend_factory=lambda v: Stub())
    gw.reload()
    return gw


GATEWAY_ENDPOINTS = [("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "chat"),
                     ("get", "/v1/models", None, "chat"),
                     ("post", "/v1/feedback", {"request_id": "x", "thumbs": "up"}, "feedback"),
                     ("post", "/admin/reload", None, "admin"),
                     ("post", "/admin/faults", {"variant": "canary", "error_rate": 1.0}, "admin"),
                     ("get", "/admin/corrections", None, "admin"),
                     ("post", "/admin/corrections/review", {"ids": [1], "trusted": True}, "admin")]


def _call(c: TestClient, method: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return c.post(path, json=body, headers=headers) if method == "post" else c.get(path, headers=headers)


def test_every_gateway_endpoint_but_health_and_metrics_needs_a_token_with_its_scope(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    keys = {"frontend": "chat,feedback", "ops": "admin", "nothing": "events"}
    tokens = {n: new_token() for n in keys}
    monkeypatch.setenv("TUNELOOP_API_KEYS", "\n".join(key_line(n, s.split(","), tokens[n]) for n, s in keys.items()))
    gw = _gateway(tmp_path, tiny_model_dir)
    c = TestClient(create_app_for(gw))
    assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
    for method, path, body, scope in GATEWAY_ENDPOINTS:
        r = _call(c, method, path, body)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == 401 and "Bearer" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = _call(c, method, path, body, {"Authorization": "Bearer tl_" + "A" * 43})
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid token", path
        r = _call(c, method, path, body, {"Authorization": f"Basic {tokens['frontend']}"})
        assert r.status_code == 401, path
        r = _call(c, method, path, body, {"Authorization": f"Bearer {tokens['nothing']}"})
        assert r.status_code == 403 and f"`{scope}` scope" in r.json()["error"]["message"], path
        owner = "ops" if scope == "admin" else "frontend"
        r = _call(c, method, path, body, {"Authorization": f"Bearer {tokens[owner]}"})
        assert r.status_code not in (401, 403), (path, r.text)
    assert 'tuneloop_refused_total{status="401"}' in c.get("/metrics").text
    assert not (tmp_path / "state" / "auth" / "token").exists(), "configured keys: no local token is made"


def create_app_for(gw: Any) -> Any:
    from tuneloop.deploy.gateway import create_app

    return create_app(gw)


def test_without_configured_keys_the_gateway_makes_its_own_token_and_admin_stays_closed(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    monkeypatch.delenv("TUNELOOP_API_KEYS", raising=False)
    monkeypatch.delenv("TUNELOOP_API_TOKEN", raising=False)
    gw = _gateway(tmp_path, tiny_model_dir)
    path = tmp_path / "state" / "auth" / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = local_token(tmp_path / "state")
    assert token and token.startswith("tl_") and len(token) >= 40
    c = TestClient(create_app_for(gw))
    assert c.post("/admin/reload").status_code == 401  # never open by default
    assert c.post("/admin/reload", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # what the in-repo clients (canary replay and reload, the benchmark) send
    assert client_headers(tmp_path / "state") == {"Authorization": f"Bearer {token}"}
    monkeypatch.setenv("TUNELOOP_API_TOKEN", "tl_from_env")
    assert client_headers(tmp_path / "state") == {"Authorization": "Bearer tl_from_env"}
    # a restart keeps the token (clients that read it keep working) and the user-id secret
    secret = (tmp_path / "state" / "auth" / "user-id-secret").read_text()
    gw2 = _gateway(tmp_path, tiny_model_dir)
    assert local_token(tmp_path / "state") == token
    assert (tmp_path / "state" / "auth" / "user-id-secret").read_text() == secret
    assert gw2.guard.users("alice") == gw.guard.users("alice")


def test_keys_are_kept_as_sha256_only_and_a_bad_line_is_named(tmp_path):
    token = new_token()
    line = key_line("web", ["chat", "feedback"], token)
    assert token not in line and line.endswith(f"sha256:{hash_token(token)}")
    f = tmp_path / "keys"
    f.write_text(f"# the Secret\n{line}\n")
    ring = KeyRing(f)
    who = ring.lookup(token)
    assert who is not None and who.name == "web" and who.scopes == {"chat", "feedback"} and not who.trusted
    assert ring.lookup(token + "x") is None and ring.lookup("") is None
    for bad, needle in ((f"web chat {token}", "hash must be sha256"), ("web chat", "expected `NAME SCOPES"),
                        (f"web root sha256:{'0' * 64}", "unknown scope"),
                        (f"a chat sha256:{'0' * 64}\na feedback sha256:{'1' * 64}", "appears twice")):
        with pytest.raises(ValueError, match=needle) as e:
            parse_keys(bad, "keys.txt")
        assert "keys.txt: line" in str(e.value)


def test_a_rotated_key_file_takes_effect_without_a_restart(tmp_path):
    old, new = new_token(), new_token()
    f = tmp_path / "keys"
    f.write_text(key_line("web", ["chat"], old) + "\n")
    ring = KeyRing(f)
    assert ring.lookup(old, now=0.0) is not None
    f.write_text(key_line("web", ["chat"], new) + "\n")
    os.utime(f, (1, 1))  # a different stamp, whatever the clock's resolution
    assert ring.lookup(new, now=100.0) is not None and ring.lookup(old, now=200.0) is None
    f.write_text("garbage\n")  # a broken update keeps the keys read before
    os.utime(f, (2, 2))
    assert ring.lookup(new, now=300.0) is not None


def test_the_feedback_service_needs_keys_and_the_user_id_secret(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNELOOP_API_KEYS", raising=False)
    monkeypatch.delenv("TUNELOOP_USER_ID_SECRET", raising=False)
    with pytest.raises(AuthNotConfigured, match="no API keys"):
        Guard.from_config(AuthConfig(), LimitsConfig())
    monkeypatch.setenv("TUNELOOP_API_KEYS", key_line("k", ["events"], new_token()))
    with pytest.raises(AuthNotConfigured, match="no user-id secret"):
        Guard.from_config(AuthConfig(), LimitsConfig())
    monkeypatch.setenv("TUNELOOP_USER_ID_SECRET", "short")
    with pytest.raises(AuthNotConfigured, match="at least 32"):
        Guard.from_config(AuthConfig(), LimitsConfig())
    # the command refuses to start, in one line, before it listens
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.delenv("TUNELOOP_API_KEYS")
    r = CliRunner().invoke(app, ["feedback-service", "--database-url", str(tmp_path / "fb.db"), "--port", "1"])
    assert r.exit_code == 2 and "no API keys" in r.output


def test_feedback_service_endpoints_need_their_scopes_and_the_logger_may_use_the_query(tmp_path, monkeypatch):
    guard, h = make_guard(monkeypatch, {"kserve": "events", "app": "feedback", "ops": "admin"})
    c = TestClient(create_feedback_service(FeedbackStore(tmp_path / "fb.db"), guard))
    ev = {"ce-id": "e1", "ce-type": "org.kubeflow.serving.inference.request"}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert c.post("/v1/kserve-events", json=body, headers=ev).status_code == 401
    assert c.post("/v1/kserve-events", json=body, headers={**ev, **h["app"]}).status_code == 403
    token = h["kserve"]["Authorization"].split()[1]
    # KServe's payload logger cannot send headers: its URL carries the token
    r = c.post("/v1/kserve-events", params={"access_token": token}, json=body, headers=ev)
    assert r.status_code == 200 and r.json() == {"status": "pending"}
    # ... but only there: the feedback endpoint takes the header only
    r = c.post("/v1/feedback", params={"access_token": h["app"]["Authorization"].split()[1]},
               json={"request_id": "e1", "thumbs": "up"})
    assert r.status_code == 401
    assert c.post("/v1/feedback", json={"request_id": "e1", "thumbs": "up"}, headers=h["kserve"]).status_code == 403
    assert c.get("/admin/corrections", headers=h["app"]).status_code == 403
    assert c.get("/admin/corrections", headers=h["ops"]).status_code == 200
    assert c.get("/healthz").status_code == 200 and "tuneloop_kserve_halves_expired" in c.get("/metrics").text


def test_auth_off_is_explicit_loud_and_refused_on_a_cluster(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from tuneloop.config import ConfigError

    monkeypatch.delenv("TUNELOOP_API_KEYS", raising=False)
    caplog.set_level(logging.WARNING, logger="tuneloop.auth")
    gw = _gateway(tmp_path, tiny_model_dir, deploy__auth__enabled=False)
    assert "AUTHENTICATION IS OFF" in caplog.text
    c = TestClient(create_app_for(gw))
    assert c.post("/admin/reload").status_code == 200
    assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert gw.guard.trusted(gw.guard.authorize(None, "feedback")) is False  # nobody is trusted without keys
    with pytest.raises(ConfigError, match="deploy.auth.enabled: false is for local development only"):
        load_config(tiny_config(tmp_path / "k", tiny_model_dir, deploy__auth__enabled=False, deploy__backend="kserve",
                                deploy__kserve={"base_model_uri": "s3://b/m"}))
    with pytest.raises(ConfigError, match="keys_file"):
        load_config(tiny_config(tmp_path / "r", tiny_model_dir, deploy__auth__keys_file="keys.txt"))


def test_user_ids_are_keyed_pseudonyms():
    h = UserHasher(USER_SECRET.encode())
    a = h("alice")
    assert a.startswith("u_") and len(a) == 34 and "alice" not in a
    assert h("alice") == a and h("bob") != a and h("") == ""
    assert UserHasher(b"t" * 40)("alice") != a  # another secret, other pseudonyms: not joinable
    with pytest.raises(ValueError):
        UserHasher(b"short")


def test_api_key_command_prints_the_token_and_its_hashed_line():
    from typer.testing import CliRunner

    from tuneloop.cli import app

    r = CliRunner().invoke(app, ["api-key", "kserve-logger", "--scopes", "events"])
    assert r.exit_code == 0, r.output
    token = r.output.split("token: ")[1].split()[0]
    line = r.output.split("key line: ")[1].strip()
    assert line == key_line("kserve-logger", ["events"], token)
    assert parse_keys(line, "x")[0].principal.scopes == {"events"}
    assert CliRunner().invoke(app, ["api-key", "x", "--scopes", "root"]).exit_code == 2
