"""Canary rollout end to end on the real gateway process: errors injected into the canary are
caught and it is rolled back automatically; a healthy canary is promoted; the feedback given
during the window becomes preference pairs in the next ingest."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import register_version, tiny_config

pytestmark = pytest.mark.integration


def test_rollback_on_errors_promotion_when_healthy_and_feedback_to_pairs(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from tuneloop.config import load_config
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.data.ingest import ingest
    from tuneloop.deploy.canary import analyze_canary, deploy_canary, promote, rollback, start_gateway, stop_gateway
    from tuneloop.feedback.auth import client_headers
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.registry import Registry
    from tuneloop.tiny import build_random_adapter

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, deploy__canary__requests=16))
    reg = Registry(cfg)
    bad = register_version(reg, build_random_adapter(tiny_model_dir, tmp_path / "a1", seed=1), "r1")
    good = register_version(reg, build_random_adapter(tiny_model_dir, tmp_path / "a2", seed=2), "r2")
    url = cfg.deploy.gateway_url
    gw = start_gateway(cfg)
    admin = client_headers(cfg.state_path)  # the gateway's own token (no keys configured)
    try:
        assert httpx.post(f"{url}/admin/reload").status_code == 401  # `curl -X POST .../admin/reload`
        d = deploy_canary(cfg, bad)
        assert httpx.get(f"{url}/healthz").json()["canary"] == bad
        httpx.post(f"{url}/admin/faults", json={"variant": "canary", "error_rate": 1.0}, headers=admin).raise_for_status()
        result = analyze_canary(cfg, d["deployed_at"])
        assert result["decision"] == "rollback"
        failed = {c["check"] for c in result["checks"] if not c["passed"]}
        assert failed == {"error_rate"}, result["checks"]
        assert result["figures"]["canary"]["error_rate"] == 1.0 and result["figures"]["champion"]["error_rate"] == 0
        rollback(cfg, bad)
        assert httpx.get(f"{url}/healthz").json()["canary"] is None
        assert reg.version_tags(bad)["tuneloop.rolled_back"] == "true"
        httpx.post(f"{url}/admin/faults", json={"variant": "canary"}, headers=admin).raise_for_status()

        d = deploy_canary(cfg, good)
        result = analyze_canary(cfg, d["deployed_at"])
        assert result["decision"] == "promote", result["checks"]
        promote(cfg, good)
        state = httpx.get(f"{url}/healthz").json()
        assert state["champion"] == good and state["canary"] is None
        assert reg.aliases() == {"champion": good}
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2, "user": "after-promotion"}, headers=admin)
        assert r.status_code == 200 and r.json()["tuneloop"]["version"] == good
    finally:
        stop_gateway(gw)

    rows = FeedbackStore(cfg.feedback_db).rows()
    assert rows and all(r["correction"] for r in rows if r["score"] == 0.0)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    report = ingest(cfg.data, ChatFormatter(tok), tmp_path / "next", rows)
    assert report["feedback"]["preference"] > 0, report["feedback"]
    pairs = [json.loads(line) for line in (tmp_path / "next" / "preference.jsonl").read_text().splitlines()]
    from_feedback = [p for p in pairs if p["source"] == "feedback-store"]
    assert from_feedback and all(p["slice"] in ("ticket_routing", "general_qa") for p in from_feedback)
