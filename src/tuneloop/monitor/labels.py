"""What production quality is measured from, kept next to the request log: label probabilities and
ground truth that arrives late.

Two tables of their own in the feedback store's database (sqlite in the state dir locally, the
same Postgres on a cluster), keyed by the request id the gateway answered with:
  quality_label_probs  the probability the served version gave each label of the request's slice
                       (written by the gateway when it records them, or by the monitor, which
                       scores the window's requests with the champion and keeps the result)
  quality_labels       the true label of a request: imported from a file (`tuneloop labels import`,
                       source `import`), or from a human audit sample (source `audit`, the only
                       source drawn uniformly at random, so the only one prediction-powered
                       inference may use). One row per (request, source, rater); importing again
                       replaces it.
The request log itself (feedback/store.py) is not changed; feedback with a correction or a score is
read from it where realized quality is computed (monitor/realized.py). The audit ratings also come
back as evaluation records of the next run (`audit_examples`, read by the ingest stage).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SOURCES = ("import", "audit")


class _Base(DeclarativeBase):
    pass


class LabelProbs(_Base):
    __tablename__ = "quality_label_probs"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64))
    slice: Mapped[str] = mapped_column(String(64))
    probs: Mapped[str] = mapped_column(Text)  # JSON {label: p}
    created: Mapped[float] = mapped_column(Float)


class GroundTruth(_Base):
    __tablename__ = "quality_labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))  # import | audit
    rater: Mapped[str] = mapped_column(String(128), default="")
    created: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("uq_quality_label", "request_id", "source", "rater", unique=True),)


class QualityStore:
    """The two tables on an engine (the FeedbackStore's: `QualityStore(store.engine)`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        _Base.metadata.create_all(engine)

    def record_probs(self, rows: list[dict[str, Any]]) -> None:
        """Rows of request_id, model_version, slice, probs ({label: p}); a request scored before is
        replaced."""
        if not rows:
            return
        ids = [r["request_id"] for r in rows]
        with Session(self.engine) as s, s.begin():
            for i in range(0, len(ids), 500):
                s.execute(delete(LabelProbs).where(LabelProbs.request_id.in_(ids[i:i + 500])))
            s.add_all(LabelProbs(request_id=r["request_id"], model_version=r["model_version"], slice=r["slice"],
                                 probs=json.dumps(r["probs"]), created=r.get("created", time.time()))
                      for r in rows)

    def probs(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """request id -> {model_version, probs} for those that have them."""
        out: dict[str, dict[str, Any]] = {}
        with Session(self.engine) as s:
            for i in range(0, len(request_ids), 500):
                q = select(LabelProbs).where(LabelProbs.request_id.in_(request_ids[i:i + 500]))
                for r in s.scalars(q):
                    out[r.request_id] = {"model_version": r.model_version, "probs": json.loads(r.probs)}
        return out

    def add_labels(self, rows: list[dict[str, Any]], source: str) -> int:
        """Rows of request_id, label and optionally rater; returns how many were stored."""
        if source not in SOURCES:
            raise ValueError(f"source {source!r}: one of {', '.join(SOURCES)}")
        now = time.time()
        with Session(self.engine) as s, s.begin():
            for r in rows:
                rater = str(r.get("rater") or "")
                s.execute(delete(GroundTruth).where(GroundTruth.request_id == r["request_id"],
                                                    GroundTruth.source == source, GroundTruth.rater == rater))
                s.add(GroundTruth(request_id=r["request_id"], label=r["label"], source=source, rater=rater,
                                  created=now))
        return len(rows)

    def labels(self, request_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Stored labels (of these requests), oldest first."""
        q = select(GroundTruth).order_by(GroundTruth.id)
        with Session(self.engine) as s:
            rows = [{"request_id": g.request_id, "label": g.label, "source": g.source, "rater": g.rater,
                     "created": g.created} for g in s.scalars(q)]
        if request_ids is not None:
            wanted = set(request_ids)
            rows = [r for r in rows if r["request_id"] in wanted]
        return rows


def read_label_file(path: Path) -> list[dict[str, Any]]:
    """Ground-truth rows {request_id, label, rater, where} from a CSV or JSONL file (columns request_id,
    label, optional rater) or a Label Studio JSON export of audit tasks (data.request_id, a Choices
    control - named `label`, or the only one)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        from tuneloop.evaluate.label_studio import read_export

        rows = []
        for i, a in enumerate(read_export(path)):
            value = a["values"].get("label")
            if value is None and len(a["values"]) == 1:
                value = next(iter(a["values"].values()))
            rows.append({"request_id": str(a["data"].get("request_id") or ""), "label": value, "rater": a["rater"],
                         "where": f"{path.name}: annotation {i} (task {a['task_id']})"})
        return rows
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i}: not JSON ({e.msg})") from None
                rows.append({"request_id": str(r.get("request_id") or ""), "label": r.get("label"),
                             "rater": str(r.get("rater") or ""), "where": f"{path.name}: line {i}"})
        return rows
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"request_id", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
            return [{"request_id": (r["request_id"] or "").strip(), "label": r["label"], "rater": r.get("rater") or "",
                     "where": f"{path.name}: row {i}"} for i, r in enumerate(reader, start=2)]
    raise ValueError(f"{path}: use .csv, .jsonl or a Label Studio .json export")


def request_slices(engine: Any, request_ids: list[str]) -> dict[str, str]:
    """request id -> slice of the logged requests among these."""
    from tuneloop.feedback.store import Request

    out: dict[str, str] = {}
    with Session(engine) as s:
        for i in range(0, len(request_ids), 500):
            q = select(Request.request_id, Request.slice).where(Request.request_id.in_(request_ids[i:i + 500]))
            out.update({rid: sl for rid, sl in s.execute(q)})
    return out


def import_labels(store: Any, rows: list[dict[str, Any]], labels: dict[str, list[str]],
                  source: str) -> dict[str, Any]:
    """Store the rows whose request is logged, in a classification slice, with one of its labels (compared
    as answers are); returns {stored, unrated (no label given), refused: [(where, why)]}."""
    from tuneloop.evaluate.calibration import label_of

    store.flush()
    slices = request_slices(store.engine, [r["request_id"] for r in rows])
    good, refused, unrated = [], [], 0
    for r in rows:
        sl = slices.get(r["request_id"])
        if r["label"] is None or str(r["label"]).strip() == "":
            unrated += 1
        elif not r["request_id"]:
            refused.append((r["where"], "no request_id"))
        elif sl is None:
            refused.append((r["where"], f"request {r['request_id']!r} is not in the request log"))
        elif sl not in labels:
            refused.append((r["where"], f"request {r['request_id']!r} is in slice {sl!r}, not a classification slice"))
        elif (label := label_of(None if r["label"] is None else str(r["label"]), labels[sl])) is None:
            refused.append((r["where"], f"label {r['label']!r} is not one of slice {sl!r}'s ({', '.join(labels[sl])})"))
        else:
            good.append({**r, "label": label})
    stored = QualityStore(store.engine).add_labels(good, source)
    return {"stored": stored, "unrated": unrated, "refused": refused}


def record_label_probs(quality: QualityStore, backend: Any, messages: list[dict[str, str]], request_id: str,
                       version: str, slice_: str, labels: list[str]) -> None:
    """The gateway's hook, run off the request path (an executor thread) after a classification request was
    answered: the served model's label probabilities for exactly the prompt it answered (the backend's
    model, tokenizer and lock: HFBackend), kept for the monitor's estimate."""
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.evaluate.label_probs import label_probabilities

    prompt = ChatFormatter(backend.tokenizer, None).prompt(messages)  # messages arrive operator-first
    with backend.lock:
        probs = label_probabilities(backend.model, backend.tokenizer, prompt, labels)
    quality.record_probs([{"request_id": request_id, "model_version": version, "slice": slice_, "probs": probs}])


def audit_examples(engine: Any, slices: list[str], max_per_slice: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The audited requests of these classification slices as evaluation examples: {request_id, slice, prompt,
    label}, the label the raters' majority gave (a request whose raters tie is left out and counted), the most
    recently rated `max_per_slice` per slice. Returns (examples, {rated, tied, capped, per_slice})."""
    from tuneloop.feedback.store import Request

    by_request: dict[str, list[tuple[str, float]]] = defaultdict(list)
    with Session(engine) as s:
        for g in s.scalars(select(GroundTruth).where(GroundTruth.source == "audit")):
            by_request[g.request_id].append((g.label, g.created))
        requests: dict[str, tuple[str, str]] = {}
        ids = list(by_request)
        for i in range(0, len(ids), 500):
            q = select(Request.request_id, Request.slice, Request.prompt).where(Request.request_id.in_(ids[i:i + 500]))
            requests.update({rid: (sl, prompt) for rid, sl, prompt in s.execute(q)})
    wanted = set(slices)
    per_slice: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    stats: dict[str, Any] = {"rated": 0, "tied": 0, "capped": 0, "per_slice": {}}
    for rid, ratings in by_request.items():
        sl, prompt = requests.get(rid, ("", ""))
        if sl not in wanted:
            continue
        stats["rated"] += 1
        top = Counter(label for label, _ in ratings).most_common(2)
        if len(top) > 1 and top[0][1] == top[1][1]:
            stats["tied"] += 1
            continue
        per_slice[sl].append((max(c for _, c in ratings), {"request_id": rid, "slice": sl, "prompt": prompt,
                                                           "label": top[0][0], "raters": len(ratings)}))
    out = []
    for sl, rows in sorted(per_slice.items()):
        rows.sort(key=lambda x: x[0], reverse=True)
        stats["capped"] += max(len(rows) - max_per_slice, 0)
        kept = [r for _, r in rows[:max_per_slice]]
        stats["per_slice"][sl] = len(kept)
        out += sorted(kept, key=lambda r: r["request_id"])
    return out, stats
