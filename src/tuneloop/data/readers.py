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

A JSONL file whose first line starts with `[` is a JSON array, not JSON Lines: every problem of its
rows ends with a hint to convert it (`jq -c '.[]' in.json > in.jsonl`).

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

from tuneloop.config.data import SOURCE_SCHEMES, encoding_problem, source_scheme_problem

log = logging.getLogger("tuneloop.readers")

__all__ = ["DETECT_BYTES", "MAX_DEPTH", "MAX_LINE_BYTES", "SOURCE_SCHEMES", "SUFFIXES", "RawRecord", "SourceError",
           "detect_encoding", "expand", "file_format", "json_array_hint", "local_data_files", "read_records",
           "too_deep"]

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MAX_LINE_BYTES = 1_000_000  # a line longer than this is quarantined without being parsed
MAX_DEPTH = 100  # a record nested deeper (lists/objects in lists/objects) is quarantined
DETECT_BYTES = 64 * 1024  # what `auto` (and the hint of a refusal) reads to detect an encoding
_SKIP_CHUNK = 1 << 20
_TIE_CHAOS, _TIE_COHERENCE = 0.005, 0.05  # charset-normalizer scores this close are a tie (detect_encoding)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32 LE starts like UTF-16 LE
_ASCII_PROBE = "\n\r,\"{}[]:a0 \t"
_MARK = "\udcff"  # stands for bytes that did not decode: a lone surrogate never comes out of a strict decode


def _mark_errors(e: UnicodeError) -> tuple[str, int]:
    return _MARK, e.end  # type: ignore[attr-defined]


codecs.register_error("tuneloop.mark", _mark_errors)


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


def _check_scheme(path: str, key: str) -> None:
    problem = source_scheme_problem(path)
    if problem:
        raise SourceError(f"{key}: {problem}" if key else problem)


def _filesystem(path: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    _check_scheme(path, "")
    try:
        return fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError) as e:  # unknown protocol, or its package (s3fs) is missing
        raise SourceError(f"{path}: cannot open this URI: {e}") from None


def expand(path: str, fmt: str = "auto", storage_options: dict[str, Any] | None = None,
           key: str = "") -> list[tuple[str, str]]:
    """A file or a folder (local or URI) -> [(file, format)], sorted so runs are reproducible. `key` names
    the setting in messages (e.g. data.sources[0].path)."""
    _check_scheme(path, key)
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
    else:
        p = Path(path)
        if not p.exists():
            raise SourceError(f"{path}: no such file or folder")
        files = local_data_files(p) if p.is_dir() else [str(p)]
        if p.is_dir() and not files:
            raise SourceError(f"{path}: folder holds no .jsonl, .csv or .parquet file")
    out = []
    for f in files:
        kind = file_format(f, fmt)
        if kind is None:
            raise SourceError(f"{f}: cannot tell the format from the extension {_suffix(f)!r}; "
                              "set `format` to jsonl, csv or parquet")
        out.append((f, kind))
    return out


def local_data_files(folder: Path) -> list[str]:
    """The record files in a local folder, recursively (what a folder source reads), sorted."""
    return [str(f) for f in sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in SUFFIXES)]


def _suffix(file: str) -> str:
    return PurePosixPath(file.split("://", 1)[-1]).suffix


def file_format(file: str, fmt: str = "auto") -> str | None:
    """jsonl, csv or parquet: `fmt`, or with auto the file's extension; None when the extension does not say."""
    return fmt if fmt != "auto" else SUFFIXES.get(_suffix(file))


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


def read_records(path: str, fmt: str = "auto", storage_options: dict[str, Any] | None = None,
                 encoding: str = "utf-8", key: str = "", encodings: dict[str, str] | None = None
                 ) -> Iterator[RawRecord]:
    """The records of a file or folder. `key` names the source's settings in messages: a config prefix
    (`data.sources[0]`: `data.sources[0].encoding`) or, starting with --, the command's flags (`--`:
    `--encoding`). `encodings`, if given, receives {file: encoding used} for every text file not read as
    plain UTF-8 (a byte-order mark, auto, an explicit encoding)."""
    problem = encoding_problem(encoding)
    if problem:
        raise SourceError(f"{_key(key, 'encoding')}: {problem}")
    path_key = f"{key}.path" if key and not key.startswith("--") else ""  # a command's paths are its arguments
    for file, kind in expand(path, fmt, storage_options, path_key):
        with _open(file, storage_options) as f:
            if not f.read(1):
                log.warning("%s: empty file, no records", file)
                continue
            f.seek(0)
            if kind == "parquet":
                yield from _parquet(file, f)
                continue
            dec = _Decoding.open(file, f, encoding, key)
            yield from (_jsonl if kind == "jsonl" else _csv)(file, dec)
            if encodings is not None and (dec.label != "utf-8" or dec.start or encoding != "utf-8"):
                encodings[file] = dec.label + ("-sig" if dec.start else "")


