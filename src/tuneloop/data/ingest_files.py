"""Ingest without a run config: `tuneloop ingest PATH...` (check, scrub, deduplicate record files on their
own) and `tuneloop evaluate`'s eval sets. Same Ingestor, same quarantine and counting rules as the pipeline's
ingest stage (data/ingest.py)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from tuneloop.config import DataConfig, DataSource
from tuneloop.data.formatting import ChatFormatter
from tuneloop.data.ingest import Ingestor, LengthPolicy, RecordWriter
from tuneloop.data.readers import read_records

log = logging.getLogger("tuneloop.ingest")


def format_eval_set(paths: list[str], formatter: ChatFormatter, out: Path) -> dict[str, Any]:
    """Only the eval part of ingest, for `tuneloop evaluate`: raw records (prompt/response/slice or
    chat messages; preference pairs in files whose records have `chosen`) -> out/eval.jsonl and
    out/eval_preference.jsonl, with the same quarantine and counting rules."""
    from tuneloop.config import DataSource

    ing = Ingestor(DataConfig(sources=[DataSource(path=p) for p in paths], eval=[DataSource(path=p) for p in paths]),
                   formatter, out)
    writers = {k: RecordWriter(out, f"{k}.jsonl") for k in ("eval", "eval_preference")}
    for p in paths:
        src = DataSource(path=p)
        for raw in read_records(p):
            kind = "eval_preference" if raw.data is not None and "chosen" in raw.data else "eval"
            ing.add(kind, raw, src, writers[kind])
    for w in writers.values():
        w.close()
    ing.quarantine.close()
    return {k: c.as_dict() for k, c in ing.counts.items() if k.startswith("eval")}


class _KindWriter:
    """One shared output file, each record tagged with its kind (the `tuneloop ingest` layout)."""

    def __init__(self, writer: RecordWriter, kind: str) -> None:
        self.writer, self.kind = writer, kind

    def write(self, obj: dict[str, Any]) -> None:
        self.writer.write({"kind": self.kind, **obj})


def ingest_paths(paths: list[str], out: Path, *, eval_paths: list[str] | None = None, kind: str = "auto",
                 template: str | None = None, label_field: str = "label", slice_: str | None = None,
                 fmt: str = "auto", formatter: ChatFormatter | None = None, pii: bool = True,
                 near_threshold: float = 0.85, max_prompt_chars: int = 4000,
                 max_response_chars: int = 4000, encoding: str = "utf-8", max_length: int | None = None,
                 long_records: str = "quarantine") -> dict[str, Any]:
    """`tuneloop ingest`: files or folders -> out/accepted.jsonl, out/quarantine.jsonl, out/report.json
    (and out/eval.jsonl with eval_paths). kind auto: a record with `chosen`/`rejected` is a preference
    pair, any other an SFT record; a template makes every record a classification record. `max_length`
    (tokens, counted with the formatter's tokenizer) and `long_records` are the length policy for every
    training record; messages name the command's flags (--encoding, --max-length, --long-records).
    Raises SourceError before writing anything when a path cannot be read at all."""
    from tuneloop.config import DedupConfig, PiiConfig
    from tuneloop.data.readers import expand

    if template is not None:
        kind = "classification"
    for p in [*paths, *(eval_paths or [])]:
        expand(p, fmt)  # a missing file or unknown format fails here, before any output
    src_kind = kind if kind in ("sft", "preference", "classification") else "sft"
    sources = [DataSource(path=p, kind=src_kind, slice=slice_, format=fmt, template=template,
                          label_field=label_field, encoding=encoding) for p in paths]
    evals = [DataSource(path=p, slice=slice_, format=fmt, encoding=encoding) for p in eval_paths or []]
    cfg = DataConfig.model_construct(sources=sources, eval=evals, max_prompt_chars=max_prompt_chars,
                                     max_response_chars=max_response_chars, pii=PiiConfig(enabled=pii),
                                     dedup=DedupConfig(near_threshold=near_threshold), long_records=long_records)
    lengths = LengthPolicy(long_records, {"sft": max_length, "preference": max_length},
                           {"sft": "--max-length", "preference": "--max-length", "policy": "--long-records"}) \
        if max_length is not None else None
    ing = Ingestor(cfg, formatter, out, lengths=lengths, source_key=lambda src: "--")
    accepted = RecordWriter(out, "accepted.jsonl")
    writers = {k: _KindWriter(accepted, k) for k in ("sft", "preference")}
    eval_writer = RecordWriter(out, "eval.jsonl") if evals else None
    if eval_writer is not None:
        ing.add_all("eval", evals, eval_writer)
    ing.add_all("preference" if src_kind == "preference" else "sft", sources, writers, kinds=kind)
    hashes = {"accepted": accepted.close()}
    if eval_writer is not None:
        hashes["eval"] = eval_writer.close()
    ing.quarantine.close()
    totals = {k: sum(getattr(c, k) for c in ing.counts.values()) for k in ("read", "accepted", "quarantined")}
    report = {**totals, "per_reason": dict(sum((c.reasons for c in ing.counts.values()), Counter())),
              "by_kind": {k: c.as_dict() for k, c in ing.counts.items() if c.read},
              "inputs": list(paths), "eval_inputs": list(eval_paths or []),
              "chat_formatted": formatter is not None, **ing.reports(),
              "file_sha256": hashes, "data_hash": hashes["accepted"]}
    assert report["read"] == report["accepted"] + report["quarantined"], "ingest lost records"
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
