"""HTTP pieces around the feedback store, shared by the local gateway and the cluster service.

`add_feedback_route` is the one `POST /v1/feedback` (thumbs up/down, a 1-5 rating, a 0-1 score
or a corrected answer, keyed to a logged request). `create_feedback_service` is the small
service the Helm chart runs next to KServe (`tuneloop feedback-service`): it stores the
requests KServe's payload logger sends (CloudEvents; request and response paired by ce-id in the
database, so any replica may take either half) and the users' feedback, in Postgres (or sqlite),
PII-scrubbed before anything is stored.

Every writer authenticates (feedback/auth.py: scopes `feedback`, `events`, `admin`). Bodies are
read as a stream and refused with 413 as soon as they pass `deploy.limits.max_body_bytes`
(a larger Content-Length is refused before any of it is read). One feedback item per request
(409 for a second), rate limits per API key and per user (429, Retry-After), and corrections
flagged trusted or not by `deploy.auth.trust_corrections`; admins list and review them at
`GET /admin/corrections` and `POST /admin/corrections/review`.

Tracing (tuneloop/tracing.py; off unless OTEL_* asks for it): the feedback service gets a server span per
request; feedback (here and in the gateway) names the request it rates and links to that request's span.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError

from tuneloop import tracing
from tuneloop.feedback.auth import Guard, Problem
from tuneloop.feedback.canary_looks import CanaryLookCollector, CanaryLooks
from tuneloop.feedback.monitor_report import MONITOR_REPORTS_ENV, MonitorReportCollector
from tuneloop.feedback.store import FeedbackExists, FeedbackStore, check_request_fields

log = logging.getLogger("tuneloop.feedback")
MAX_BODY_BYTES = 256 * 1024  # the default of deploy.limits.max_body_bytes
VARIANTS = ("champion", "canary", "shadow")
SWEEP_EVERY_S = 5.0  # how often a feedback-service process sweeps expired KServe halves
DB_THREADS = 16  # store calls (the database) running at once per process

# Store calls block on the database. In Starlette's shared thread pool (40 threads) a database that hangs
# instead of refusing (a partition, a frozen server: no connect or read timeout fires) let the waiting calls
# take every thread, and /healthz, /metrics and the gateway's generation waited behind them: the liveness
# probe killed the pod with its held rows. They run in this pool of their own; whatever waits beyond it
# waits as a future, holding no thread.
_DB_POOL = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="feedback-db")


async def in_db_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking store call in the database pool (never on the event loop, never in the shared pool)."""
    return await asyncio.get_running_loop().run_in_executor(_DB_POOL, partial(fn, *args, **kwargs))


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status, headers=headers)


def install_problem_handler(app: FastAPI, refused: Any | None = None) -> None:
    """Render `Problem` as the JSON error; `refused` (a Prometheus Counter labelled by status) counts them."""

    async def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        if refused is not None:
            refused.labels(str(exc.status)).inc()
        return error(exc.status, exc.message, exc.headers)

    app.add_exception_handler(Problem, handler)


def _finite(s: str) -> float:
    f = float(s)
    if not math.isfinite(f):
        raise ValueError(f"number {s} is out of range")
    return f


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)  # one, not one per request


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The body as JSON (UTF-8): Problem(413) past `limit` bytes, Problem(400) when it is not JSON (NaN,
    Infinity and numbers out of float range included). A Content-Length over the limit is refused
    before any of the body is read; one within it bounds what the server delivers (HTTP framing), so
    the body is read at once. Without one (chunked), the body is read as a stream and refused as soon
    as it passes the limit: memory never holds more than limit + one chunk."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "invalid Content-Length")
        if int(declared) > limit:
            raise Problem(413, f"body is {int(declared)} bytes; the limit is {limit}")
        raw = await request.body()
    else:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise Problem(413, f"body is over {limit} bytes; the limit is {limit}")
        raw = bytes(buf)
    if len(raw) > limit:
        raise Problem(413, f"body is {len(raw)} bytes; the limit is {limit}")
    try:
        return _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Problem(400, f"malformed JSON: {e}") from None