def _key(prefix: str, field: str) -> str:
    """How a message names a setting: `data.sources[0]` + encoding, or `--` + encoding for a flag."""
    if prefix.startswith("--"):
        return f"--{field.replace('_', '-')}"
    return f"{prefix}.{field}" if prefix else field


def detect_encoding(sample: bytes) -> str | None:
    """The encoding charset-normalizer finds most likely for `sample` (ASCII counts as utf-8), or None.
    Where its scores cannot tell candidates apart (Western text in cp1250, cp1252 and cp1257 differs in a
    letter or two), the common one wins: windows-1252, the web's default legacy encoding."""
    from charset_normalizer import from_bytes

    if len(sample) >= DETECT_BYTES and b"\n" in sample[-4096:]:  # do not judge a character cut in half
        sample = sample[:sample.rindex(b"\n") + 1]
    results = from_bytes(sample)
    best = results.best()
    if best is None:
        return None
    close = {enc for m in results if m.chaos <= best.chaos + _TIE_CHAOS
             and m.coherence >= best.coherence - _TIE_COHERENCE
             for enc in [m.encoding, *m.could_be_from_charset]}  # those that decode it to the same text too
    name = next((n for n in ("ascii", "utf_8", "cp1252") if n in close), best.encoding)
    return "utf-8" if name in ("ascii", "utf_8") else name


class _ToUtf8(io.RawIOBase):
    """A byte stream in an encoding that is not ASCII-compatible (UTF-16/32, EBCDIC: lines cannot be
    split on b'\\n') re-encoded as UTF-8 on the fly; bytes that do not decode become _MARK, which is
    not valid UTF-8, so their line is handed on as a problem and the rest is read."""

    def __init__(self, f: IO[bytes], encoding: str) -> None:
        self.f, self.dec = f, codecs.getincrementaldecoder(encoding)(errors="tuneloop.mark")
        self.buf, self.eof = b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf and not self.eof:
            chunk = self.f.read(1 << 16)
            self.eof = not chunk
            self.buf = self.dec.decode(chunk, final=self.eof).encode("utf-8", "surrogatepass")
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _ascii_compatible(codec: str) -> bool:
    """Whether lines of this encoding can be split on b'\n' and read one by one (not UTF-16/32, EBCDIC)."""
    return _ASCII_PROBE.encode(codec, "replace") == _ASCII_PROBE.encode()


