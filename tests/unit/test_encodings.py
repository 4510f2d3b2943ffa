"""Reading real-world files: encodings (explicit, auto, byte-order marks, refusals naming the key or
flag to set, undecodable rows quarantined), the URI scheme allowlist and deeply nested records."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuneloop.config import ConfigError, DataConfig, DataSource, DedupConfig, parse_config
from tuneloop.data import readers
from tuneloop.data.ingest import ingest

from conftest import read_jsonl as _read  # noqa: E402
from conftest import write_jsonl as _jsonl  # noqa: E402

pytestmark = pytest.mark.unit

# Hotel reviews as a public CSV carries them: most lines plain ASCII, some with accents, curly quotes,
# dashes and the euro sign - the characters cp1252 encodes differently from UTF-8.
REVIEWS = [
    ("The café downstairs made the best coffee I had all week.", "positive"),
    ("Rooms were clean and the staff friendly.", "positive"),
    ("Check-in took forty minutes and nobody apologised.", "negative"),
    ("A naïve question maybe, but why is breakfast extra?", "negative"),
    ("They called it a “suite” – it was a broom cupboard.", "negative"),
    ("Great location, five minutes from the station.", "positive"),
    ("Parking cost €25 a night, which nobody mentioned.", "negative"),
    ("The bed was comfortable and the room quiet.", "positive"),
    ("Didn’t expect much for the price, but it was lovely.", "positive"),
    ("Wi-Fi dropped every few minutes in our room.", "negative"),
    ("Spotless bathroom and plenty of hot water.", "positive"),
    ("Air conditioning rattled all night long.", "negative"),
    ("Staff recommended a great little restaurant nearby.", "positive"),
    ("The pool was closed for the whole stay.", "negative"),
    ("Lovely garden and a quiet terrace for reading.", "positive"),
]


def _review_rows(n: int) -> list[tuple[str, str, str]]:
    return [(f"r{i}", f"{REVIEWS[i % len(REVIEWS)][0]} (stay {i})", REVIEWS[i % len(REVIEWS)][1]) for i in range(n)]


def _csv_bytes(rows: list[tuple[str, str, str]], encoding: str) -> bytes:
    lines = ["id,review,label"] + [f'{rid},"{text}",{label}' for rid, text, label in rows]
    return ("\r\n".join(lines) + "\r\n").encode(encoding)


def _cp1252_csv(tmp: Path, n: int = 60) -> tuple[Path, list[tuple[str, str, str]]]:
    rows = _review_rows(n)
    path = tmp / "reviews.csv"
    path.write_bytes(_csv_bytes(rows, "cp1252"))
    not_utf8 = sum(1 for line in path.read_bytes().splitlines() if not _decodes(line))
    assert 0.1 < not_utf8 / n < 0.5  # like the file: a minority of lines is not UTF-8
    return path, rows


def _decodes(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _source(path: Path, **kw: Any) -> DataSource:
    return DataSource(path=str(path), kind="classification", template="Review: {review}\nSentiment?",
                      label_field="label", **kw)


def _ingest(tmp: Path, sources: list[DataSource]) -> tuple[dict[str, Any], Path]:
    ev = _jsonl(tmp / "ev" / "eval.jsonl", [{"id": "e1", "prompt": "An unrelated eval prompt", "response": "x"}])
    out = tmp / "out"
    rep = ingest(DataConfig(sources=sources, eval=[DataSource(path=str(ev))], dedup=DedupConfig(near_threshold=0)),
                 None, out)
    assert rep["read"] == rep["accepted"] + rep["quarantined"]
    return rep, out


# -- encodings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["cp1252", "auto"])
def test_cp1252_csv_read_with_its_encoding(tmp_path: Path, encoding: str) -> None:
    path, rows = _cp1252_csv(tmp_path)
    rep, out = _ingest(tmp_path, [_source(path, encoding=encoding)])
    assert rep["quarantined"] == 0 and rep["by_kind"]["sft"]["accepted"] == len(rows)
    sft = {r["id"]: r for r in _read(out / "sft.jsonl")}
    for rid, text, label in rows:
        assert sft[rid]["user_text"] == f"Review: {text}\nSentiment?" and sft[rid]["response"] == label
    written = (out / "sft.jsonl").read_text(encoding="utf-8")
    for word in ("café", "naïve", "“suite” – it", "€25", "Didn’t"):
        assert word in written, word
    assert rep["encodings"] == {str(path): "cp1252"}


def test_without_an_encoding_the_refusal_names_line_encoding_and_key(tmp_path: Path) -> None:
    path, _ = _cp1252_csv(tmp_path)
    first_bad = next(i for i, line in enumerate(path.read_bytes().splitlines(), 1) if not _decodes(line))
    with pytest.raises(readers.SourceError) as e:
        _ingest(tmp_path, [_source(path)])
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"data.sources[0].encoding: {path} line {first_bad} is not utf-8; it looks like cp1252: "
                   "set encoding: cp1252 (or auto)")


def test_cli_refusal_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    from tuneloop.cli import app

    path, rows = _cp1252_csv(tmp_path)
    res = CliRunner().invoke(app, ["ingest", str(path), "--out", str(tmp_path / "out"),
                                   "--template", "Review: {review}"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith(f"error: --encoding: {path} line ")
    assert "is not utf-8; it looks like cp1252: rerun with --encoding cp1252 (or --encoding auto)" in lines[0]
    res = CliRunner().invoke(app, ["ingest", str(path), "--out", str(tmp_path / "out"), "--near-dup", "0",
                                   "--template", "Review: {review}", "--encoding", "cp1252"])
    assert res.exit_code == 0, res.output
    assert f"read {len(rows)}, accepted {len(rows)}, quarantined 0" in res.output
    res = CliRunner().invoke(app, ["ingest", str(path), "--out", str(tmp_path / "out"), "--encoding", "klingon"])
    assert res.exit_code == 2 and "--encoding klingon: unknown encoding" in res.output


def test_undecodable_rows_are_quarantined_under_an_explicit_encoding(tmp_path: Path) -> None:
    rows = _review_rows(20)
    data = _csv_bytes(rows, "cp1252").splitlines(keepends=True)
    # bytes cp1252 does not define (0x81, 0x8D, 0x9D): a damaged export
    assert data[2].startswith(b'r1,"Rooms') and data[9].startswith(b'r8,"Didn')
    data[2] = data[2].replace(b"Rooms", b"Ro\x81ms")  # row 3 (the header is row 1)
    data[9] = data[9].replace(b"expect", b"exp\x8d\x9dect")  # row 10
    (tmp_path / "damaged.csv").write_bytes(b"".join(data))
    jsonl = tmp_path / "damaged.jsonl"
    jsonl.write_bytes("\n".join(json.dumps({"id": f"j{i}", "review": f"{t} Again.", "label": lab}, ensure_ascii=False)
                                for i, (_, t, lab) in enumerate(rows[:6])).encode("cp1252") + b"\n")
    with open(jsonl, "ab") as f:
        f.write(b'{"id": "bad", "review": "caf\x81 au lait", "label": "positive"}\n')
    rep, out = _ingest(tmp_path, [_source(tmp_path / "damaged.csv", encoding="cp1252"),
                                  _source(jsonl, encoding="cp1252")])
    q = {(Path(r["source"]).name, r["row"]): r for r in _read(out / "quarantine.jsonl")}
    assert set(q) == {("damaged.csv", 3), ("damaged.csv", 10), ("damaged.jsonl", 7)}
    assert q[("damaged.csv", 3)]["reason"] == "invalid cp1252 at byte 6 of line 3"
    assert q[("damaged.csv", 10)]["reason"] == "invalid cp1252 at byte 14 of line 10"
    assert "Ro\ufffdms" in q[("damaged.csv", 3)]["record"]  # what could be read, the bad byte marked
    assert q[("damaged.jsonl", 7)]["reason"] == "invalid cp1252 at byte 28"
    sft = rep["by_kind"]["sft"]
    assert sft["read"] == 20 + 7 == sft["accepted"] + sft["quarantined"] and sft["quarantined"] == 3
    assert rep["per_reason"] == {"invalid cp1252": 3}
    accepted = {r["id"] for r in _read(out / "sft.jsonl")}
    assert "r2" in accepted and "r1" not in accepted and "r8" not in accepted and "r19" in accepted


def test_default_utf8_jsonl_quarantines_the_line_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"id": rid, "prompt": text, "response": label}, ensure_ascii=False).encode("cp1252")
             for rid, text, label in _review_rows(40)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rep, out = _ingest(tmp_path, [DataSource(path=str(path))])
    q = _read(out / "quarantine.jsonl")
    assert q and rep["quarantined"] == len(q) and rep["per_reason"] == {"invalid UTF-8": len(q)}
    assert q[0]["reason"].startswith("invalid UTF-8 at byte ")
    assert q[0]["reason"].endswith("; the file looks like cp1252: set data.sources[0].encoding: cp1252 (or auto)")


def test_auto_decides_at_the_first_non_ascii_line_past_the_sampled_head(tmp_path: Path) -> None:
    """auto samples the first 64 KiB; where that is all ASCII, the first line that is not UTF-8 decides
    (nothing is read twice, nothing is loaded whole)."""
    ascii_rows = [(f"a{i}", f"Plain ascii review number {i}, nothing special about it", "positive")
                  for i in range(1500)]
    path = tmp_path / "late.csv"
    path.write_bytes(_csv_bytes(ascii_rows + _review_rows(30), "cp1252"))
    assert path.read_bytes()[:readers.DETECT_BYTES].isascii()
    rep, out = _ingest(tmp_path, [_source(path, encoding="auto")])
    assert rep["quarantined"] == 0 and rep["encodings"] == {str(path): "cp1252"}
    written = (out / "sft.jsonl").read_text(encoding="utf-8")
    assert "naïve" in written and "€25" in written


@pytest.mark.parametrize("encoding,bom", [("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE),
                                          ("utf-16-be", codecs.BOM_UTF16_BE), ("utf-32-le", codecs.BOM_UTF32_LE)])
def test_byte_order_marks_decide_the_encoding(tmp_path: Path, encoding: str, bom: bytes) -> None:
    rows = _review_rows(8)
    (tmp_path / "bom.csv").write_bytes(bom + _csv_bytes(rows, encoding))
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(bom + "\n".join(json.dumps({"id": f"j{i}", "prompt": t, "response": lab}, ensure_ascii=False)
                                      for i, (_, t, lab) in enumerate(rows)).encode(encoding))
    recs = list(readers.read_records(str(tmp_path / "bom.csv")))  # the default (utf-8): the BOM wins
    assert [r.data for r in recs] == [{"id": i, "review": t, "label": lab} for i, t, lab in rows]
    recs = list(readers.read_records(str(jsonl), encoding="auto"))
    assert [r.data["prompt"] for r in recs] == [t for _, t, _ in rows]
    family = "utf-8" if encoding == "utf-8" else encoding[:6]
    found: dict[str, str] = {}
    list(readers.read_records(str(jsonl), encodings=found))
    assert found == {str(jsonl): "utf-8-sig" if family == "utf-8" else family}
    if encoding != "utf-8":
        with pytest.raises(readers.SourceError, match=rf"^data\.sources\[1\]\.encoding: .*bom\.jsonl starts with a "
                                                      rf"{family} byte-order mark but the encoding is cp1252: "
                                                      rf"set encoding: {family} \(or auto\)$"):
            list(readers.read_records(str(jsonl), encoding="cp1252", key="data.sources[1]"))


def test_utf16_without_bom_under_its_explicit_encoding(tmp_path: Path) -> None:
    rows = _review_rows(5)
    path = tmp_path / "le.csv"
    path.write_bytes(_csv_bytes(rows, "utf-16-le") + b"\x00\xd8" + ",x,y\r\n".encode("utf-16-le"))  # lone surrogate
    recs = list(readers.read_records(str(path), encoding="utf-16-le"))
    assert [r.data for r in recs[:5]] == [{"id": i, "review": t, "label": lab} for i, t, lab in rows]
    assert recs[5].data is None and recs[5].problem == "invalid utf-16-le of line 7"


def test_encoding_is_checked_in_the_config() -> None:
    assert DataSource(path="x.csv", encoding="latin-1").encoding == "latin-1"  # kept as written
    for bad, words in (("klingon", "unknown encoding 'klingon'"), ("base64", "not a text encoding")):
        with pytest.raises(ValueError, match=words):
            DataSource(path="x.csv", encoding=bad)


# -- URI schemes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["http://example.com/train.jsonl", "https://example.com/data/",
                                  "ftp://host/x.csv", "memory://x.jsonl", "simplecache::s3://bucket/x.jsonl",
                                  "HTTP://EXAMPLE.COM/x.csv"])
def test_only_allowed_schemes_are_read(tmp_path: Path, path: str) -> None:
    from tuneloop.tiny import tiny_run_config
    import yaml

    with pytest.raises(readers.SourceError, match=r"scheme is not allowed for data; use a local path or file://, "
                                                  r"s3://, gs://, az://, abfs://"):
        list(readers.read_records(path))
    with pytest.raises(readers.SourceError, match=r"^data\.sources\[2\]\.path: "):
        list(readers.read_records(path, key="data.sources[2]"))
    with pytest.raises(readers.SourceError, match="^" + re.escape(path) + ": the "):
        list(readers.read_records(path, key="--"))  # a command's paths are its arguments: no key
    raw = yaml.safe_load(tiny_run_config(tmp_path, tmp_path / "model").read_text())
    raw["data"]["sources"][1]["path"] = path
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "run.yaml")
    (line,) = str(e.value).splitlines()
    assert line.startswith("run.yaml: data.sources[1].path: ") and "scheme is not allowed" in line


def test_allowed_schemes_pass_the_config() -> None:
    assert readers.SOURCE_SCHEMES == ("file", "s3", "gs", "az", "abfs", "abfss")
    for p in ("s3://bucket/prefix/", "gs://b/x.jsonl", "az://c/x.csv", "abfs://c/x.csv", "file:///data/x.jsonl",
              "/local/path.jsonl", "relative/path.csv"):
        assert DataSource(path=p).path == p


def test_cli_refuses_a_scheme_in_one_line(tmp_path: Path) -> None:
    from tuneloop.cli import app

    res = CliRunner().invoke(app, ["ingest", "http://127.0.0.1:9/x.jsonl", "--out", str(tmp_path / "o")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1
    assert lines[0] == ("error: http://127.0.0.1:9/x.jsonl: the http:// scheme is not allowed for data; use a local "
                        "path or file://, s3://, gs://, az://, abfs://, abfss://")


# -- deeply nested records -------------------------------------------------------------------------
def test_deeply_nested_records_are_quarantined(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    src = _jsonl(tmp_path / "deep.jsonl", [
        {"id": "ok", "prompt": "A fine question", "response": "yes"},
        deep,  # a 100000-deep nested list: RecursionError in the JSON parser
        '{"id": "d2", "prompt": ' + deep + ', "response": "x"}',
        '{"id": "d3", "prompt": "p", "response": "r", "meta": ' + "[" * 500 + "]" * 500 + "}",  # parses, too deep
        {"id": "last", "prompt": "Still read after them", "response": "ok"},
    ])
    (tmp_path / "deep.csv").write_text('id,messages\nc1,"' + "[" * 100_000 + "]" * 100_000 + '"\n'
                                       'c2,"' + "[" * 300 + "]" * 300 + '"\n')
    rep, out = _ingest(tmp_path, [DataSource(path=str(src)), DataSource(path=str(tmp_path / "deep.csv"))])
    q = {(Path(r["source"]).name, r["row"]): r for r in _read(out / "quarantine.jsonl")}
    for where in (("deep.jsonl", 2), ("deep.jsonl", 3), ("deep.jsonl", 4)):
        assert q[where]["reason"] == "record nested too deeply (more than 100 levels)", where
        assert len(q[where]["record"]) <= 200  # the head of the line, not the whole of it
    for where in (("deep.csv", 2), ("deep.csv", 3)):
        assert q[where]["reason"] == "field `messages` is nested too deeply (more than 100 levels)", where
    assert [r["id"] for r in _read(out / "sft.jsonl")] == ["ok", "last"]
    assert rep["by_kind"]["sft"]["read"] == 7 and rep["quarantined"] == 5
