"""`tuneloop serve`: the local serving gateway (the cluster uses KServe instead).

OpenAI-compatible `POST /v1/chat/completions` serving the registry's `champion` (the base
model until one exists) and, when set, the `canary`, to a configured share of users - sticky
per user id. Every request is logged to the feedback store; `POST /v1/feedback` attaches a
rating, thumbs up/down or correction to it. `/metrics` (Prometheus) labels requests, errors,
latency, tokens and feedback by model version; `/healthz`; `POST /admin/reload` re-reads the
aliases and swaps models without dropping in-flight requests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tuneloop.config import RunConfig
from tuneloop.monitor.feedback import FeedbackStore

log = logging.getLogger("tuneloop.gateway")
MAX_BODY_BYTES = 256 * 1024
MAX_NEW_TOKENS = 256


@dataclass
class Variant:
    role: str  # champion | canary
    version: str  # registry version, or "base"
    model: Any
    tokenizer: Any
    lock: threading.Lock


def in_canary(user_id: str, percent: int) -> bool:
    """Sticky split: a user id always lands on the same side for a given percentage."""
    return int(hashlib.sha256(user_id.encode()).hexdigest()[:8], 16) % 100 < percent


class Gateway:
    def __init__(self, cfg: RunConfig) -> None:
        from tuneloop.data.formatting import ChatFormatter  # noqa: F401 - fail early if the extra is missing
        from tuneloop.registry import Registry

        self.cfg = cfg
        self.registry = Registry(cfg)
        self.store = FeedbackStore(cfg.feedback_db)
        self.cache_dir = cfg.state_path / "serving"
        self.variants: dict[str, Variant] = {}
        self.canary_percent = 0
        self._loaded: dict[str, Variant] = {}
        self._reload_lock = threading.Lock()
        self.metrics = CollectorRegistry()
        labels = ["version", "variant"]
        self.m_requests = Counter("tuneloop_requests", "Chat requests served", [*labels, "status"],
                                  registry=self.metrics)
        self.m_latency = Histogram("tuneloop_request_latency_seconds", "End-to-end latency", labels,
                                   registry=self.metrics,
                                   buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.m_tokens = Counter("tuneloop_completion_tokens", "Generated tokens", labels, registry=self.metrics)
        self.m_feedback = Histogram("tuneloop_feedback_score", "Feedback score (0 bad .. 1 good)", labels,
                                    registry=self.metrics, buckets=(0, .25, .5, .75, 1))

    # -- models --
    def _load(self, role: str, version: str | None) -> Variant:
        from tuneloop.models import load_causal_lm, materialize_base_model

        key = version or "base"
        if key in self._loaded:
            v = self._loaded[key]
            return Variant(role, v.version, v.model, v.tokenizer, v.lock)
        base_dir = materialize_base_model(self.cfg.base_model, self.cfg.state_path)
        adapter = None
        if version is not None:
            mv = self.registry.client.get_model_version(self.registry.name, version)
            adapter = self.registry.download_adapter(mv, self.cache_dir)
        model, tok = load_causal_lm(base_dir, adapter)
        v = Variant(role, key, model, tok, threading.Lock())
        self._loaded[key] = v
        log.info("loaded %s as %s", key, role)
        return v

    def reload(self) -> dict[str, Any]:
        """Re-read aliases; build the new routing table first, then swap it in one assignment."""
        with self._reload_lock:
            champ = self.registry.alias_version("champion")
            canary = self.registry.alias_version("canary")
            new = {"champion": self._load("champion", champ.version if champ else None)}
            percent = 0
            if canary is not None:
                new["canary"] = self._load("canary", canary.version)
                percent = int(canary.tags.get("tuneloop.canary_percent", self.cfg.deploy.canary.traffic_percent))
            self.variants, self.canary_percent = new, percent  # atomic swap; in-flight requests keep theirs
            keep = {v.version for v in new.values()}
            self._loaded = {k: v for k, v in self._loaded.items() if k in keep}
            return self.state()

    def state(self) -> dict[str, Any]:
        return {"champion": self.variants["champion"].version if "champion" in self.variants else None,
                "canary": self.variants["canary"].version if "canary" in self.variants else None,
                "canary_percent": self.canary_percent}

    def route(self, user_id: str, pinned: str | None) -> Variant:
        variants = self.variants
        if pinned:
            for v in variants.values():
                if pinned in (v.role, v.version):
                    return v
            raise KeyError(pinned)
        if "canary" in variants and in_canary(user_id, self.canary_percent):
            return variants["canary"]
        return variants["champion"]

    def generate(self, v: Variant, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        import torch

        from tuneloop.data.formatting import ChatFormatter

        prompt = ChatFormatter(v.tokenizer, self.cfg.data.system_prompt).prompt(messages)
        enc = v.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(v.model.parameters()).device)
        with v.lock, torch.no_grad():
            out = v.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                   pad_token_id=v.tokenizer.pad_token_id, eos_token_id=v.tokenizer.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        return v.tokenizer.decode(new, skip_special_tokens=True).strip(), enc["input_ids"].shape[1], len(new)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


def _check_messages(body: Any) -> list[dict[str, str]]:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("`messages` must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"`messages[{i}]` needs a role (system/user/assistant) and string content")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="tuneloop gateway")

    async def _json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise OverflowError(f"body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        import json

        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"malformed JSON: {e}") from None

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", **gw.state()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(gw.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload() -> dict[str, Any]:
        return gw.reload()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": v.version, "object": "model", "tuneloop_variant": v.role}
                                           for v in gw.variants.values()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        try:
            body = await _json(request)
            messages = _check_messages(body)
            max_tokens = 64 if body.get("max_tokens") is None else int(body["max_tokens"])  # 0 is not "default"
            if not 1 <= max_tokens <= MAX_NEW_TOKENS:
                raise ValueError(f"`max_tokens` must be 1..{MAX_NEW_TOKENS}")
        except OverflowError as e:
            return _error(413, str(e))
        except (ValueError, TypeError) as e:
            return _error(400, str(e))
        user = str(body.get("user") or (request.client.host if request.client else "anonymous"))
        try:
            variant = gw.route(user, body.get("model"))
        except KeyError:
            return _error(404, f"unknown model {body.get('model')!r}; serving {sorted(gw.state().values(), key=str)}")
        rid = uuid.uuid4().hex
        started = time.perf_counter()
        status, text, p_tok, c_tok = "ok", "", 0, 0
        try:
            from starlette.concurrency import run_in_threadpool

            text, p_tok, c_tok = await run_in_threadpool(gw.generate, variant, messages, max_tokens)
        except Exception as e:  # the model failed: count it, log it, answer 500
            status = "error"
            log.exception("generation failed on %s", variant.version)
            err = str(e)
        latency = time.perf_counter() - started
        gw.m_requests.labels(variant.version, variant.role, status).inc()
        gw.m_latency.labels(variant.version, variant.role).observe(latency)
        gw.m_tokens.labels(variant.version, variant.role).inc(c_tok)
        meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        gw.store.log_request(request_id=rid, user_id=user, model_version=variant.version, variant=variant.role,
                             slice=str(meta.get("slice", "")), prompt=messages[-1]["content"], output=text,
                             status=status, latency_ms=latency * 1000)
        if status == "error":
            return _error(500, f"model {variant.version} failed: {err}")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": f"{gw.registry.name}/{variant.version}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if c_tok >= max_tokens else "stop"}],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok},
            "tuneloop": {"variant": variant.role, "version": variant.version}})

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        try:
            body = await _json(request)
            if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
                raise ValueError("`request_id` (string) is required")
            score = feedback_score(body)
            corr = body.get("correction")
            if corr is not None and not isinstance(corr, str):
                raise ValueError("`correction` must be a string")
            if score is None and not corr:
                raise ValueError("give one of `thumbs` (up/down), `rating` (1-5), `score` (0-1) or `correction`")
        except OverflowError as e:
            return _error(413, str(e))
        except ValueError as e:
            return _error(400, str(e))
        if not gw.store.add_feedback(body["request_id"], score, corr):
            return _error(404, f"unknown request_id {body['request_id']!r}")
        served_by = gw.store.served_by(body["request_id"]) if score is not None else None
        if served_by is not None:
            gw.m_feedback.labels(*served_by).observe(score)
        return JSONResponse({"status": "recorded"})

    return app


def feedback_score(body: dict[str, Any]) -> float | None:
    """thumbs up/down, a 1-5 rating or a 0-1 score -> one score in [0, 1]."""
    if "thumbs" in body:
        if body["thumbs"] not in ("up", "down"):
            raise ValueError("`thumbs` must be 'up' or 'down'")
        return 1.0 if body["thumbs"] == "up" else 0.0
    if "rating" in body:
        r = body["rating"]
        if not isinstance(r, (int, float)) or not 1 <= r <= 5:
            raise ValueError("`rating` must be a number from 1 to 5")
        return (float(r) - 1) / 4
    if "score" in body:
        s = body["score"]
        if not isinstance(s, (int, float)) or not 0 <= s <= 1:
            raise ValueError("`score` must be a number from 0 to 1")
        return float(s)
    return None


def serve(cfg: RunConfig, host: str, port: int) -> None:
    import uvicorn

    gw = Gateway(cfg)
    gw.reload()
    log.info("gateway on http://%s:%d serving %s", host, port, gw.state())
    uvicorn.run(create_app(gw), host=host, port=port, log_level="warning", workers=1)


def gateway_state_file(cfg: RunConfig) -> Path:
    return cfg.state_path / "gateway.json"