@dataclass
class _Decoding:
    """How one text file is decoded: its byte lines (`f`) are decoded with `codec`; `label` is the
    file's encoding as messages name it; `explicit`: an encoding was chosen (not the utf-8 default),
    so a line that does not decode is a row problem, not a refusal of the file; `undecided`: auto
    found only ASCII in the file's head, so the first line that is not UTF-8 decides the encoding."""

    file: str
    f: IO[bytes]
    codec: str
    label: str
    explicit: bool
    key: str  # how messages name the encoding setting (data.sources[0].encoding, --encoding)
    errors: str = "strict"  # surrogatepass for a re-encoded stream: what did not decode comes back as _MARK
    start: int = 0  # where the text starts (after a UTF-8 BOM)
    undecided: bool = False

    @classmethod
    def open(cls, file: str, f: IO[bytes], encoding: str, key: str) -> _Decoding:
        name = codecs.lookup(encoding).name if encoding != "auto" else "auto"
        explicit = name not in ("utf-8", "utf-8-sig")
        head = f.read(4)
        f.seek(0)
        bom = next(((b, enc) for b, enc in _BOMS if head.startswith(b)), None)
        ekey = _key(key, "encoding")
        if bom is not None:
            family = "-".join(name.split("-")[:2])
            if name not in ("auto", "utf-8", "utf-8-sig") and family != bom[1]:
                raise SourceError(f"{ekey}: {file} starts with a {bom[1]} byte-order mark but the encoding is "
                                  f"{encoding}: {_fix(ekey, bom[1])}")
            if bom[1] == "utf-8":
                f.read(len(bom[0]))  # past the BOM; the rest is plain UTF-8
                return cls(file, f, "utf-8", "utf-8", explicit, ekey, start=len(bom[0]))
            return cls(file, io.BufferedReader(_ToUtf8(f, bom[1]), 1 << 20), "utf-8", bom[1], explicit, ekey,
                       "surrogatepass")
        undecided = False
        if name == "auto":
            sample = f.read(DETECT_BYTES)
            f.seek(0)
            undecided = sample.isascii()
            name = codecs.lookup(detect_encoding(sample) or "utf-8").name
            log.info("%s: encoding detected as %s%s", file, name, " (so far: ASCII only)" if undecided else "")
        name = "utf-8" if name == "utf-8-sig" else name
        if not _ascii_compatible(name):
            return cls(file, io.BufferedReader(_ToUtf8(f, name), 1 << 20), "utf-8", name, explicit, ekey,
                       "surrogatepass")
        return cls(file, f, name, name, explicit, ekey, undecided=undecided)

    def decode(self, line: bytes) -> tuple[str, int | None]:
        """(text, None) or, for a line that does not decode, (text with _MARK for the bad bytes, the
        first bad byte; -1 where it is not known)."""
        try:
            text = line.decode(self.codec, self.errors)
        except UnicodeDecodeError as e:
            if self.undecided:  # ASCII so far, and this line is not UTF-8: it decides the encoding
                self.undecided = False
                guess = self.guess(line)
                if guess and guess != "utf-8" and _ascii_compatible(guess):
                    log.info("%s: encoding detected as %s (at its first non-ASCII line)", self.file, guess)
                    self.codec = self.label = codecs.lookup(guess).name
                    return self.decode(line)
            return line.decode(self.codec, "tuneloop.mark"), e.start
        if self.undecided and not text.isascii():
            self.undecided = False  # UTF-8 it is
        return text, (-1 if _MARK in text else None)

    def invalid(self, start: int) -> str:
        """The problem of a line that does not decode."""
        return f"invalid {'UTF-8' if self.label == 'utf-8' else self.label}" + \
            (f" at byte {start}" if start >= 0 else "")

    def guess(self, line: bytes) -> str | None:
        """The encoding of a file with a line that did not decode: the file's head (what auto reads) when
        the line is in it, else the line and the DETECT_BYTES after it."""
        pos = self.f.tell()
        if pos <= self.start + DETECT_BYTES:
            self.f.seek(self.start)
            sample = self.f.read(DETECT_BYTES)
        else:
            sample = line + self.f.read(DETECT_BYTES)
        self.f.seek(pos)
        return detect_encoding(sample)

    def looks_like(self, line: bytes, full_key: bool = False) -> str:
        """What the file of a line that is not UTF-8 looks like, and the setting to change."""
        guess = self.guess(line)
        if guess and guess != "utf-8":
            return f"it looks like {guess}: {_fix(self.key, guess, full_key)}"
        return f"its encoding could not be detected: {_fix(self.key, None, full_key)}"

    def refusal(self, line_no: int, line: bytes) -> SourceError:
        """Under the utf-8 default: the file is not UTF-8; name the line, what it looks like, the fix."""
        return SourceError(f"{self.key}: {self.file} line {line_no} is not utf-8; {self.looks_like(line)}")


def _fix(key: str, encoding: str | None, full_key: bool = False) -> str:
    """The setting that fixes a wrong encoding: `set encoding: cp1252 (or auto)`, `rerun with --encoding cp1252`."""
    if key.startswith("--"):
        return f"rerun with {key} {encoding} (or {key} auto)" if encoding else \
            f"rerun with {key} and the file's encoding, e.g. {key} cp1252 (or {key} auto)"
    field = key if full_key else key.rsplit(".", 1)[-1]
    return f"set {field}: {encoding} (or auto)" if encoding else \
        f"set {field} to the file's encoding, e.g. {field}: cp1252 (or auto)"


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


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists/dicts nest deeper than `limit` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if depth > limit:
            return True
        stack.extend((x, depth + 1) for x in v if isinstance(x, (dict, list)))
    return False


