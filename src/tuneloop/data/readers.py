"""Read records from JSONL, CSV and Parquet files (or folders of them), one at a time.

Sources are local paths or URIs of the schemes in SOURCE_SCHEMES (`s3://bucket/prefix/`, read
through s3fs; http:// and other fsspec schemes are refused); every file is streamed, never loaded
whole, so memory stays flat whatever the file size: a JSONL line longer than MAX_LINE_BYTES is
skipped in chunks (and quarantined) rather than read.

Text files are decoded with the source's `encoding`: utf-8 by default, any Python codec, or `auto`
(charset-normalizer on the first DETECT_BYTES of each file). A byte-order mark (UTF-8, UTF-16,
UTF-32) decides the encoding of its file. Under the default utf-8 a CSV line that does not decode
refuses the file (a CSV is one encoded document), naming the line and the encoding it looks like;
with an explicit encoding or auto such a row is handed on as a problem and the rest is read.

Every record comes out as a `RawRecord`: where it came from (file, 1-based row) and either
the parsed mapping or the reason it could not be parsed. Nothing is dropped here; a row that
cannot be read is handed on as a problem so the caller can quarantine it. A file that cannot
be read at all (missing, unknown format, not a Parquet file, a CSV that is not UTF-8 when no
encoding was set) raises `SourceError` with a one-line message naming it.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

log = logging.getLogger("tuneloop.readers")

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MAX_LINE_BYTES = 1_000_000  # a line longer than this is quarantined without being parsed
_SKIP_CHUNK = 1 << 20


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unknown format); names the path."""


@dataclass
class RawRecord:
    source: str
    row: int
    data: dict[str, Any] | None
    problem: str | None = None
    raw_text: str | None = None  # the original line when it could not be parsed


def is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(path: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError) as e:  # unknown protocol, or its package (s3fs) is missing
        raise SourceError(f"{path}: cannot open this URI: {e}") from None


def expand(path: str, fmt: str = "auto", storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """A file or a folder (local or URI) -> [(file, format)], sorted so runs are reproducible."""
    if is_uri(path):
        fs, root = _filesystem(path, storage_options)
        try:
            if fs.isdir(root):
                files = sorted(fs.unstrip_protocol(f) for f in fs.find(root)
                               if PurePosixPath(f).suffix in SUFFIXES)
                if not files:
                    raise SourceError(f"{path}: folder holds no .jsonl, .csv or .parquet file")
            elif fs.exists(root):
                files = [path]
            else:
                raise SourceError(f"{path}: no such file or folder")
        except SourceError:
            raise
        except Exception as e:  # credentials, endpoint, permissions: one line, naming the source
            raise SourceError(f"{path}: cannot be listed: {type(e).__name__}: {e}") from None
        suffix = lambda f: PurePosixPath(f.split("://", 1)[-1]).suffix  # noqa: E731
    else:
        p = Path(path)
        if not p.exists():
            raise SourceError(f"{path}: no such file or folder")
        files = [str(f) for f in sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)] \
            if p.is_dir() else [str(p)]
        if p.is_dir() and not files:
            raise SourceError(f"{path}: folder holds no .jsonl, .csv or .parquet file")
        suffix = lambda f: Path(f).suffix  # noqa: E731
    out = []
    for f in files:
        kind = fmt if fmt != "auto" else SUFFIXES.get(suffix(f))
        if kind is None:
            raise SourceError(f"{f}: cannot tell the format from the extension {suffix(f)!r}; "
                              "set `format` to jsonl, csv or parquet")
        out.append((f, kind))
    return out


@contextmanager
def _open(file: str, storage_options: dict[str, Any] | None) -> Iterator[IO[bytes]]:
    if is_uri(file):
        fs, p = _filesystem(file, storage_options)
        try:
            # fsspec files read in blocks but their readline() takes no size: buffer them so
            # lines are read with a bound, as from a local file
            f = io.BufferedReader(fs.open(p, "rb"), buffer_size=1 << 20)
        except Exception as e:
            raise SourceError(f"{file}: cannot be opened: {type(e).__name__}: {e}") from None
    else:
        try:
            f = open(file, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise SourceError(f"{file}: cannot be opened: {e.strerror}") from None
    try:
        yield f
    finally:
        f.close()


def read_records(path: str, fmt: str = "auto", storage_options: dict[str, Any] | None = None) -> Iterator[RawRecord]:
    for file, kind in expand(path, fmt, storage_options):
        with _open(file, storage_options) as f:
            if not f.read(1):
                log.warning("%s: empty file, no records", file)
                continue
            f.seek(0)
            yield from {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[kind](file, f)


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes, int, bool]]:
    """(line number, line or its first bytes, length in bytes, oversized) with bounded memory: a
    line whose content is longer than MAX_LINE_BYTES is skipped in chunks; only its head is kept."""
    i = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 2)
        if not line:
            return
        i += 1
        n = len(line)
        if n == MAX_LINE_BYTES + 2 and not line.endswith(b"\n"):  # more of this line follows
            head = line[:200]
            while not line.endswith(b"\n"):
                line = f.readline(_SKIP_CHUNK)
                if not line:
                    break
                n += len(line)
            yield i, head, n, True
            continue
        content = n - (2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0)
        yield i, line, n, content > MAX_LINE_BYTES


def _jsonl(file: str, f: IO[bytes]) -> Iterator[RawRecord]:
    for i, line, n, oversized in _lines(f):
        if oversized:
            yield RawRecord(file, i, None, f"oversized line ({n} bytes > {MAX_LINE_BYTES})",
                            line[:200].decode("utf-8", "replace"))
            continue
        if i == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        if not line.strip():
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
        except RecursionError:
            yield RawRecord(file, i, None, "malformed JSON: nested too deeply", text[:200])
            continue
        if not isinstance(obj, dict):
            yield RawRecord(file, i, None, f"a record must be a JSON object, got {type(obj).__name__}", text)
            continue
        yield RawRecord(file, i, obj)


def _csv(file: str, f: IO[bytes]) -> Iterator[RawRecord]:
    """Streamed: physical lines are decoded one at a time (a CSV is one encoded document, so a
    line that is not UTF-8 makes the whole file unreadable: a SourceError naming the line)."""
    def text_lines() -> Iterator[str]:
        for i, line, _, oversized in _lines(f):
            if oversized:
                raise SourceError(f"{file}: line {i} is longer than {MAX_LINE_BYTES} bytes")
            if i == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"{file}: not UTF-8 (line {i}, byte {e.start}); re-encode the file as UTF-8") \
                    from None

    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.DictReader(text_lines())
    row = 1
    try:
        for rec in reader:
            row += 1  # row 1 is the header; a row is a record even when a quoted field spans lines
            if None in rec:
                yield RawRecord(file, row, None, "more fields than the header", json.dumps(rec[None]))
                continue
            yield RawRecord(file, row, {k: v for k, v in rec.items() if k is not None})
    except csv.Error as e:
        raise SourceError(f"{file}: not a readable CSV file (line {reader.line_num}): {e}") from None


def _parquet(file: str, f: IO[bytes]) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise SourceError(f"{file}: not a readable Parquet file: {e}") from None
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                i += 1
                yield RawRecord(file, i, rec)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{file}: Parquet data after row {i} cannot be read: {e}") from None
