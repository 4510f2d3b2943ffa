"""Ingest: sources + feedback store -> formatted SFT records, preference pairs and eval set.

Output folder (the `dataset` artifact of the pipeline):
    sft.jsonl          {id, slice, source, prompt, completion, user_text, response}
    preference.jsonl   {id, slice, source, prompt, chosen, rejected}
    eval.jsonl         {id, slice, source, prompt, completion, user_text, response}
    quarantine.jsonl   {source, row, reason, record} - every record not accepted, with its reason
    report.json        counts (read = accepted + quarantined, per reason/slice/source), content hash

`prompt`/`completion`/`chosen`/`rejected` are rendered with the base model's chat template
(see formatting.py); `user_text`/`response` keep the plain text for evaluation and reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import DataConfig, DataSource
from tuneloop.data.formatting import ChatFormatter
from tuneloop.data.readers import RawRecord, read_records

log = logging.getLogger("tuneloop.ingest")

ROLES = {"system", "user", "assistant"}
_WS = re.compile(r"\s+")


class Rejected(ValueError):
    """A record that is quarantined; the message is the reason (names the field)."""


def normalize_text(s: str) -> str:
    return _WS.sub(" ", s.strip().lower())


def _text(rec: dict[str, Any], key: str, limit: int) -> str:
    if key not in rec or rec[key] is None:
        raise Rejected(f"missing field `{key}`")
    v = rec[key]
    if not isinstance(v, str):
        raise Rejected(f"field `{key}` must be a string, got {type(v).__name__}")
    if not v.strip():
        raise Rejected(f"field `{key}` is empty or whitespace")
    if len(v) > limit:
        raise Rejected(f"field `{key}` is too long ({len(v)} > {limit} characters)")
    return v.strip()


def _messages(rec: dict[str, Any], limit: int) -> tuple[list[dict[str, str]], str]:
    msgs = rec["messages"]
    if isinstance(msgs, str):  # CSV/Parquet carry nested data as JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise Rejected("field `messages` is not a JSON list") from None
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise Rejected("field `messages` must be a list of at least two turns")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise Rejected(f"field `messages[{i}].role` must be one of {sorted(ROLES)}")
        out.append({"role": m["role"], "content": _text(m, "content", limit)})
    if out[-1]["role"] != "assistant":
        raise Rejected("field `messages`: the last turn must be the assistant's answer")
    return out[:-1], out[-1]["content"]


@dataclass
class Counts:
    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    slices: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "accepted": self.accepted, "quarantined": self.quarantined,
                "per_reason": dict(self.reasons), "per_slice": dict(self.slices), "per_source": dict(self.sources)}


def _reason_key(reason: str) -> str:
    """Group reasons for counting: 'field `x` is too long (…)' -> 'field `x` is too long'."""
    if reason.startswith("exact duplicate of "):  # one group, not one per duplicated id
        return "exact duplicate"
    return re.sub(r"\s*\(.*\)$|: .*$| at .*$", "", reason)


class _Writer:
    def __init__(self, out: Path, name: str) -> None:
        self.f = open(out / name, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        self.f.write(line)
        self.sha.update(line.encode())

    def close(self) -> str:
        self.f.close()
        return self.sha.hexdigest()


class Ingestor:
    def __init__(self, cfg: DataConfig, formatter: ChatFormatter, out: Path) -> None:
        self.cfg, self.fmt, self.out = cfg, formatter, out
        out.mkdir(parents=True, exist_ok=True)
        self.counts = {"sft": Counts(), "preference": Counts(), "eval": Counts()}
        self.quarantine = _Writer(out, "quarantine.jsonl")
        self.seen: dict[str, str] = {}  # normalized content hash -> id (exact dedup)
        self.eval_prompts: dict[str, str] = {}  # normalized eval prompt -> eval id (leak check)
        self.ids: set[str] = set()

    # -- one record --
    def _reject(self, kind: str, raw: RawRecord, reason: str, record: Any = None) -> None:
        c = self.counts[kind]
        c.quarantined += 1
        c.reasons[_reason_key(reason)] += 1
        self.quarantine.write({"kind": kind, "source": raw.source, "row": raw.row, "reason": reason,
                               "record": record if record is not None else raw.data if raw.data is not None
                               else raw.raw_text})

    def _id(self, rec: dict[str, Any], raw: RawRecord, content: str) -> str:
        rid = rec.get("id")
        if rid is not None and not isinstance(rid, (str, int)):
            raise Rejected(f"field `id` must be a string or integer, got {type(rid).__name__}")
        if rid is None or str(rid).strip() == "":
            rid = "h-" + hashlib.sha256(f"{Path(raw.source).name}\0{content}".encode()).hexdigest()[:16]
        rid = str(rid)
        if rid in self.ids:
            raise Rejected(f"field `id`: duplicate id {rid!r}")
        return rid

    def _slice(self, rec: dict[str, Any], src: DataSource) -> str:
        s = rec.get("slice") or src.slice or "default"
        if not isinstance(s, str):
            raise Rejected(f"field `slice` must be a string, got {type(s).__name__}")
        return s

    def _sft(self, rec: dict[str, Any], raw: RawRecord, src: DataSource) -> dict[str, Any]:
        limit_p, limit_r = self.cfg.max_prompt_chars, self.cfg.max_response_chars
        if "messages" in rec:
            turns, response = _messages(rec, max(limit_p, limit_r))
            user_text = next((t["content"] for t in reversed(turns) if t["role"] == "user"), "")
        else:
            user_text = _text(rec, "prompt", limit_p)
            response = _text(rec, "response", limit_r)
            turns = [{"role": "user", "content": user_text}]
        return {"slice": self._slice(rec, src), "source": raw.source, "prompt": self.fmt.prompt(turns),
                "completion": self.fmt.completion(response), "user_text": user_text, "response": response}

    def _pref(self, rec: dict[str, Any], raw: RawRecord, src: DataSource) -> dict[str, Any]:
        lim = self.cfg.max_response_chars
        user_text = _text(rec, "prompt", self.cfg.max_prompt_chars)
        chosen, rejected = _text(rec, "chosen", lim), _text(rec, "rejected", lim)
        if chosen == rejected:  # case or punctuation differences are real preferences (formatting)
            raise Rejected("fields `chosen` and `rejected` are the same answer")
        return {"slice": self._slice(rec, src), "source": raw.source, "prompt": self.fmt.user_prompt(user_text),
                "chosen": self.fmt.completion(chosen), "rejected": self.fmt.completion(rejected),
                "user_text": user_text}

    def _content_key(self, kind: str, r: dict[str, Any]) -> str:
        parts = [kind, normalize_text(r["user_text"])]
        parts += [normalize_text(r["response"])] if kind != "preference" else \
            [normalize_text(r["chosen"]), normalize_text(r["rejected"])]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def add(self, kind: str, raw: RawRecord, src: DataSource, writer: _Writer) -> None:
        c = self.counts[kind]
        c.read += 1
        if raw.data is None:
            self._reject(kind, raw, raw.problem or "unreadable")
            return
        try:
            r = self._pref(raw.data, raw, src) if kind == "preference" else self._sft(raw.data, raw, src)
            key = self._content_key(kind, r)
            if key in self.seen:  # before the id: an id-less duplicate gets the same content id
                raise Rejected(f"exact duplicate of {self.seen[key]}")
            rid = self._id(raw.data, raw, key)
            if kind != "eval" and normalize_text(r["user_text"]) in self.eval_prompts:
                raise Rejected(f"eval leak: prompt is held-out eval record {self.eval_prompts[normalize_text(r['user_text'])]}")
        except Rejected as e:
            self._reject(kind, raw, str(e))
            return
        self.seen[key] = rid
        self.ids.add(rid)
        if kind == "eval":
            self.eval_prompts[normalize_text(r["user_text"])] = rid
        c.accepted += 1
        c.slices[r["slice"]] += 1
        c.sources[Path(raw.source).name] += 1
        writer.write({"id": rid, **r})

    def add_all(self, kind: str, sources: Iterable[DataSource], writer: _Writer) -> None:
        for src in sources:
            for raw in read_records(src.path, src.format):
                self.add(kind, raw, src, writer)


def ingest(cfg: DataConfig, formatter: ChatFormatter, out: Path,
           feedback_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ingest into `out`; returns the report (also written to out/report.json)."""
    ing = Ingestor(cfg, formatter, out)
    writers = {k: _Writer(out, f"{k}.jsonl") for k in ("eval", "sft", "preference")}
    # Eval first: its prompts are what training data must not leak.
    ing.add_all("eval", cfg.eval, writers["eval"])
    ing.add_all("sft", [s for s in cfg.sources if s.kind == "sft"], writers["sft"])
    ing.add_all("preference", [s for s in cfg.sources if s.kind == "preference"], writers["preference"])
    fb_counts = {"rows": 0, "sft": 0, "preference": 0, "no_pair_empty_output": 0}
    if feedback_rows:
        from tuneloop.monitor.feedback import feedback_to_training

        fb_stats: dict[str, int] = {}
        fb_sft, fb_pairs = feedback_to_training(feedback_rows, fb_stats)
        fb_counts = {"rows": len(feedback_rows), "sft": len(fb_sft), "preference": len(fb_pairs), **fb_stats}
        src = DataSource(path="feedback-store", slice="feedback")
        for i, rec in enumerate(fb_sft, 1):
            ing.add("sft", RawRecord("feedback-store", i, rec), src, writers["sft"])
        for i, rec in enumerate(fb_pairs, 1):
            ing.add("preference", RawRecord("feedback-store", i, rec), src, writers["preference"])
    hashes = {k: w.close() for k, w in writers.items()}
    ing.quarantine.close()
    data_hash = hashlib.sha256((hashes["sft"] + hashes["preference"]).encode()).hexdigest()
    totals = {k: sum(getattr(c, k) for c in ing.counts.values()) for k in ("read", "accepted", "quarantined")}
    report = {**totals, "per_reason": dict(sum((c.reasons for c in ing.counts.values()), Counter())),
              "by_kind": {k: c.as_dict() for k, c in ing.counts.items()},
              "feedback": fb_counts, "file_sha256": hashes, "data_hash": data_hash}
    assert report["read"] == report["accepted"] + report["quarantined"], "ingest lost records"
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log.info("ingest: read %d, accepted %d, quarantined %d (%s)", report["read"], report["accepted"],
             report["quarantined"], ", ".join(f"{k}: {v}" for k, v in report["per_reason"].items()) or "none")
    return report