def content_text(content: Any, where: str, strict: bool = True) -> str:
    """A chat message's content as text: a string, or OpenAI's multi-part list whose `text` parts are
    joined with newlines. A non-text part (image, audio, file) is a ValueError naming it when `strict`
    (the gateway serves text only), skipped otherwise (a payload-logger event: the model already
    answered it; the text is what the store keeps)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        if not strict:
            return ""
        raise ValueError(f"`{where}` must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif strict:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"`{where}[{j}]` is a {kind!r} part; only text parts ({{\"type\": \"text\", "
                             "\"text\": ...}) are served")
    return "\n".join(texts)


def feedback_score(body: dict[str, Any]) -> float | None:
    """thumbs up/down, a 1-5 rating or a 0-1 score -> one score in [0, 1]."""
    if "thumbs" in body:
        if body["thumbs"] not in ("up", "down"):
            raise ValueError("`thumbs` must be 'up' or 'down'")
        return 1.0 if body["thumbs"] == "up" else 0.0
    if "rating" in body:
        r = body["rating"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 1 <= r <= 5:
            raise ValueError("`rating` must be a number from 1 to 5")
        return (float(r) - 1) / 4
    if "score" in body:
        s = body["score"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
            raise ValueError("`score` must be a number from 0 to 1")
        return float(s)
    return None


def add_feedback_route(app: FastAPI, store: FeedbackStore, guard: Guard,
                       on_score: Callable[[str, str, float], None] | None = None) -> None:
    """POST /v1/feedback (scope `feedback`); `on_score(model_version, variant, score)` e.g. feeds a metric."""

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        who = guard.authorize(request, "feedback")
        guard.limit("feedback_per_key", who.name)
        body = await read_json(request, guard.max_body_bytes)
        try:
            if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
                raise ValueError("`request_id` (string) is required")
            score = feedback_score(body)
            corr = body.get("correction")
            if corr is not None and not isinstance(corr, str):
                raise ValueError("`correction` must be a string")
            if score is None and not corr:
                raise ValueError("give one of `thumbs` (up/down), `rating` (1-5), `score` (0-1) or `correction`")
        except ValueError as e:
            return error(400, str(e))
        rid = body["request_id"]
        tracing.annotate({"tuneloop.request_id": rid}, link_request=rid)
        try:  # the database and the scrubber block: in a worker thread, never on the event loop
            info = await in_db_thread(store.request_info, rid)
            if info is None:
                return error(404, f"unknown request_id {rid!r}")
            if info["user_id"]:
                guard.limit("feedback_per_user", info["user_id"])
            trusted = guard.trusted(who) if corr else True
            await in_db_thread(store.add_feedback, rid, score, corr or None, once=True, key=who.name, trusted=trusted)
        except FeedbackExists:
            return error(409, f"request {rid!r} already has its feedback; send score and correction together, once")
        except OperationalError as e:  # the database is down or locked: the client may retry
            log.error("feedback for %s not stored: %s", rid, e)
            return error(503, "the feedback store is unavailable; try again")
        if score is not None and on_score is not None:
            on_score(info["model_version"], info["variant"], score)
        return JSONResponse({"status": "recorded"})


def add_review_routes(app: FastAPI, store: FeedbackStore, guard: Guard) -> None:
    """GET /admin/corrections (?status=untrusted|trusted|all, &limit=) and POST /admin/corrections/review
    ({"ids": [...], "trusted": true|false}): how corrections become training data under
    `trust_corrections: reviewed` (or are taken back under any policy). Scope `admin`."""

    @app.get("/admin/corrections")
    async def corrections(request: Request, status: str = "untrusted", limit: int = 100) -> JSONResponse:
        guard.authorize(request, "admin")
        if status not in ("untrusted", "trusted", "all") or not 1 <= limit <= 1000:
            return error(400, "`status` must be untrusted, trusted or all and `limit` 1..1000")
        flag = {"untrusted": False, "trusted": True, "all": None}[status]
        return JSONResponse({"corrections": await in_db_thread(store.corrections, flag, limit)})

    @app.post("/admin/corrections/review")
    async def review(request: Request) -> JSONResponse:
        guard.authorize(request, "admin")
        body = await read_json(request, guard.max_body_bytes)
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in ids) \
                or not isinstance(body.get("trusted"), bool):
            return error(400, "give `ids` (a non-empty list of correction ids) and `trusted` (true/false)")
        changed = await in_db_thread(store.review, ids, body["trusted"])
        return JSONResponse({"status": "reviewed", "changed": changed})


class RequestLogCollector:
    """The request log's health on /metrics: rows the database refused, rows given up on during an
    outage or because they could not be scrubbed, rows kept in memory only (spool write failed), rows
    waiting to be written (alert on a backlog that keeps growing), and the KServe halves."""

    def __init__(self, store: FeedbackStore, halves: bool = False) -> None:
        self.store, self.halves = store, halves

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.store
        yield CounterMetricFamily("tuneloop_request_log_rejected", "Logged requests the database refused "
                                  "(each named in the log)", value=s.rejected)
        yield CounterMetricFamily("tuneloop_request_log_dropped", "Logged requests given up on while the "
                                  "database was unreachable", value=s.dropped)
        yield CounterMetricFamily("tuneloop_request_log_scrub_failed", "Logged requests not stored because PII "
                                  "scrubbing failed on them (each named in the log)", value=s.scrub_failed)
        yield CounterMetricFamily("tuneloop_request_log_spool_failed", "Logged requests that could not be "
                                  "spooled to disk (kept in memory only)", value=s.spool_failed)
        yield GaugeMetricFamily("tuneloop_request_log_backlog", "Logged requests not yet written", value=s.backlog)
        if self.halves:
            yield CounterMetricFamily("tuneloop_kserve_halves_expired", "KServe request/response halves dropped "
                                      "because the other half did not come in time", value=s.halves_expired)
            yield CounterMetricFamily("tuneloop_kserve_halves_evicted", "KServe halves dropped by the byte bound "
                                      "on waiting halves", value=s.halves_evicted)
            yield GaugeMetricFamily("tuneloop_kserve_halves_pending", "KServe halves waiting (all replicas, at "
                                    "the last sweep)", value=s.halves_pending)
            yield GaugeMetricFamily("tuneloop_kserve_halves_pending_bytes", "Bytes of the waiting KServe halves",
                                    value=s.halves_pending_bytes)


def _chat_text(body: Any, key: str) -> str:
    """The last user message of an OpenAI chat request, or the first choice of a response, as text."""
    if key == "request":
        msgs = body.get("messages") if isinstance(body, dict) else None
        msg = next((m for m in reversed(msgs if isinstance(msgs, list) else [])
                    if isinstance(m, dict) and m.get("role") == "user"), {})
        return content_text(msg.get("content", ""), "content", strict=False)
    choices = body.get("choices") if isinstance(body, dict) else None
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    msg = first.get("message") if isinstance(first.get("message"), dict) else {}
    return content_text(msg.get("content") or "", "content", strict=False)


def store_lifespan(store: FeedbackStore) -> Callable[[FastAPI], Any]:
    """A FastAPI lifespan around the store. At start the store warms up in a thread (Presidio's first
    load takes seconds): the server answers at once, and a request that needs the scrubber before it
    is ready waits in a worker thread, never on the event loop. When the server stops (SIGTERM on a
    rollout) the request log's queue is written, so the last moments of traffic are not lost (and
    with a spool, what could not be written is replayed at the next start)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=_warm_up, args=(store,), name="feedback-warm-up", daemon=True).start()
        yield
        try:
            store.close()
        except Exception as e:  # noqa: BLE001 - shutting down: say what was lost, do not hang
            log.error("request log: %d rows not written at shutdown: %s", store.backlog, e)

    return lifespan


