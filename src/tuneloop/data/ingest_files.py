"""Ingest without a run config: `tuneloop ingest PATH...` (check, scrub, deduplicate record files on their
own) and `tuneloop evaluate`'s eval sets. Same Ingestor, same quarantine and counting rules as the pipeline's
ingest stage (data/ingest.py).

`tuneloop ingest` writes into a fresh sibling of its output folder and swaps it in only when everything was
written (`staged_output`): after an error the old outputs are still there, complete, and no partial folder is
left; after success the old folder is replaced whole by two renames (a reader sees the old outputs or the new
ones, never a mix; between the two renames, for a moment, no folder).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneloop.config import DataConfig, DataSource
from tuneloop.data.formatting import ChatFormatter
from tuneloop.data.ingest import Ingestor, LengthPolicy, RecordWriter
from tuneloop.data.readers import read_records

log = logging.getLogger("tuneloop.ingest")

OUTPUTS = ("accepted.jsonl", "quarantine.jsonl", "report.json", "eval.jsonl")  # what `tuneloop ingest` writes


class OutputFolderError(ValueError):
    """An output folder that ingest may not replace (a file, the current folder, a folder with other files)."""


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A new empty sibling folder of `out` to write into. When the block ends without an error it replaces
    `out` (renamed in; the old folder renamed away, then removed); on any error (KeyboardInterrupt too) it is
    removed and `out` stays as it was. Refuses (OutputFolderError) to replace a folder that holds anything but
    ingest's own outputs, so pointing --out at a folder of other files loses none of them."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out}: is a file; give a folder for the outputs")
    if out == Path.cwd() or out in Path.cwd().parents:
        raise OutputFolderError(f"{out}: is the current folder or above it; give a new or an earlier output folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if others:
            raise OutputFolderError(f"{out}: holds files that are not ingest outputs ({', '.join(others[:3])}"
                                    f"{', ...' if len(others) > 3 else ''}); give a new folder or an earlier "
                                    "output folder of tuneloop ingest")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staged, old = out.parent / f".{out.name}.{tag}.tmp", out.parent / f".{out.name}.{tag}.old"
    staged.mkdir()
    try:
        yield staged
        if out.exists():
            out.rename(old)
            try:
                staged.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staged.rename(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already after the swap


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
    (and out/eval.jsonl with eval_paths), swapped in only when all were written (staged_output). kind auto:
    a record with `chosen`/`rejected` is a preference pair, any other an SFT record; a template makes every
    record a classification record. `max_length`
    (tokens, counted with the formatter's tokenizer) and `long_records` are the length policy for every
    training record; messages name the command's flags (--encoding, --max-length, --long-records).
    Raises SourceError before writing anything when a path cannot be read at all, and OutputFolderError when
    `out` may not be replaced."""
    from tuneloop.data.readers import expand

    if template is not None:
        kind = "classification"
    for p in [*paths, *(eval_paths or [])]:
        expand(p, fmt)  # a missing file or unknown format fails here, before any output
    with staged_output(out) as staged:
        return _ingest_into(staged, paths, eval_paths, kind, template, label_field, slice_, fmt, formatter, pii,
                            near_threshold, max_prompt_chars, max_response_chars, encoding, max_length,
                            long_records)


def _ingest_into(out: Path, paths: list[str], eval_paths: list[str] | None, kind: str, template: str | None,
                 label_field: str, slice_: str | None, fmt: str, formatter: ChatFormatter | None, pii: bool,
                 near_threshold: float, max_prompt_chars: int, max_response_chars: int, encoding: str,
                 max_length: int | None, long_records: str) -> dict[str, Any]:
    from tuneloop.config import DedupConfig, PiiConfig

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