def json_array_hint(file: str) -> str:
    """What to add to the problems of a .json/.jsonl file that holds a JSON array instead of one object a line."""
    name = PurePosixPath(file.split("://", 1)[-1]).name
    return (f" (the file is a JSON array, not JSON Lines: convert it with "
            f"jq -c '.[]' {name} > {PurePosixPath(name).stem}.jsonl)")


def _jsonl(file: str, dec: _Decoding) -> Iterator[RawRecord]:
    hint = None  # under the utf-8 default: what the file looks like, found at the first line that is not UTF-8
    array = None  # "" or, when the first non-blank line starts with `[`, the hint every problem row gets

    def bad(row: int, problem: str, text: str) -> RawRecord:
        return RawRecord(file, row, None, problem + (array or ""), text)

    for i, line, n, oversized in _lines(dec.f):
        if array is None and line.strip():
            array = json_array_hint(file) if line.lstrip().startswith(b"[") else ""
        if oversized:
            yield bad(i, f"oversized line ({n} bytes > {MAX_LINE_BYTES})", line[:200].decode(dec.codec, "replace"))
            continue
        if not line.strip():
            continue
        if b"\0" in line:  # JSON text never holds a raw NUL; a binary file, or UTF-16/32 read as UTF-8, does
            utf16 = "" if dec.explicit or dec.label != "utf-8" else \
                f"; if the file is UTF-16 text: {_fix(dec.key, 'utf-16', full_key=True)}"
            yield bad(i, f"binary data, not JSON text (NUL bytes{utf16})", line[:200].decode(dec.codec, "replace"))
            continue
        text, at = dec.decode(line)
        if at is not None:
            problem = dec.invalid(at)
            if not dec.explicit:
                hint = hint or dec.looks_like(line, full_key=True).replace("it looks", "the file looks", 1)
                problem += f"; {hint}"
            yield bad(i, problem, text.replace(_MARK, "\ufffd"))
            continue
        text = text.rstrip("\r\n")  # the line ending is not part of the record
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield bad(i, f"malformed JSON at column {e.colno}: {e.msg}", text)
            continue
        except RecursionError:
            yield bad(i, f"record nested too deeply (more than {MAX_DEPTH} levels)", text[:200])
            continue
        if not isinstance(obj, dict):
            yield bad(i, f"a record must be a JSON object, got {type(obj).__name__}", text)
            continue
        if too_deep(obj):
            yield bad(i, f"record nested too deeply (more than {MAX_DEPTH} levels)", text[:200])
            continue
        yield RawRecord(file, i, obj)


def _csv(file: str, dec: _Decoding) -> Iterator[RawRecord]:
    """Streamed: physical lines are decoded one at a time. Under the utf-8 default a line that is not
    UTF-8 makes the whole file unreadable (a CSV is one encoded document): a SourceError naming the line,
    the encoding it looks like and the setting to change. With an explicit encoding (or auto) the bytes
    that do not decode are marked and the row holding them is handed on as a problem."""
    bad: dict[int, int] = {}  # physical line -> first byte that did not decode

    def text_lines() -> Iterator[str]:
        for i, line, _, oversized in _lines(dec.f):
            if oversized:
                raise SourceError(f"{file}: line {i} is longer than {MAX_LINE_BYTES} bytes")
            text, at = dec.decode(line)
            if at is not None:
                if not dec.explicit:
                    raise dec.refusal(i, line)
                bad[i] = at
            yield text

    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.DictReader(text_lines())
    row, last_line = 1, 1
    try:
        if reader.fieldnames and any(_MARK in name for name in reader.fieldnames):
            raise SourceError(f"{dec.key}: {file}: the header line is not valid {dec.label}; "
                              f"{_fix(dec.key, None)}")
        last_line = reader.line_num
        for rec in reader:
            row += 1  # row 1 is the header; a row is a record even when a quoted field spans lines
            lines = range(last_line + 1, reader.line_num + 1)
            last_line = reader.line_num
            undecodable = [ln for ln in lines if ln in bad]
            if undecodable:
                at = bad.pop(undecodable[0])
                for ln in undecodable[1:]:
                    bad.pop(ln)
                yield RawRecord(file, row, None, f"{dec.invalid(at)} of line {undecodable[0]}",
                                json.dumps(rec, ensure_ascii=False).replace(_MARK, "\ufffd"))
                continue
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