def _warm_up(store: FeedbackStore) -> None:
    try:
        store.warm_up()
    except Exception as e:  # noqa: BLE001 - the first write retries it and reports the error there
        log.error("feedback store warm-up failed: %s", e)


def create_feedback_service(store: FeedbackStore, guard: Guard, pending_max_bytes: int = 64 * 1024 * 1024,
                            pending_max_age_s: float = 600.0, monitor_reports: str | Path | None = None) -> FastAPI:
    """`monitor_reports`: `tuneloop monitor`'s output (its report folder or a monitor.prom) to serve on
    /metrics; default $TUNELOOP_MONITOR_REPORTS, none when unset."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

    app = FastAPI(title="tuneloop feedback service", lifespan=store_lifespan(store))
    tracing.instrument_app(app, "tuneloop-feedback")
    metrics = CollectorRegistry()
    metrics.register(RequestLogCollector(store, halves=True))
    metrics.register(CanaryLookCollector(CanaryLooks(store.engine)))
    monitor_reports = monitor_reports or os.environ.get(MONITOR_REPORTS_ENV) or None
    if monitor_reports:
        metrics.register(MonitorReportCollector(monitor_reports))
    install_problem_handler(app, Counter("tuneloop_refused", "Requests refused before any work (401, 403, 413, "
                                         "429, ...)", ["status"], registry=metrics))
    sweep = {"last": 0.0, "running": False}

    def sweep_if_due() -> None:
        now = time.monotonic()
        if sweep["running"] or now - sweep["last"] < SWEEP_EVERY_S:
            return
        sweep["running"], sweep["last"] = True, now
        try:
            store.sweep_pending(pending_max_age_s, pending_max_bytes)
        except OperationalError as e:
            log.error("KServe events: sweeping waiting halves failed: %s", e)
        finally:
            sweep["running"] = False

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:  # on the event loop: it needs no thread, so none can be missing
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/kserve-events")
    async def kserve_event(request: Request) -> JSONResponse:
        """KServe's payload logger (InferenceService spec.predictor.logger, mode all). Scope `events`; the
        token may come as `?access_token=` (the logger cannot send headers)."""
        guard.authorize(request, "events", query_token=True)
        ce_id, ce_type = request.headers.get("ce-id"), request.headers.get("ce-type", "")
        if not ce_id:
            return error(400, "not a CloudEvent: the ce-id header is missing")
        body = await read_json(request, guard.max_body_bytes)
        kind = "request" if ce_type.endswith(".request") else "response" if ce_type.endswith(".response") else None
        if kind is None:
            return error(400, f"unknown ce-type {ce_type!r}")
        tracing.annotate({"tuneloop.request_id": ce_id, "tuneloop.event": kind})
        fields: dict[str, Any]
        try:
            check_request_fields({"request_id": "ce-id"}, request_id=ce_id)
            if kind == "request":
                # each revision's logger URL carries its version and variant (deploy/kserve.py)
                q = request.query_params
                user = body.get("user") if isinstance(body, dict) else None
                meta = body.get("metadata") if isinstance(body, dict) else None
                fields = {"prompt": _chat_text(body, "request"),
                          # the slice, as the gateway takes it: per-slice monitoring of KServe traffic
                          "slice": str(meta.get("slice", "")) if isinstance(meta, dict) else "",
                          "user_id": guard.users(str(user)) if isinstance(user, (str, int)) else "",
                          "model_version": q.get("version") or request.headers.get("ce-inferenceservicename", ""),
                          "variant": q.get("variant") or "champion"}
                if fields["variant"] not in VARIANTS:
                    raise ValueError(f"`variant` must be one of {', '.join(VARIANTS)}, not {fields['variant']!r}")
                check_request_fields({"slice": "`metadata.slice`"}, model_version=fields["model_version"],
                                     slice=fields["slice"])
            else:
                fields = {"output": _chat_text(body, "response")}
        except ValueError as e:
            log.warning("KServe event %.80s refused: %s", ce_id, e)
            return error(400, str(e))
        try:
            status = await in_db_thread(store.kserve_half, ce_id, kind, fields)
            await in_db_thread(sweep_if_due)
        except OperationalError as e:  # the logger retries
            log.error("KServe event %s not stored: %s", ce_id, e)
            return error(503, "the feedback store is unavailable; try again")
        except Exception as e:  # noqa: BLE001 - e.g. the scrubber failed on this text: this event only
            log.exception("KServe event %s not stored", ce_id)
            return error(500, f"event not stored: {type(e).__name__}")
        return JSONResponse({"status": status})

    add_feedback_route(app, store, guard)
    add_review_routes(app, store, guard)
    return app
