"""The feedback store: served requests and what users said about the answers.

SQLAlchemy over sqlite locally (`<state_dir>/feedback.db`) and Postgres on a cluster (pass a
database URL). The gateway logs every request; `POST /v1/feedback` adds a rating, a thumbs
up/down or a corrected answer keyed to that request. Ingest turns the feedback into
preference pairs (DPO) and SFT records (corrections), each tagged with its slice and the model
version that produced the answer (`tuneloop.data.feedback` does that).

Poisoning defences kept here, where every replica sees them: at most one feedback item per
request through the API (a partial unique index, so two replicas cannot both accept one), and a
`trusted` flag on each item (the HTTP layer decides it by `deploy.auth.trust_corrections`; an
admin review can set it); `tuneloop.data.feedback` learns from trusted corrections only. Items
written before the flag existed read as untrusted. The Python API (`add_feedback` without
`once`) is the operator's: several items per request, trusted unless told otherwise.

KServe's payload logger sends a request's two halves (request, response) as separate events that
may reach different replicas, in either order: they meet in the `kserve_pending` table (keyed by
ce-id) and the one that completes the pair writes the request row in the same transaction.

This is the ground floor: it imports nothing of tuneloop. A PII scrubber is passed in.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (Boolean, Float, Index, Integer, String, Text, create_engine, delete, func, insert, inspect,
                        select, text, update)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tuneloop.feedback.spool import Spool


log = logging.getLogger("tuneloop.feedback")


class _Base(DeclarativeBase):
    pass


class Request(_Base):
    __tablename__ = "requests"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[float] = mapped_column(Float)
    user_id: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(16))  # champion | canary
    slice: Mapped[str] = mapped_column(String(64), default="")
    prompt: Mapped[str] = mapped_column(Text)
    output: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="ok")  # ok | error
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)


class Feedback(_Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created: Mapped[float] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0 (bad) .. 1 (good): thumbs, a 1-5 rating or a score
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str | None] = mapped_column(String(16), nullable=True)  # "api": one per request (unique index)
    key_name: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the API key that sent it
    trusted: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # may its correction become training data
    reviewed_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("uq_feedback_api_request", "request_id", unique=True,
                            sqlite_where=text("source = 'api'"), postgresql_where=text("source = 'api'")),)


class PendingHalf(_Base):
    """One half of a KServe payload-logger pair waiting for the other (JSON of its scrubbed fields)."""

    __tablename__ = "kserve_pending"
    ce_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    request: Mapped[str | None] = mapped_column(Text, nullable=True)
    response: Mapped[str | None] = mapped_column(Text, nullable=True)
    bytes: Mapped[int] = mapped_column(Integer, default=0)


class FeedbackExists(Exception):
    """The request already has its one feedback item from the API."""


_NEW_FEEDBACK_COLUMNS = {"source": "VARCHAR(16)", "key_name": "VARCHAR(64)", "trusted": "BOOLEAN",
                         "reviewed_at": "FLOAT"}


def _migrate(engine: Any, attempts: int = 3) -> None:
    """Bring a feedback table made by an earlier version up to date (columns, the unique index). Replicas
    starting together may race on the catalog: the loser looks again."""
    pg = engine.dialect.name == "postgresql"
    for attempt in range(attempts):
        try:
            have = {c["name"] for c in inspect(engine).get_columns("feedback")}
            with engine.begin() as conn:
                for name, sqltype in _NEW_FEEDBACK_COLUMNS.items():
                    if name not in have:
                        conn.execute(text(f"ALTER TABLE feedback ADD COLUMN {'IF NOT EXISTS ' if pg else ''}"
                                          f"{name} {sqltype}"))
                conn.execute(text("CREATE UNIQUE INDEX IF NOT EXISTS uq_feedback_api_request ON feedback "
                                  "(request_id) WHERE source = 'api'"))
            return
        except (IntegrityError, OperationalError, DBAPIError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _insert_ignoring_duplicates(table: Any, dialect: str) -> Any:
    """INSERT that skips rows whose primary key exists (a spool replayed after its rows were written,
    a payload logger delivering twice)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    return insert(table)


