"""HTTP pieces around the feedback store, shared by the local gateway and the cluster service.

`add_feedback_route` is the one `POST /v1/feedback` (thumbs up/down, a 1-5 rating, a 0-1 score
or a corrected answer, keyed to a logged request). `create_feedback_service` is the small
service the Helm chart runs next to KServe (`tuneloop feedback-service`): it stores the
requests KServe's payload logger sends (CloudEvents, request and response paired by ce-id)
and the users' feedback, in Postgres (or sqlite), PII-scrubbed before anything is stored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from sqlalchemy.exc import OperationalError

from tuneloop.feedback.store import FeedbackStore, check_request_fields

log = logging.getLogger("tuneloop.feedback")
MAX_BODY_BYTES = 256 * 1024
VARIANTS = ("champion", "canary", "shadow")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


async def read_json(request: Request) -> Any:
    """The body as JSON; OverflowError past MAX_BODY_BYTES, ValueError when it is not JSON."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise OverflowError(f"body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON: {e}") from None


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


def add_feedback_route(app: FastAPI, store: FeedbackStore,
                       on_score: Callable[[str, str, float], None] | None = None) -> None:
    """POST /v1/feedback; `on_score(model_version, variant, score)` e.g. feeds a metric."""

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        try:
            body = await read_json(request)
            if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
                raise ValueError("`request_id` (string) is required")
            score = feedback_score(body)
            corr = body.get("correction")
            if corr is not None and not isinstance(corr, str):
                raise ValueError("`correction` must be a string")
            if score is None and not corr:
                raise ValueError("give one of `thumbs` (up/down), `rating` (1-5), `score` (0-1) or `correction`")
        except OverflowError as e:
            return error(413, str(e))
        except ValueError as e:
            return error(400, str(e))
        try:  # a flush (scrubbing, the database write) blocks: in a worker thread, never on the event loop
            if not await run_in_threadpool(store.add_feedback, body["request_id"], score, corr):
                return error(404, f"unknown request_id {body['request_id']!r}")
            served_by = await run_in_threadpool(store.served_by, body["request_id"]) \
                if score is not None and on_score else None
        except OperationalError as e:  # the database is down or locked: the client may retry
            log.error("feedback for %s not stored: %s", body["request_id"], e)
            return error(503, "the feedback store is unavailable; try again")
        if served_by is not None and on_score is not None and score is not None:
            on_score(*served_by, score)
        return JSONResponse({"status": "recorded"})


def _chat_text(body: Any, key: str) -> str:
    """The last user message of an OpenAI chat request, or the first choice of a response."""
    if key == "request":
        msgs = body.get("messages") if isinstance(body, dict) else None
        return next((m.get("content", "") for m in reversed(msgs or []) if m.get("role") == "user"), "")
    choices = body.get("choices") if isinstance(body, dict) else None
    return ((choices or [{}])[0].get("message") or {}).get("content", "")


def store_lifespan(store: FeedbackStore) -> Callable[[FastAPI], Any]:
    """A FastAPI lifespan around the store. At start the store warms up in a thread (Presidio's first
    load takes seconds): the server answers at once, and a request that needs the scrubber before it
    is ready waits in a worker thread, never on the event loop. When the server stops (SIGTERM on a
    rollout) the request log's queue is written, so the last moments of traffic are not lost."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=_warm_up, args=(store,), name="feedback-warm-up", daemon=True).start()
        yield
        try:
            store.flush()
        except Exception as e:  # noqa: BLE001 - shutting down: say what was lost, do not hang
            log.error("request log: %d rows not written at shutdown: %s", store.backlog, e)

    return lifespan


def _warm_up(store: FeedbackStore) -> None:
    try:
        store.warm_up()
    except Exception as e:  # noqa: BLE001 - the first write retries it and reports the error there
        log.error("feedback store warm-up failed: %s", e)


def create_feedback_service(store: FeedbackStore, pending_limit: int = 10_000) -> FastAPI:
    app = FastAPI(title="tuneloop feedback service", lifespan=store_lifespan(store))
    pending: OrderedDict[str, dict[str, Any]] = OrderedDict()  # ce-id -> request half, waiting for its response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/kserve-events")
    async def kserve_event(request: Request) -> JSONResponse:
        """KServe's payload logger (InferenceService spec.predictor.logger, mode all)."""
        ce_id, ce_type = request.headers.get("ce-id"), request.headers.get("ce-type", "")
        if not ce_id:
            return error(400, "not a CloudEvent: the ce-id header is missing")
        try:
            body = await read_json(request)
        except OverflowError as e:
            return error(413, str(e))
        except ValueError as e:
            return error(400, str(e))
        if ce_type.endswith(".request"):
            # each revision's logger URL carries its version and variant (deploy/kserve.py)
            q = request.query_params
            half = {"prompt": _chat_text(body, "request"), "created": time.time(),
                    "user_id": str(body.get("user", "")) if isinstance(body, dict) else "",
                    "model_version": q.get("version") or request.headers.get("ce-inferenceservicename", ""),
                    "variant": q.get("variant") or "champion"}
            try:
                if half["variant"] not in VARIANTS:
                    raise ValueError(f"`variant` must be one of {', '.join(VARIANTS)}, not {half['variant']!r}")
                check_request_fields({"request_id": "ce-id"}, request_id=ce_id, user_id=half["user_id"],
                                     model_version=half["model_version"])
            except ValueError as e:
                log.warning("KServe event %.80s refused: %s", ce_id, e)
                return error(400, str(e))
            pending[ce_id] = half
            while len(pending) > pending_limit:
                pending.popitem(last=False)
            return JSONResponse({"status": "pending"})
        if ce_type.endswith(".response"):
            half = pending.pop(ce_id, None)
            if half is None:
                return error(404, f"no logged request for ce-id {ce_id!r}")
            store.log_request(request_id=ce_id, slice="", output=_chat_text(body, "response"), status="ok",
                              latency_ms=(time.time() - half.pop("created")) * 1000, **half)
            return JSONResponse({"status": "recorded"})
        return error(400, f"unknown ce-type {ce_type!r}")

    add_feedback_route(app, store)
    return app
