"""`tuneloop serve`: the local serving gateway (the cluster uses KServe instead).

OpenAI-compatible `POST /v1/chat/completions` serving the registry's `champion` (the base
model until one exists) and, when set, the `canary`, to a configured share of users - sticky
per user id. Every request is logged to the feedback store; `POST /v1/feedback` attaches a
rating, thumbs up/down or correction to it. `/metrics` (Prometheus) labels requests, errors,
latency, tokens and feedback by model version; `/healthz`; `POST /admin/reload` re-reads the
aliases and swaps models without dropping in-flight requests.

Hardening (the loop learns from what users send, so the write path is guarded):
- Every endpoint but /healthz and /metrics needs a bearer token with its scope (chat, feedback,
  admin; feedback/auth.py). With no keys configured the gateway makes its own token in
  <state_dir>/auth/token (scopes chat, feedback, admin, trusted; mode 0600) and the in-repo
  clients (canary replay and reload, the benchmark) read it there; `deploy.auth.enabled: false`
  opens everything for development, loudly. The admin endpoints are never open by default.
- Bodies are streamed against `deploy.limits.max_body_bytes` (413); prompts are tokenized and
  refused past `deploy.limits.max_prompt_tokens` (400) before any generation.
- The operator's system prompt (data.system_prompt) always comes first: a client's system
  messages are appended to it, in one leading system message (chat templates that allow one
  system turn only still work), never put in its place.
- Multi-part content (`[{"type": "text", "text": ...}]`) is served as its joined text parts; an
  image, audio or file part is a 400 naming it.
- User ids (the client address when the body has no `user`) are stored as keyed HMACs
  (feedback/auth.py UserHasher); the canary split still hashes the id as sent, so it stays sticky.
- A registry error during /admin/reload keeps the routing as it was and answers 503 with the
  reason; only an alias that is really not set reads as "not set".
- The request log is spooled to <state_dir>/spool before a request is answered (feedback/spool.py)
  and replayed at the next start.

Tracing (tuneloop/tracing.py; off unless OTEL_* asks for it): a server span per request; the request id is
then the span's trace id + span id, so the request log names each row's trace.
`tuneloop_canary_decisions_total{decision}` counts canaries (or shadows) that left the routing at a reload:
`promote` when the version became the champion, `rollback` when it was removed without.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
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

from tuneloop import tracing
from tuneloop.config import RunConfig
from tuneloop.feedback.auth import Guard
from tuneloop.feedback.canary_looks import CanaryLookCollector, CanaryLooks
from tuneloop.feedback.monitor_report import MonitorReportCollector
from tuneloop.feedback.service import (RequestLogCollector, add_feedback_route,
                                       add_review_routes, content_text, error, install_problem_handler, read_json,
                                       store_lifespan)
from tuneloop.feedback.store import FeedbackStore, check_request_fields
from tuneloop.registry import RegistryUnavailable

log = logging.getLogger("tuneloop.gateway")
# MLflow's HTTP client in the serving process: two retries, 10 s per call (an explicit environment wins)
REGISTRY_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                          "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_NEW_TOKENS = 256
MAX_FAULT_LATENCY_MS = 60_000.0
SWITCH_INTERVAL_S = 0.0005


class PromptTooLong(ValueError):
    """The prompt (chat template included) has more tokens than `deploy.limits.max_prompt_tokens`."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the prompt is {tokens} tokens; the limit is {limit} (deploy.limits.max_prompt_tokens)")


class Backend(Protocol):
    """What answers a variant's requests: the HF model here; a stub in the load benchmark."""

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]: ...