def check_request_fields(labels: dict[str, str] | None = None, **fields: str) -> None:
    """ValueError naming the field when a value is longer than its column allows (Postgres
    enforces the lengths; sqlite would not), so a bad value is refused at the API rather than
    failing the write of a whole batch later. `labels` names a column as the caller's API does."""
    for name, value in fields.items():
        limit = Request.__table__.c[name].type.length
        if limit is not None and len(value) > limit:
            label = (labels or {}).get(name, f"`{name}`")
            raise ValueError(f"{label} is {len(value)} characters; the limit is {limit}")


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """Text as every database can hold it: NUL (Postgres refuses it in text) and lone surrogates (valid JSON
    escapes such as `\\ud800` that have no UTF-8 form, so every driver refuses them) become U+FFFD. Before,
    one such row failed the write of its whole batch - other users' rows included, uncounted. Anything that
    is not a str is returned as it is."""
    if isinstance(value, str) and _UNSTORABLE.search(value):
        return _UNSTORABLE.sub("\ufffd", value)
    return value


def _reason(e: BaseException) -> str:
    """The first line of what the driver said (never the statement's parameters: they hold user text)."""
    orig = getattr(e, "orig", None) or e
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _url(db: str | Path) -> str:
    s = str(db)
    return s if "://" in s else f"sqlite:///{Path(s).resolve()}"


