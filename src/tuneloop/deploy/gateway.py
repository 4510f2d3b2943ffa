"""`tuneloop serve`: the local serving gateway (the cluster uses KServe instead).

OpenAI-compatible `POST /v1/chat/completions` serving the registry's `champion` (the base
model until one exists) and, when set, the `canary`, to a configured share of users - sticky
per user id. Every request is logged to the feedback store; `POST /v1/feedback` attaches a
rating, thumbs up/down or correction to it. `/metrics` (Prometheus) labels requests, errors,
latency, tokens and feedback by model version; `/healthz`; `POST /admin/reload` re-reads the
aliases and swaps models without dropping in-flight requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tuneloop.config import RunConfig
from tuneloop.feedback.service import add_feedback_route, error, read_json, store_lifespan
from tuneloop.feedback.store import FeedbackStore, check_request_fields

log = logging.getLogger("tuneloop.gateway")
MAX_NEW_TOKENS = 256
SWITCH_INTERVAL_S = 0.0005


class Backend(Protocol):
    """What answers a variant's requests: the HF model here; a stub in the load benchmark."""

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]: ...


class HFBackend:
    """Base model (+ merged LoRA adapter) generating greedily, one request at a time."""

    def __init__(self, model: Any, tokenizer: Any, system_prompt: str | None) -> None:
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.lock = threading.Lock()

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        import torch

        from tuneloop.data.formatting import ChatFormatter

        tok = self.tokenizer
        prompt = ChatFormatter(tok, self.system_prompt).prompt(messages)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(next(self.model.parameters()).device)
        with self.lock, torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        return tok.decode(new, skip_special_tokens=True).strip(), enc["input_ids"].shape[1], len(new)


@dataclass
class Variant:
    role: str  # champion | canary | shadow
    version: str  # registry version, or "base"
    backend: Backend