class HFBackend:
    """Base model (+ merged LoRA adapter) generating greedily, one request at a time. The messages arrive
    with the operator's system prompt already first (`operator_first`); a prompt over
    `max_prompt_tokens` is refused (PromptTooLong) after tokenizing, before generating."""

    def __init__(self, model: Any, tokenizer: Any, max_prompt_tokens: int | None = None) -> None:
        self.model, self.tokenizer, self.max_prompt_tokens = model, tokenizer, max_prompt_tokens
        self.lock = threading.Lock()

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        import torch

        from tuneloop.data.formatting import ChatFormatter

        tok = self.tokenizer
        prompt = ChatFormatter(tok, None).prompt(messages)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        if self.max_prompt_tokens is not None and enc["input_ids"].shape[1] > self.max_prompt_tokens:
            raise PromptTooLong(enc["input_ids"].shape[1], self.max_prompt_tokens)
        enc = enc.to(next(self.model.parameters()).device)
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


def in_canary(user_id: str, percent: int) -> bool:
    """Sticky split: a user id always lands on the same side for a given percentage."""
    return int(hashlib.sha256(user_id.encode()).hexdigest()[:8], 16) % 100 < percent


class Gateway:
    def __init__(self, cfg: RunConfig, backend_factory: Callable[[str | None], Backend] | None = None,
                 spool: bool = True) -> None:
        """`spool=False` (the load benchmark's `plain` variant only) keeps the request log's queue in memory."""
        from tuneloop.registry import Registry

        self.cfg = cfg
        self._backend_factory = backend_factory or self.load_backend
        self.registry = Registry(cfg)
        self.guard = Guard.from_config(cfg.deploy.auth, cfg.deploy.limits, state_dir=cfg.state_path)
        self.store = FeedbackStore(cfg.feedback_db, scrubber=pii_scrubber(cfg),
                                   spool_dir=cfg.state_path / "spool" if spool else None)
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
        self.m_refused = Counter("tuneloop_refused", "Requests refused before any work (401, 403, 413, 429, ...)",
                                 ["status"], registry=self.metrics)
        self.m_decisions = Counter("tuneloop_canary_decisions", "Canaries (or shadows) that left the routing at a "
                                   "reload: promote (became the champion) or rollback (removed without)",
                                   ["decision"], registry=self.metrics)
        for decision in ("promote", "rollback"):  # exported from the start, so the first one is an increase
            self.m_decisions.labels(decision)
        self.metrics.register(RequestLogCollector(self.store))
        self.metrics.register(CanaryLookCollector(CanaryLooks(self.store.engine)))  # the analysis' latest look
        self.metrics.register(MonitorReportCollector(cfg.state_path / "monitor"))  # `tuneloop monitor`'s gauges

    # -- models --
    def load_backend(self, version: str | None) -> Backend:
        """The HF backend of a registry version (None: the base model)."""
        from tuneloop.models import load_causal_lm, materialize_base_model

        base_dir = materialize_base_model(self.cfg.base_model, self.cfg.state_path)
        adapter = None
        if version is not None:
            mv = self.registry.model_version(version)
            adapter = self.registry.download_adapter(mv, self.cache_dir)
        return HFBackend(*load_causal_lm(base_dir, adapter), self.cfg.deploy.limits.max_prompt_tokens)

    def _load(self, role: str, version: str | None) -> Variant:
        key = version or "base"
        if key not in self._loaded:
            self._loaded[key] = self._backend_factory(version)
            log.info("loaded %s as %s", key, role)
        return Variant(role, key, self._loaded[key])

    def reload(self) -> dict[str, Any]:
        """Re-read aliases; build the new routing table first, then swap it in one assignment. Any
        failure (RegistryUnavailable: the registry did not answer) leaves the routing as it was."""
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
            old, self.variants, self.canary_percent = self.variants, new, percent  # atomic swap; in-flight
            self._count_decisions(old, new)  # requests keep theirs
            keep = {v.version for v in new.values()}
            self._loaded = {k: b for k, b in self._loaded.items() if k in keep}
            return self.state()

    def _count_decisions(self, old: dict[str, Variant], new: dict[str, Variant]) -> None:
        for role in ("canary", "shadow"):
            before = old.get(role)
            if before is not None and (role not in new or new[role].version != before.version):
                self.m_decisions.labels("promote" if new["champion"].version == before.version else "rollback").inc()
        for v in new.values():  # both outcomes exported from the start: an alert sees the first error
            for status in ("ok", "error"):
                self.m_requests.labels(v.version, v.role, status)

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


