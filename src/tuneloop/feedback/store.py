"""The feedback store: served requests and what users said about the answers.

SQLAlchemy over sqlite locally (`<state_dir>/feedback.db`) and Postgres on a cluster (pass a
database URL). The gateway logs every request; `POST /v1/feedback` adds a rating, a thumbs
up/down or a corrected answer keyed to that request. Ingest turns the feedback into
preference pairs (DPO) and SFT records (corrections), each tagged with its slice and the model
version that produced the answer (`tuneloop.data.feedback` does that).

This is the ground floor: it imports nothing of tuneloop. A PII scrubber is passed in.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Float, Integer, String, Text, create_engine, insert, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


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


def check_request_fields(labels: dict[str, str] | None = None, **fields: str) -> None:
    """ValueError naming the field when a value is longer than its column allows (Postgres
    enforces the lengths; sqlite would not), so a bad value is refused at the API rather than
    failing the write of a whole batch later. `labels` names a column as the caller's API does."""
    for name, value in fields.items():
        limit = Request.__table__.c[name].type.length
        if limit is not None and len(value) > limit:
            label = (labels or {}).get(name, f"`{name}`")
            raise ValueError(f"{label} is {len(value)} characters; the limit is {limit}")


def _url(db: str | Path) -> str:
    s = str(db)
    return s if "://" in s else f"sqlite:///{Path(s).resolve()}"


class FeedbackStore:
    """Requests and feedback. `log_request` is off the serving path: rows are queued and a
    background thread writes them in batches (a sqlite commit per request would dominate the
    gateway's latency); everything that reads flushes the queue first. With a `scrubber`
    (tuneloop.data.pii.PiiScrubber), prompts, outputs and corrections are PII-scrubbed before
    they are stored."""

    FLUSH_EVERY_S = 0.05
    RETRY_S = 1.0  # after a failed write (database unreachable), the writer tries again this much later
    MAX_UNWRITTEN = 100_000  # rows kept in memory while the database is unreachable

    def __init__(self, db: str | Path, scrubber: Any | None = None) -> None:
        if "://" not in str(db):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(_url(db))
        _Base.metadata.create_all(self.engine)
        self.scrubber = scrubber
        self._queue: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards _queue only
        self._write_lock = threading.Lock()
        self._unwritten: list[dict[str, Any]] = []  # scrubbed rows a failed write left behind
        self.rejected = 0  # rows the database refused (each logged with its request id)
        self.dropped = 0  # rows given up on because the database stayed unreachable too long
        self._scrub_lock = threading.Lock()
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None

    @property
    def backlog(self) -> int:
        """Rows waiting to be written (queued, or kept through a failed write)."""
        return len(self._queue) + len(self._unwritten)

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
        if self.scrubber is None or not text:
            return text
        with self._scrub_lock:  # Presidio's engines are shared; one text at a time
            return self.scrubber.scrub(text)

    def log_request(self, **fields: Any) -> None:
        """Queue one served request (written within FLUSH_EVERY_S by the background writer)."""
        fields.setdefault("created", time.time())
        with self._lock:
            self._queue.append(fields)
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

    def flush(self) -> None:
        """Write everything queued so far. The queue lock is held only to take the batch, so the
        serving path never waits for scrubbing or the database; the write lock makes a reader's
        flush wait for a batch the writer thread is still writing (read-your-writes)."""
        with self._write_lock:
            with self._lock:
                batch, self._queue = self._queue, []
            rows = self._unwritten + [{**f, "prompt": self._scrub(f["prompt"]) or "",
                                       "output": self._scrub(f["output"]) or ""} for f in batch]
            self._unwritten = []
            if not rows:
                return
            try:
                with self.engine.begin() as conn:  # one executemany: far cheaper than ORM objects per row
                    conn.execute(insert(Request.__table__), rows)
            except OperationalError:  # unreachable or locked: keep the rows (bounded) for the next flush
                self._unwritten = rows[-self.MAX_UNWRITTEN:]
                if len(rows) > self.MAX_UNWRITTEN:
                    self.dropped += len(rows) - self.MAX_UNWRITTEN
                    log.error("request log: database unreachable; gave up on the %d oldest rows",
                              len(rows) - self.MAX_UNWRITTEN)
                raise
            except DBAPIError:  # the database refused a row: write them one by one, name each bad one
                self._insert_each(rows)

    def _insert_each(self, rows: list[dict[str, Any]]) -> None:
        for i, row in enumerate(rows):
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(Request.__table__), [row])
            except OperationalError:
                self._unwritten = rows[i:]
                raise
            except DBAPIError as e:
                self.rejected += 1
                log.error("request log: request %s refused by the database, not stored: %s",
                          row.get("request_id"), str(e.orig).strip().splitlines()[0])

    def add_feedback(self, request_id: str, score: float | None = None, correction: str | None = None) -> bool:
        """Attach feedback to a logged request; False if the request is unknown."""
        self.flush()
        with Session(self.engine) as s, s.begin():
            if s.get(Request, request_id) is None:
                return False
            s.add(Feedback(request_id=request_id, created=time.time(), score=score,
                           correction=self._scrub(correction)))
        return True

    def served_by(self, request_id: str) -> tuple[str, str] | None:
        """(model_version, variant) that answered a logged request; None if it is unknown."""
        self.flush()
        with Session(self.engine) as s:
            r = s.get(Request, request_id)
            return (r.model_version, r.variant) if r is not None else None

    def requests(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Served requests since a time, each with its mean feedback score (None without feedback)."""
        from sqlalchemy import func

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
        """Requests joined with their feedback (one row per feedback item)."""
        self.flush()
        q = (select(Request, Feedback).join(Feedback, Feedback.request_id == Request.request_id)
             .where(Feedback.created >= since).order_by(Feedback.id))
        with Session(self.engine) as s:
            return [{"request_id": r.request_id, "prompt": r.prompt, "output": r.output, "slice": r.slice,
                     "model_version": r.model_version, "variant": r.variant, "score": f.score,
                     "correction": f.correction, "created": f.created} for r, f in s.execute(q)]
