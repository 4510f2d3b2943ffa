"""Read records from JSONL, CSV and Parquet files (or folders of them), one at a time.

Every record comes out as a `RawRecord`: where it came from (file, 1-based row) and either
the parsed mapping or the reason it could not be parsed. Nothing is dropped here; a row that
cannot be read is handed on as a problem so the caller can quarantine it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MAX_LINE_BYTES = 1_000_000  # a line longer than this is quarantined without being parsed


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unknown format); names the path."""


@dataclass
class RawRecord:
    source: str
    row: int
    data: dict[str, Any] | None
    problem: str | None = None
    raw_text: str | None = None  # the original line when it could not be parsed


def expand(path: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """A file or a folder -> [(file, format)], sorted so runs are reproducible."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file or folder")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES) if p.is_dir() else [p]
    if p.is_dir() and not files:
        raise SourceError(f"{path}: folder holds no .jsonl, .csv or .parquet file")
    out = []
    for f in files:
        kind = fmt if fmt != "auto" else SUFFIXES.get(f.suffix)
        if kind is None:
            raise SourceError(f"{f}: cannot tell the format from the extension {f.suffix!r}; "
                              "set `format` to jsonl, csv or parquet")
        out.append((str(f), kind))
    return out


def read_records(path: str, fmt: str = "auto") -> Iterator[RawRecord]:
    for file, kind in expand(path, fmt):
        yield from {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[kind](file)


def _jsonl(file: str) -> Iterator[RawRecord]:
    with open(file, "rb") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_BYTES:
                yield RawRecord(file, i, None, f"oversized line ({len(line)} bytes > {MAX_LINE_BYTES})",
                                line[:200].decode("utf-8", "replace"))
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRecord(file, i, None, f"invalid UTF-8 at byte {e.start}", line.decode("utf-8", "replace"))
                continue
            text = text.rstrip("\r\n")  # the line ending is not part of the record
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield RawRecord(file, i, None, f"malformed JSON at column {e.colno}: {e.msg}", text)
                continue
            if not isinstance(obj, dict):
                yield RawRecord(file, i, None, f"a record must be a JSON object, got {type(obj).__name__}", text)
                continue
            yield RawRecord(file, i, obj)


def _csv(file: str) -> Iterator[RawRecord]:
    raw = Path(file).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{file}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for i, row in enumerate(reader, start=2):  # row 1 is the header
        if None in row:
            yield RawRecord(file, i, None, "more fields than the header", json.dumps(row[None]))
            continue
        yield RawRecord(file, i, {k: v for k, v in row.items() if k is not None})


def _parquet(file: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise SourceError(f"{file}: not a readable Parquet file: {e}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            i += 1
            yield RawRecord(file, i, rec)