def _unicode(value: str, where: str) -> str:
    """`value` if it has a UTF-8 form. JSON can carry a lone surrogate (`"\\ud800"`) that has none: the tokenizer
    raises on it (a 500 counted as a model error, which a client could use to fail a canary), and neither the
    user-id HMAC nor the database can take it. A ValueError naming the field: the client's mistake, a 400."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"`{where}` is not valid Unicode text (it holds a lone surrogate such as \\ud800)") from None
    return value


def _check_messages(body: Any) -> list[dict[str, str]]:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("`messages` must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), (str, list)):
            raise ValueError(f"`messages[{i}]` needs a role (system/user/assistant) and content (a string or "
                             "a list of text parts)")
        out.append({"role": m["role"], "content": _unicode(content_text(m["content"], f"messages[{i}].content"),
                                                           f"messages[{i}].content")})
    return out


def operator_first(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """The operator's system prompt first, always: a client's system messages are appended to it (one
    leading system message), never put in its place. Without an operator prompt, messages are as sent."""
    if not system_prompt:
        return messages
    client = [m["content"] for m in messages if m["role"] == "system"]
    system = "\n\n".join([system_prompt, *client])
    return [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float:
    v = body.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise ValueError(f"`{key}` must be a number from {low:g} to {high:g}")
    return float(v)


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="tuneloop gateway", lifespan=store_lifespan(gw.store))
    guard = gw.guard
    traced = tracing.instrument_app(app, "tuneloop-gateway")
    new_request_id = tracing.request_id if traced else (lambda: uuid.uuid4().hex)
    install_problem_handler(app, gw.m_refused)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:  # on the event loop: never behind store calls waiting for a thread
        return {"status": "ok", **gw.state()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(gw.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload(request: Request) -> JSONResponse:
        guard.authorize(request, "admin")
        try:
            return JSONResponse(gw.reload())
        except RegistryUnavailable as e:
            log.error("reload: registry unreachable, routing unchanged: %s", e)
            return error(503, f"registry unreachable; still serving {gw.state()}: {e}")
        except Exception as e:  # noqa: BLE001 - e.g. an adapter that does not load: keep serving what works
            log.exception("reload failed, routing unchanged")
            return error(500, f"reload failed; still serving {gw.state()}: {type(e).__name__}: {e}")

    @app.post("/admin/faults")
    async def faults(request: Request) -> JSONResponse:
        """Inject errors/latency into one variant (game days, rollback drills); {} clears it."""
        guard.authorize(request, "admin")
        body = await read_json(request, guard.max_body_bytes)
        try:
            role = body.get("variant") if isinstance(body, dict) else None
            if role not in ("champion", "canary", "shadow"):
                raise ValueError("`variant` must be champion, canary or shadow")
            rate = _number(body, "error_rate", 0.0, 1.0)
            delay = _number(body, "added_latency_ms", 0.0, MAX_FAULT_LATENCY_MS)
        except ValueError as e:
            return error(400, str(e))
        if rate == 0 and delay == 0:
            gw.faults.pop(role, None)
        else:
            gw.faults[role] = {"error_rate": rate, "added_latency_ms": delay}
        return JSONResponse(gw.state())

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        guard.authorize(request, "chat")
        return {"object": "list", "data": [{"id": v.version, "object": "model", "tuneloop_variant": v.role}
                                           for v in gw.variants.values()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        who = guard.authorize(request, "chat")
        guard.limit("chat_per_key", who.name)
        body = await read_json(request, guard.max_body_bytes)
        try:
            messages = _check_messages(body)
            max_tokens = 64 if body.get("max_tokens") is None else int(body["max_tokens"])  # 0 is not "default"
            if not 1 <= max_tokens <= MAX_NEW_TOKENS:
                raise ValueError(f"`max_tokens` must be 1..{MAX_NEW_TOKENS}")
            user = str(body.get("user") or (request.client.host if request.client else "anonymous"))
            meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
            slice_ = str(meta.get("slice", ""))
            check_request_fields({"user_id": "`user`", "slice": "`metadata.slice`"}, user_id=user, slice=slice_)
            _unicode(user, "user")
            _unicode(slice_, "metadata.slice")
        except (ValueError, TypeError, OverflowError) as e:
            return error(400, str(e))
        uid = guard.users(user)
        guard.limit("chat_per_user", uid)
        try:
            variant = gw.route(user, body.get("model"))
        except KeyError:
            return error(404, f"unknown model {body.get('model')!r}; serving {sorted(gw.state().values(), key=str)}")
        messages = operator_first(messages, gw.cfg.data.system_prompt)
        rid = new_request_id()
        if traced:  # the request id is the span's own trace id + span id: no attribute needed for it
            tracing.annotate({"tuneloop.variant": variant.role, "tuneloop.model_version": variant.version})
        started = time.perf_counter()
        status, text, p_tok, c_tok = "ok", "", 0, 0
        try:
            from starlette.concurrency import run_in_threadpool

            text, p_tok, c_tok = await run_in_threadpool(gw.generate, variant, messages, max_tokens)
        except PromptTooLong as e:  # the client's mistake, refused before generating: not a served request
            return error(400, str(e))
        except Exception as e:  # the model failed: count it, log it, answer 500
            status = "error"
            log.exception("generation failed on %s", variant.version)
            err = str(e)
        latency = time.perf_counter() - started
        gw.m_requests.labels(variant.version, variant.role, status).inc()
        gw.m_latency.labels(variant.version, variant.role).observe(latency)
        gw.m_tokens.labels(variant.version, variant.role).inc(c_tok)
        gw.store.log_request(request_id=rid, user_id=uid, model_version=variant.version, variant=variant.role,
                             slice=slice_, prompt=messages[-1]["content"], output=text,
                             status=status, latency_ms=latency * 1000)
        shadow = gw.variants.get("shadow")
        if shadow is not None:  # mirror: answer in the background, log it, never return it
            asyncio.get_running_loop().run_in_executor(None, gw.mirror, shadow, messages, max_tokens, uid, slice_)
        if status == "error":
            return error(500, f"model {variant.version} failed: {err}")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": f"{gw.registry.name}/{variant.version}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if c_tok >= max_tokens else "stop"}],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok},
            "tuneloop": {"variant": variant.role, "version": variant.version}})

    add_feedback_route(app, gw.store, guard, lambda version, variant, score: gw.m_feedback.labels(version, variant)
                       .observe(score))
    add_review_routes(app, gw.store, guard)
    return app


def serve(cfg: RunConfig, host: str, port: int) -> None:
    import sys

    import uvicorn

    # Background work (alias reloads, batched store writes) is GIL-bound Python; a short switch
    # interval keeps the event loop answering while it runs (p99 under load, see bench/).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # a registry call must fail within seconds, so a reload during an MLflow outage answers 503 and keeps the
    # routing: MLflow's default retries took 247 s against a server that was down (bench/fault_suite.py)
    for var, value in REGISTRY_HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)
    gw = Gateway(cfg)
    try:
        gw.reload()
    except RegistryUnavailable as e:  # no routing yet: serving the base model instead would be wrong
        raise SystemExit(f"tuneloop serve: the registry is unreachable, not starting: {e}") from None
    log.info("gateway on http://%s:%d serving %s", host, port, gw.state())
    uvicorn.run(create_app(gw), host=host, port=port, log_level="warning", workers=1)