class FeedbackStore:
    """Requests and feedback. `log_request` is off the serving path: rows are queued and a
    background thread writes them in batches (a sqlite commit per request would dominate the
    gateway's latency); everything that reads flushes the queue first. With a `spool_dir`, each
    queued row is also appended to a spool file before `log_request` returns, so a killed process
    loses nothing it acknowledged (feedback/spool.py). With a `scrubber`
    (tuneloop.data.pii.PiiScrubber), prompts, outputs and corrections are PII-scrubbed before
    they are stored; each row is scrubbed on its own, and a row that cannot be is counted in
    `scrub_failed`, named in the log, and costs only itself."""

    FLUSH_EVERY_S = 0.05
    RETRY_S = 1.0  # after a failed write (database unreachable), the writer tries again this much later
    MAX_UNWRITTEN = 100_000  # rows kept in memory while the database is unreachable

    def __init__(self, db: str | Path, scrubber: Any | None = None, spool_dir: str | Path | None = None) -> None:
        if "://" not in str(db):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(_url(db))
        _Base.metadata.create_all(self.engine)
        _migrate(self.engine)
        self._insert = _insert_ignoring_duplicates(Request.__table__, self.engine.dialect.name)
        self.scrubber = scrubber
        self._queue: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards _queue (and the spool's open segment)
        self._write_lock = threading.Lock()
        self._unwritten: list[dict[str, Any]] = []  # scrubbed rows a failed write left behind
        self.rejected = 0  # rows the database refused (each logged with its request id)
        self.dropped = 0  # rows given up on because the database stayed unreachable too long
        self.scrub_failed = 0  # rows not stored because scrubbing them failed (each logged)
        self.halves_expired = 0  # KServe halves whose other half never came (age), deleted by this process
        self.halves_evicted = 0  # ... or pushed out by the byte bound
        self.halves_pending = 0  # KServe halves waiting (all replicas), as of the last sweep
        self.halves_pending_bytes = 0
        self._scrub_lock = threading.Lock()
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        if self._spool is not None:
            self._queue = self._spool.adopt()
            if self._queue:
                self._ensure_writer()
                self._wake.set()

    @property
    def backlog(self) -> int:
        """Rows waiting to be written (queued, or kept through a failed write)."""
        return len(self._queue) + len(self._unwritten)

    @property
    def spool_failed(self) -> int:
        return self._spool.failed if self._spool is not None else 0

    def warm_up(self) -> None:
        """Load the scrubber (Presidio takes seconds on first use) and start the writer thread, so the
        first request does not pay for either."""
        if self.scrubber is not None and hasattr(self.scrubber, "load"):
            with self._scrub_lock:
                self.scrubber.load()
        self._ensure_writer()

    def _ensure_writer(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._run_writer, name="feedback-writer", daemon=True)
                self._writer.start()

    def _scrub(self, text: str | None) -> str | None:
        if text is not None and not isinstance(text, str):
            raise TypeError(f"expected text, got {type(text).__name__}")
        if self.scrubber is None or not text:
            return text
        with self._scrub_lock:  # Presidio's engines are shared; one text at a time
            return self.scrubber.scrub(text)

    def log_request(self, **fields: Any) -> None:
        """Queue one served request (written within FLUSH_EVERY_S by the background writer); with a
        spool, it is on disk (in the kernel) when this returns."""
        fields.setdefault("created", time.time())
        data = Spool.encode(fields) if self._spool is not None else b""
        with self._lock:
            self._queue.append(fields)
            if self._spool is not None:
                self._spool.append(data)
        if self._writer is None:
            self._ensure_writer()
        self._wake.set()

    def _run_writer(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.FLUSH_EVERY_S)  # gather a batch
            self._wake.clear()
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - the writer must outlive a database outage
                log.warning("request log: write failed, %d rows kept, retrying in %.0f s: %s",
                            len(self._unwritten), self.RETRY_S, e)
                time.sleep(self.RETRY_S)
                self._wake.set()

    def _scrubbed(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for f in batch:
            try:
                f = {k: storable(v) for k, v in f.items()}
                out.append({**f, "prompt": self._scrub(f.get("prompt")) or "",
                            "output": self._scrub(f.get("output")) or ""})
            except Exception as e:  # noqa: BLE001 - one bad row must not cost the others
                self.scrub_failed += 1
                log.error("request log: request %s not stored: scrubbing failed: %s: %s",
                          f.get("request_id"), type(e).__name__, e)
        return out

    def flush(self) -> None:
        """Write everything queued so far. The queue lock is held only to take the batch, so the
        serving path never waits for scrubbing or the database; the write lock makes a reader's
        flush wait for a batch the writer thread is still writing (read-your-writes)."""
        with self._write_lock:
            with self._lock:
                batch, self._queue = self._queue, []
                sealed = self._spool.seal() if self._spool is not None else None
            Spool.sync(sealed)  # fsync per batch (see spool.py for the measured cost of per row)
            rows = self._unwritten + self._scrubbed(batch)
            self._unwritten = []
            if rows:
                try:
                    with self.engine.begin() as conn:  # one executemany: far cheaper than ORM objects per row
                        conn.execute(self._insert, rows)
                except OperationalError:  # unreachable or locked: keep the rows (bounded) for the next flush
                    self._unwritten = rows[-self.MAX_UNWRITTEN:]
                    if len(rows) > self.MAX_UNWRITTEN:
                        self.dropped += len(rows) - self.MAX_UNWRITTEN
                        log.error("request log: database unreachable; gave up on the %d oldest rows",
                                  len(rows) - self.MAX_UNWRITTEN)
                    raise
                except Exception:  # noqa: BLE001 - the database (or its driver) refused a row: write them one
                    self._insert_each(rows)  # by one and name each bad one, so it costs only itself
            if self._spool is not None and not self._unwritten:
                self._spool.release()

    def _insert_each(self, rows: list[dict[str, Any]]) -> None:
        for i, row in enumerate(rows):
            try:
                with self.engine.begin() as conn:
                    conn.execute(self._insert, [row])
            except OperationalError:
                self._unwritten = rows[i:]
                raise
            except Exception as e:  # noqa: BLE001 - DBAPIError, or the driver could not encode a value
                self.rejected += 1
                log.error("request log: request %s refused by the database, not stored: %s",
                          row.get("request_id"), _reason(e))

    def close(self) -> None:
        """Write what is queued and release the spool (a clean shutdown); what cannot be written stays
        spooled for the next start."""
        try:
            self.flush()
        finally:
            if self._spool is not None:
                with self._write_lock, self._lock:
                    self._spool.close()
                    self._spool = None

    # -- feedback --
    def add_feedback(self, request_id: str, score: float | None = None, correction: str | None = None, *,
                     once: bool = False, key: str | None = None, trusted: bool = True) -> bool:
        """Attach feedback to a logged request; False if the request is unknown. `once` (the HTTP API):
        FeedbackExists if the request already has its API feedback item - enforced by the database, so
        two replicas cannot both accept one. `trusted`: may its correction become training data."""
        request_id = storable(request_id)
        corrected = self._scrub(storable(correction))
        self.flush()
        try:
            with Session(self.engine) as s, s.begin():
                if s.get(Request, request_id) is None:
                    return False
                s.add(Feedback(request_id=request_id, created=time.time(), score=score, correction=corrected,
                               source="api" if once else None, key_name=key, trusted=trusted))
        except IntegrityError as e:
            if once:
                raise FeedbackExists(request_id) from e
            raise
        return True

    def request_info(self, request_id: str) -> dict[str, str] | None:
        """model_version, variant and (pseudonymous) user_id of a logged request; None if it is unknown."""
        request_id = storable(request_id)  # as it was stored (with a NUL in it Postgres would refuse the query)
        self.flush()
        with Session(self.engine) as s:
            r = s.get(Request, request_id)
            return None if r is None else {"model_version": r.model_version, "variant": r.variant,
                                           "user_id": r.user_id}

    def served_by(self, request_id: str) -> tuple[str, str] | None:
        """(model_version, variant) that answered a logged request; None if it is unknown."""
        info = self.request_info(request_id)
        return (info["model_version"], info["variant"]) if info is not None else None

    def corrections(self, trusted: bool | None = False, limit: int = 100) -> list[dict[str, Any]]:
        """Corrections for review, oldest first: untrusted ones (trusted=False; legacy unflagged included),
        trusted ones, or all (None)."""
        self.flush()
        q = select(Request, Feedback).join(Feedback, Feedback.request_id == Request.request_id) \
            .where(Feedback.correction.is_not(None)).order_by(Feedback.id).limit(limit)
        if trusted is True:
            q = q.where(Feedback.trusted.is_(True))
        elif trusted is False:
            q = q.where((Feedback.trusted.is_(None)) | (Feedback.trusted.is_(False)))
        with Session(self.engine) as s:
            return [{"id": f.id, "request_id": r.request_id, "prompt": r.prompt, "output": r.output,
                     "correction": f.correction, "key": f.key_name, "trusted": bool(f.trusted),
                     "reviewed_at": f.reviewed_at, "created": f.created} for r, f in s.execute(q)]

    def review(self, ids: list[int], trusted: bool) -> int:
        """An admin's verdict on corrections: trusted (training data) or not; returns how many changed."""
        with self.engine.begin() as conn:
            return conn.execute(update(Feedback).where(Feedback.id.in_(ids), Feedback.correction.is_not(None))
                                .values(trusted=trusted, reviewed_at=time.time())).rowcount

    # -- KServe payload-logger halves --
    def kserve_half(self, ce_id: str, kind: str, fields: dict[str, Any], now: float | None = None) -> str:
        """Store one half of a KServe pair (kind "request": prompt, user_id, model_version, variant;
        "response": output), scrubbed. If the other half is already there - from any replica - this
        transaction takes both and writes the request row: "recorded"; else "pending"."""
        assert kind in ("request", "response")
        ce_id, fields = storable(ce_id), {k: storable(v) for k, v in fields.items()}
        now = time.time() if now is None else now
        text_field = "prompt" if kind == "request" else "output"
        half = {**fields, text_field: self._scrub(fields.get(text_field)) or "", "created": now}
        payload = json.dumps(half)
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as upsert
        else:
            raise NotImplementedError(f"pairing KServe events needs sqlite or Postgres, not {dialect}")
        ins = upsert(PendingHalf).values(ce_id=ce_id, created=now, bytes=len(payload), **{kind: payload})
        ins = ins.on_conflict_do_update(index_elements=["ce_id"], set_={
            kind: getattr(ins.excluded, kind), "bytes": PendingHalf.bytes + ins.excluded.bytes,
        }).returning(PendingHalf.request, PendingHalf.response)
        with self.engine.begin() as conn:  # the upsert locks the row: of two replicas, the second sees both
            req, resp = conn.execute(ins).one()
            if req is None or resp is None:
                return "pending"
            conn.execute(delete(PendingHalf).where(PendingHalf.ce_id == ce_id))
            r, o = json.loads(req), json.loads(resp)
            conn.execute(self._insert, [{
                "request_id": ce_id, "created": r["created"], "user_id": r.get("user_id", ""),
                "model_version": r.get("model_version", ""), "variant": r.get("variant", "champion"), "slice": r.get("slice", ""),
                "prompt": r.get("prompt", ""), "output": o.get("output", ""), "status": "ok",
                "latency_ms": max(0.0, (o["created"] - r["created"]) * 1000)}])
        return "recorded"

    def sweep_pending(self, max_age_s: float, max_bytes: int, now: float | None = None) -> None:
        """Drop halves older than max_age_s, then the oldest beyond max_bytes in all; counted in
        halves_expired / halves_evicted (each deleted row by the one replica whose DELETE took it)."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            expired = conn.execute(delete(PendingHalf).where(PendingHalf.created < now - max_age_s)
                                   .returning(PendingHalf.ce_id)).all()
            total, over = 0, []
            for ce_id, size in conn.execute(select(PendingHalf.ce_id, PendingHalf.bytes)
                                            .order_by(PendingHalf.created.desc())):
                total += size or 0
                if total > max_bytes:
                    over.append(ce_id)
            evicted = 0
            for i in range(0, len(over), 500):
                evicted += len(conn.execute(delete(PendingHalf).where(PendingHalf.ce_id.in_(over[i:i + 500]))
                                            .returning(PendingHalf.ce_id)).all())
            count, size = conn.execute(select(func.count(), func.coalesce(func.sum(PendingHalf.bytes), 0))).one()
        self.halves_expired += len(expired)
        self.halves_evicted += evicted
        self.halves_pending, self.halves_pending_bytes = int(count), int(size)
        if expired or evicted:
            log.warning("KServe events: dropped %d halves older than %.0f s and %d beyond %d bytes (their other "
                        "half never came)", len(expired), max_age_s, evicted, max_bytes)

    # -- readers --
    def requests(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Served requests since a time, each with its mean feedback score (None without feedback)."""
        self.flush()
        fb = (select(Feedback.request_id, func.avg(Feedback.score).label("score"))
              .group_by(Feedback.request_id).subquery())
        q = (select(Request, fb.c.score).outerjoin(fb, fb.c.request_id == Request.request_id)
             .where(Request.created >= since).order_by(Request.created))
        with Session(self.engine) as s:
            return [{"request_id": r.request_id, "variant": r.variant, "model_version": r.model_version,
                     "status": r.status, "latency_ms": r.latency_ms, "score": score, "created": r.created}
                    for r, score in s.execute(q)]

    def rows(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Requests joined with their feedback (one row per feedback item). `trusted`: whether the item's
        correction may become training data (items from before the flag existed: False)."""
        self.flush()
        q = (select(Request, Feedback).join(Feedback, Feedback.request_id == Request.request_id)
             .where(Feedback.created >= since).order_by(Feedback.id))
        with Session(self.engine) as s:
            return [{"request_id": r.request_id, "prompt": r.prompt, "output": r.output, "slice": r.slice,
                     "model_version": r.model_version, "variant": r.variant, "score": f.score,
                     "correction": f.correction, "created": f.created, "trusted": bool(f.trusted),
                     "feedback_id": f.id, "key": f.key_name} for r, f in s.execute(q)]