class RequestLogCollector:
    """The request log's health on /metrics: rows the database refused, rows given up on
    during an outage, rows waiting to be written (alert on a backlog that keeps growing)."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily("tuneloop_request_log_rejected", "Logged requests the database refused "
                                  "(each named in the gateway's log)", value=self.store.rejected)
        yield CounterMetricFamily("tuneloop_request_log_dropped", "Logged requests given up on while the "
                                  "database was unreachable", value=self.store.dropped)
        yield GaugeMetricFamily("tuneloop_request_log_backlog", "Logged requests not yet written",
                                value=self.store.backlog)


def in_canary(user_id: str, percent: int) -> bool:
    """Sticky split: a user id always lands on the same side for a given percentage."""
    return int(hashlib.sha256(user_id.encode()).hexdigest()[:8], 16) % 100 < percent


class Gateway:
    def __init__(self, cfg: RunConfig, backend_factory: Callable[[str | None], Backend] | None = None) -> None:
        from tuneloop.registry import Registry

        self.cfg = cfg
        self._backend_factory = backend_factory or self.load_backend
        self.registry = Registry(cfg)
        self.store = FeedbackStore(cfg.feedback_db, scrubber=pii_scrubber(cfg))
        self.faults: dict[str, dict[str, float]] = {}  # role -> {error_rate, added_latency_ms} (admin, game days)
        self.cache_dir = cfg.state_path / "serving"
        self.variants: dict[str, Variant] = {}
        self.canary_percent = 0
        self._loaded: dict[str, Backend] = {}
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
        self.metrics.register(RequestLogCollector(self.store))

    # -- models --
    def load_backend(self, version: str | None) -> Backend:
        """The HF backend of a registry version (None: the base model)."""
        from tuneloop.models import load_causal_lm, materialize_base_model

        base_dir = materialize_base_model(self.cfg.base_model, self.cfg.state_path)
        adapter = None
        if version is not None:
            mv = self.registry.model_version(version)
            adapter = self.registry.download_adapter(mv, self.cache_dir)
        return HFBackend(*load_causal_lm(base_dir, adapter), self.cfg.data.system_prompt)

    def _load(self, role: str, version: str | None) -> Variant:
        key = version or "base"
        if key not in self._loaded:
            self._loaded[key] = self._backend_factory(version)
            log.info("loaded %s as %s", key, role)
        return Variant(role, key, self._loaded[key])

    def reload(self) -> dict[str, Any]:
        """Re-read aliases; build the new routing table first, then swap it in one assignment."""
        with self._reload_lock:
            champ = self.registry.alias_version("champion")
            canary = self.registry.alias_version("canary")
            shadow = self.registry.alias_version("shadow")
            new = {"champion": self._load("champion", str(champ.version) if champ else None)}
            percent = 0
            if canary is not None:
                new["canary"] = self._load("canary", str(canary.version))
                percent = int(canary.tags.get("tuneloop.canary_percent", self.cfg.deploy.canary.traffic_percent))
            if shadow is not None:  # mirrored traffic only: its answers are logged, never returned
                new["shadow"] = self._load("shadow", str(shadow.version))
            self.variants, self.canary_percent = new, percent  # atomic swap; in-flight requests keep theirs
            keep = {v.version for v in new.values()}
            self._loaded = {k: b for k, b in self._loaded.items() if k in keep}
            return self.state()

    def state(self) -> dict[str, Any]:
        return {"champion": self.variants["champion"].version if "champion" in self.variants else None,
                "canary": self.variants["canary"].version if "canary" in self.variants else None,
                "shadow": self.variants["shadow"].version if "shadow" in self.variants else None,
                "canary_percent": self.canary_percent, "faults": self.faults}

    def route(self, user_id: str, pinned: str | None) -> Variant:
        variants = self.variants
        if pinned:
            for v in (v for v in variants.values() if v.role != "shadow"):
                if pinned in (v.role, v.version):
                    return v
            raise KeyError(pinned)
        if "canary" in variants and in_canary(user_id, self.canary_percent):
            return variants["canary"]
        return variants["champion"]

    def mirror(self, v: Variant, messages: list[dict[str, str]], max_tokens: int, user: str, slice_: str) -> None:
        """Shadow mode: the same request on the shadow model, logged for analysis only."""
        started = time.perf_counter()
        status, text = "ok", ""
        try:
            text, _, c_tok = self.generate(v, messages, max_tokens)
            self.m_tokens.labels(v.version, v.role).inc(c_tok)
        except Exception:  # noqa: BLE001 - a failing shadow must never touch serving
            status = "error"
        latency = time.perf_counter() - started
        self.m_requests.labels(v.version, v.role, status).inc()
        self.m_latency.labels(v.version, v.role).observe(latency)
        self.store.log_request(request_id=uuid.uuid4().hex, user_id=user, model_version=v.version, variant=v.role,
                               slice=slice_, prompt=messages[-1]["content"], output=text, status=status,
                               latency_ms=latency * 1000)

    def generate(self, v: Variant, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        fault = self.faults.get(v.role)
        if fault:
            time.sleep(fault.get("added_latency_ms", 0.0) / 1000)
            if random.random() < fault.get("error_rate", 0.0):
                raise RuntimeError(f"injected fault on {v.role} (POST /admin/faults)")
        return v.backend.answer(messages, max_tokens)


def pii_scrubber(cfg: RunConfig) -> Any | None:
    """The data plane's PII scrubber, so the feedback store never holds raw PII (None if disabled)."""
    pii = getattr(cfg.data, "pii", None)
    if pii is None or not pii.enabled:
        return None
    from tuneloop.data.pii import PiiScrubber

    return PiiScrubber(pii)


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
    app = FastAPI(title="tuneloop gateway", lifespan=store_lifespan(gw.store))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", **gw.state()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(gw.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload() -> dict[str, Any]:
        return gw.reload()

    @app.post("/admin/faults")
    async def faults(request: Request) -> JSONResponse:
        """Inject errors/latency into one variant (game days, rollback drills); {} clears it."""
        try:
            body = await read_json(request)
            role = body.get("variant") if isinstance(body, dict) else None
            if role not in ("champion", "canary", "shadow"):
                raise ValueError("`variant` must be champion, canary or shadow")
            rate, delay = float(body.get("error_rate", 0.0)), float(body.get("added_latency_ms", 0.0))
            if not 0 <= rate <= 1 or delay < 0:
                raise ValueError("`error_rate` must be 0..1 and `added_latency_ms` >= 0")
        except (ValueError, TypeError, OverflowError) as e:
            return error(400, str(e))
        if rate == 0 and delay == 0:
            gw.faults.pop(role, None)
        else:
            gw.faults[role] = {"error_rate": rate, "added_latency_ms": delay}
        return JSONResponse(gw.state())

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": v.version, "object": "model", "tuneloop_variant": v.role}
                                           for v in gw.variants.values()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        try:
            body = await read_json(request)
            messages = _check_messages(body)
            max_tokens = 64 if body.get("max_tokens") is None else int(body["max_tokens"])  # 0 is not "default"
            if not 1 <= max_tokens <= MAX_NEW_TOKENS:
                raise ValueError(f"`max_tokens` must be 1..{MAX_NEW_TOKENS}")
        except OverflowError as e:
            return error(413, str(e))
        except (ValueError, TypeError) as e:
            return error(400, str(e))
        user = str(body.get("user") or (request.client.host if request.client else "anonymous"))
        meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        slice_ = str(meta.get("slice", ""))
        try:
            check_request_fields({"user_id": "`user`", "slice": "`metadata.slice`"}, user_id=user, slice=slice_)
        except ValueError as e:
            return error(400, str(e))
        try:
            variant = gw.route(user, body.get("model"))
        except KeyError:
            return error(404, f"unknown model {body.get('model')!r}; serving {sorted(gw.state().values(), key=str)}")
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
        gw.store.log_request(request_id=rid, user_id=user, model_version=variant.version, variant=variant.role,
                             slice=slice_, prompt=messages[-1]["content"], output=text,
                             status=status, latency_ms=latency * 1000)
        shadow = gw.variants.get("shadow")
        if shadow is not None:  # mirror: answer in the background, log it, never return it
            asyncio.get_running_loop().run_in_executor(None, gw.mirror, shadow, messages, max_tokens, user, slice_)
        if status == "error":
            return error(500, f"model {variant.version} failed: {err}")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": f"{gw.registry.name}/{variant.version}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if c_tok >= max_tokens else "stop"}],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok},
            "tuneloop": {"variant": variant.role, "version": variant.version}})

    add_feedback_route(app, gw.store, lambda version, variant, score: gw.m_feedback.labels(version, variant)
                       .observe(score))
    return app


def serve(cfg: RunConfig, host: str, port: int) -> None:
    import sys

    import uvicorn

    # Background work (alias reloads, batched store writes) is GIL-bound Python; a short switch
    # interval keeps the event loop answering while it runs (p99 under load, see bench/).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gw = Gateway(cfg)
    gw.reload()
    log.info("gateway on http://%s:%d serving %s", host, port, gw.state())
    uvicorn.run(create_app(gw), host=host, port=port, log_level="warning", workers=1)
