"""The data plane beyond the basics of test_ingest.py: the issue's bad-input corpus (truncated JSONL,
CSV missing a column, mixed encodings, a 100 MB line, empty files, Parquet with wrong types,
whitespace-only records, duplicate ids), classification records, PII in what is written,
near-duplicates and eval leaks, replay of the champion's data, and `tuneloop ingest`."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuneloop.config import DataConfig, DataSource, DedupConfig, PiiConfig
from tuneloop.data import readers
from tuneloop.data.ingest import ingest
from tuneloop.data.replay import ChampionData, sample_records

from conftest import read_jsonl as _read  # noqa: E402
from conftest import write_jsonl as _jsonl  # noqa: E402

pytestmark = pytest.mark.unit



def _adds_up(rep: dict[str, Any]) -> None:
    assert rep["read"] == rep["accepted"] + rep["quarantined"]
    assert sum(rep["per_reason"].values()) == rep["quarantined"]
    for c in rep["by_kind"].values():
        assert c["read"] == c["accepted"] + c["quarantined"]


def _ingest(tmp: Path, sources: list[DataSource], evals: list[dict[str, Any]] | None = None,
            formatter: Any = None, **kw: Any) -> tuple[dict[str, Any], Path]:
    ev = _jsonl(tmp / "ev" / "eval.jsonl",
                evals or [{"id": "e1", "prompt": "An unrelated eval prompt", "response": "x"}])
    out = tmp / "out"
    rep = ingest(DataConfig(sources=sources, eval=[DataSource(path=str(ev))], **kw), formatter, out)
    _adds_up(rep)
    return rep, out


# -- the bad-input corpus ----------------------------------------------------------------------
def test_100mb_single_line_is_quarantined_with_flat_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.write(b'{"id": "huge", "prompt": "')
        chunk = b"x" * (1 << 20)
        for _ in range(100):
            f.write(chunk)
        f.write(b'", "response": "y"}\n')
        f.write(b'{"id": "after", "prompt": "The line after the huge one", "response": "fine"}\n')
    tracemalloc.start()
    recs = list(readers.read_records(str(big)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * (1 << 20), f"reading a 100 MB line peaked at {peak >> 20} MB"
    assert [r.row for r in recs] == [1, 2]
    first_line = 26 + 100 * (1 << 20) + 20  # with its newline
    assert recs[0].data is None and recs[0].problem == f"oversized line ({first_line} bytes > 1000000)"
    assert len(recs[0].raw_text) == 200 and recs[1].data["id"] == "after"
    rep, out = _ingest(tmp_path, [DataSource(path=str(big))])
    assert rep["per_reason"] == {"oversized line": 1} and rep["by_kind"]["sft"]["accepted"] == 1


def test_mixed_encodings(tmp_path: Path) -> None:
    mixed = _jsonl(tmp_path / "mixed.jsonl", [
        "\ufeff" + json.dumps({"id": "bom", "prompt": "A UTF-8 BOM starts the file", "response": "ok"}),
        {"id": "u8", "prompt": "café order, naïve question", "response": "billing"},
        b'{"id": "l1", "prompt": "caf\xe9 in latin-1", "response": "billing"}',
        "caf\u00e9 in cp1252 \u2019".encode("cp1252") + b' not even json',
        {"id": "u16", "prompt": "emoji \U0001F600 and \u4e2d\u6587", "response": "ok"},
    ])
    rep, out = _ingest(tmp_path, [DataSource(path=str(mixed))])
    q = {r["row"]: r for r in _read(out / "quarantine.jsonl")}
    assert set(q) == {3, 4} and all("invalid UTF-8" in r["reason"] for r in q.values())
    assert "caf" in q[3]["record"]
    assert [r["id"] for r in _read(out / "sft.jsonl")] == ["bom", "u8", "u16"]
    utf16 = tmp_path / "utf16.jsonl"  # a byte-order mark says what the file is
    utf16.write_bytes(json.dumps({"prompt": "utf-16 file", "response": "x"}).encode("utf-16"))
    (rec,) = readers.read_records(str(utf16))
    assert rec.data == {"prompt": "utf-16 file", "response": "x"}
    latin_csv = tmp_path / "latin.csv"
    latin_csv.write_bytes("prompt,response\nfine row,billing\ncaf\u00e9,billing\n".encode("latin-1"))
    with pytest.raises(readers.SourceError, match=r"latin\.csv line 3 is not utf-8; "):
        list(readers.read_records(str(latin_csv)))


def test_empty_and_whitespace_files(tmp_path: Path) -> None:
    files = {"e.jsonl": b"", "e.csv": b"", "e.parquet": b"", "ws.jsonl": b"  \n\t\n\n",
             "header.csv": b"prompt,response\n"}
    for name, data in files.items():
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
        assert list(readers.read_records(str(tmp_path / "in" / name))) == [], name
    rep, _ = _ingest(tmp_path, [DataSource(path=str(tmp_path / "in"))])
    assert rep["by_kind"]["sft"]["read"] == 0


def test_whitespace_only_records_and_duplicate_ids(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "w.jsonl", [
        {"id": "a", "prompt": "   ", "response": "x"},
        {"id": "b", "prompt": "Real question here", "response": "\n\t "},
        {"id": "c", "messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "hi"}]},
        {"id": "d", "prompt": "Another real question", "response": "yes"},
        {"id": "d", "prompt": "A different question with the same id", "response": "no"},
        {"id": 7, "prompt": "Integer ids are fine", "response": "ok"},
        {"id": "7", "prompt": "...and collide with their string form", "response": "ok"},
        {"id": ["x"], "prompt": "A list is no id", "response": "ok"},
    ])
    rep, out = _ingest(tmp_path, [DataSource(path=str(src))])
    reasons = {r["row"]: r["reason"] for r in _read(out / "quarantine.jsonl")}
    assert "`prompt` is empty or whitespace" in reasons[1] and "`response` is empty or whitespace" in reasons[2]
    assert "`content` is empty or whitespace" in reasons[3]
    assert reasons[5] == "field `id`: duplicate id 'd'" and reasons[7] == "field `id`: duplicate id '7'"
    assert "`id` must be a string or integer" in reasons[8]
    assert [r["id"] for r in _read(out / "sft.jsonl")] == ["d", "7"]


def test_truncated_jsonl_and_deep_nesting(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "t.jsonl", [
        {"id": "ok", "prompt": "Fine", "response": "yes"},
        '{"id": "cut", "prompt": "The export stopped in the mid',
        "[" * 100_000 + "]" * 100_000,
    ])
    with open(src, "ab") as f:
        f.write(b'{"id": "last", "prompt": "no newline at the end of the file", "response": "ok"}')
    rep, out = _ingest(tmp_path, [DataSource(path=str(src))])
    reasons = {r["row"]: r["reason"] for r in _read(out / "quarantine.jsonl")}
    assert reasons[2].startswith("malformed JSON") and ("nested too deeply" in reasons[3]
                                                        or reasons[3].startswith("a record must be"))
    assert [r["id"] for r in _read(out / "sft.jsonl")] == ["ok", "last"]


def test_parquet_wrong_types(tmp_path: Path) -> None:
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "id": ["p1", "p2", "p3", "p4", "p5"],
        "prompt": [{"text": "a struct"}, {"text": "b"}, {"text": "c"}, {"text": "d"}, {"text": "e"}],
        "response": ["x", "y", "z", "w", "v"]}), tmp_path / "struct.parquet")
    pq.write_table(pa.table({
        "id": [1, 2, 3],
        "prompt": ["A fine prompt", "Timestamps are not text", "Bytes are not text"],
        "response": ["ok", None, None],
        "when": [datetime.datetime(2026, 1, 1)] * 3}), tmp_path / "mixed.parquet")
    pq.write_table(pa.table({"id": ["b1"], "prompt": [b"bytes"], "response": ["x"]}), tmp_path / "bytes.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    rep, out = _ingest(tmp_path, [DataSource(path=str(tmp_path / n)) for n in
                                  ("struct.parquet", "mixed.parquet", "bytes.parquet")])
    q = _read(out / "quarantine.jsonl")
    assert sum("`prompt` must be a string, got dict" in r["reason"] for r in q) == 5
    assert sum("missing field `response`" in r["reason"] for r in q) == 2
    assert any("`prompt` must be a string, got bytes" in r["reason"] for r in q)
    assert [r["id"] for r in _read(out / "sft.jsonl")] == ["1"]
    with pytest.raises(readers.SourceError, match=r"broken\.parquet: not a readable Parquet file"):
        list(readers.read_records(str(tmp_path / "broken.parquet")))


def test_csv_problems(tmp_path: Path) -> None:
    (tmp_path / "missing.csv").write_text("id,prompt\nc1,How do I change my address?\n")
    (tmp_path / "quoted.csv").write_text('id,prompt,response\nq1,"A prompt\nover two lines, with a comma",ok\n'
                                         'q2,short,fine\n')
    rep, out = _ingest(tmp_path, [DataSource(path=str(tmp_path / "missing.csv")),
                                  DataSource(path=str(tmp_path / "quoted.csv"))])
    assert rep["per_reason"] == {"missing field `response`": 1}
    sft = {r["id"]: r for r in _read(out / "sft.jsonl")}
    assert sft["q1"]["user_text"] == "A prompt\nover two lines, with a comma" and "q2" in sft
    (tmp_path / "long.csv").write_bytes(b"prompt,response\n" + b"x" * (readers.MAX_LINE_BYTES + 5) + b",y\n")
    with pytest.raises(readers.SourceError, match=r"long\.csv: line 2 is longer than"):
        list(readers.read_records(str(tmp_path / "long.csv")))


# -- normalization -------------------------------------------------------------------------------
def test_text_is_normalized_before_the_checks_and_counted(tmp_path: Path) -> None:
    from tuneloop.config.data import NormalizeConfig

    src = _jsonl(tmp_path / "n.jsonl", [
        {"id": "h", "prompt": "I didn&#039;t get my refund &amp; nobody called", "response": "billing &gt; refunds"},
        {"id": "nfc", "prompt": "Cafe\u0301 order", "response": "ok"},  # e + combining acute accent
        {"id": "ctl", "prompt": "Tab\tand\x00null\x1bescape\x85nel", "response": "ok\r\nthen"},
        {"id": "m", "messages": [{"role": "user", "content": "Tom &amp; Jerry?"},
                                 {"role": "assistant", "content": "&quot;cartoon&quot;"}]},
        {"id": "e", "prompt": "&nbsp;", "response": "x"},  # nothing left once normalized
        {"id": "d1", "prompt": "Fish & chips?", "response": "yes"},
        {"id": "d2", "prompt": "Fish &amp; chips?", "response": "yes"},  # the same once normalized
    ])
    (tmp_path / "m.csv").write_text('id,messages\nc1,"[{""role"": ""user"", ""content"": ""5 &lt; 6?""}, '
                                    '{""role"": ""assistant"", ""content"": ""yes""}]"\n')
    sources = [DataSource(path=str(src)), DataSource(path=str(tmp_path / "m.csv"))]
    rep, out = _ingest(tmp_path, sources)
    sft = {r["id"]: r for r in _read(out / "sft.jsonl")}
    assert sft["h"]["user_text"] == "I didn't get my refund & nobody called"
    assert sft["h"]["response"] == "billing > refunds"
    assert sft["nfc"]["user_text"] == "Caf\u00e9 order"
    assert sft["ctl"]["user_text"] == "Tab\tandnullescapenel" and sft["ctl"]["response"] == "ok\r\nthen"
    assert [t["content"] for t in sft["m"]["turns"]] == ["Tom & Jerry?"] and sft["m"]["response"] == '"cartoon"'
    assert sft["c1"]["user_text"] == "5 < 6?"  # the JSON of the messages field is parsed first
    reasons = {r["record"]["id"]: r["reason"] for r in _read(out / "quarantine.jsonl")}
    assert reasons == {"e": "field `prompt` is empty or whitespace", "d2": "exact duplicate of d1"}
    assert _read(out / "quarantine.jsonl")[1]["record"]["prompt"] == "Fish &amp; chips?"  # quarantine: as read
    norm = rep["normalize"]
    assert norm["steps"] == ["html_entities", "unicode_nfc", "control_chars"]
    assert norm["texts_changed"] == {"html_entities": 7, "unicode_nfc": 1, "control_chars": 1}
    assert norm["per_source"] == {"n.jsonl": {"html_entities": 6, "unicode_nfc": 1, "control_chars": 1},
                                  "m.csv": {"html_entities": 1}}
    off = NormalizeConfig(html_entities=False, unicode_nfc=False, control_chars=False)
    rep, out = _ingest(tmp_path / "off", sources, normalize=off)
    from tuneloop.jsonl import read_jsonl  # a raw U+0085 stays in the text: str.splitlines would split there

    sft = {r["id"]: r for r in read_jsonl(out / "sft.jsonl")}
    assert sft["h"]["user_text"] == "I didn&#039;t get my refund &amp; nobody called" and "d2" in sft
    assert sft["nfc"]["user_text"] == "Cafe\u0301 order" and rep["normalize"]["texts_changed"] == {}


# -- classification, PII, near-duplicates --------------------------------------------------------
def test_classification_records_become_instructions(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from tuneloop.data.formatting import ChatFormatter

    src = _jsonl(tmp_path / "tickets.jsonl", [
        {"id": "k1", "text": "My card was charged twice", "queue": "billing"},
        {"text": "Where is my parcel?", "queue": "shipping", "slice": "routing_v2"},
        {"id": "k3", "text": "Reset password please", "queue": 3},
        {"id": "k4", "text": "No label here"},
        {"id": "k5", "body": "Wrong field name", "queue": "account"},
        {"id": "k6", "text": "   ", "queue": "account"},
        {"id": "k7", "text": "Boolean label", "queue": True},
    ])
    tpl = "Route this ticket: {text}"
    source = DataSource(path=str(src), kind="classification", template=tpl, label_field="queue",
                        slice="ticket_routing")
    fmt = ChatFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    rep, out = _ingest(tmp_path, [source], formatter=fmt)
    sft = _read(out / "sft.jsonl")
    assert [(r["user_text"], r["response"], r["slice"]) for r in sft] == [
        ("Route this ticket: My card was charged twice", "billing", "ticket_routing"),
        ("Route this ticket: Where is my parcel?", "shipping", "routing_v2"),
        ("Route this ticket: Reset password please", "3", "ticket_routing")]
    assert sft[0]["id"] == "k1" and sft[1]["id"].startswith("h-") and sft[0]["source"] == str(src)
    assert sft[0]["prompt"].endswith("<|im_start|>assistant\n") and sft[0]["completion"] == "billing<|im_end|>"
    again, _ = ingest(DataConfig(sources=[source], eval=[DataSource(path=str(tmp_path / "ev"))]), fmt,
                      tmp_path / "again"), None
    assert again["data_hash"] == rep["data_hash"]  # stable ids and content
    reasons = {r["row"]: r["reason"] for r in _read(out / "quarantine.jsonl")}
    assert reasons == {4: "missing field `queue`", 5: "missing field `text`",
                       6: "field `text` is empty or whitespace",
                       7: "field `queue` must be a string or integer, got bool"}
    with pytest.raises(ValueError, match="needs `template`"):
        DataSource(path="x", kind="classification")
    with pytest.raises(ValueError, match="plain"):
        DataSource(path="x", kind="classification", template="{text!r}")
    with pytest.raises(ValueError, match="for kind classification"):
        DataSource(path="x", template="{text}")


def test_pii_is_scrubbed_everywhere_before_writing(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "I am jane.doe@example.com, call +44 20 7946 0958", "response": "account"},
        {"id": "b", "messages": [{"role": "user", "content": "Refund to DE89 3704 0044 0532 0130 00"},
                                 {"role": "assistant", "content": "Sent from 10.0.0.7"}]},
        {"id": "c", "prompt": "My card 4111-1111-1111-1111 leaked"},  # quarantined: no response
        b'{"id": "d", "prompt": "truncated with bob@example.org',
    ])
    prefs = _jsonl(tmp_path / "pref.jsonl", [
        {"id": "p1", "prompt": "Which queue?", "chosen": "billing, mail a@b.com", "rejected": "billing, mail c@d.com"},
    ])
    rep, out = _ingest(tmp_path, [DataSource(path=str(src)), DataSource(path=str(prefs), kind="preference")])
    written = (out / "sft.jsonl").read_text() + (out / "quarantine.jsonl").read_text() + \
        (out / "preference.jsonl").read_text()
    for secret in ("jane.doe@example.com", "7946", "DE89", "10.0.0.7", "4111", "bob@example.org"):
        assert secret not in written, secret
    sft = {r["id"]: r for r in _read(out / "sft.jsonl")}
    assert sft["a"]["user_text"] == "I am <EMAIL_ADDRESS>, call <PHONE_NUMBER>"
    assert sft["b"]["turns"][0]["content"] == "Refund to <IBAN_CODE>"
    assert sft["b"]["response"] == "Sent from <IP_ADDRESS>"
    q = {r["row"]: r for r in _read(out / "quarantine.jsonl") if r["kind"] == "sft"}
    assert q[3]["record"]["prompt"] == "My card <CREDIT_CARD> leaked" and "<EMAIL_ADDRESS>" in q[4]["record"]
    pq = _read(out / "quarantine.jsonl")[-1]
    assert pq["kind"] == "preference" and "same answer once PII is replaced" in pq["reason"]
    assert rep["pii"]["entities"] == {"CREDIT_CARD": 1, "EMAIL_ADDRESS": 4, "IBAN_CODE": 1, "IP_ADDRESS": 1,
                                      "PHONE_NUMBER": 1}  # each span once, where it was written
    assert rep["pii"]["by_output"] == {"accepted": {"EMAIL_ADDRESS": 1, "IBAN_CODE": 1, "IP_ADDRESS": 1,
                                                    "PHONE_NUMBER": 1},
                                       "quarantined": {"CREDIT_CARD": 1, "EMAIL_ADDRESS": 3}}
    off, out2 = _ingest(tmp_path / "off", [DataSource(path=str(src))], pii=PiiConfig(enabled=False))
    assert "jane.doe@example.com" in (out2 / "sft.jsonl").read_text() and off["pii"]["texts_seen"] == 0


def test_near_duplicates_and_eval_leaks(tmp_path: Path) -> None:
    base = "Hello, I ordered a blue kettle three weeks ago and it still has not arrived, can you check the courier"
    src = _jsonl(tmp_path / "n.jsonl", [
        {"id": "n1", "prompt": base + "?", "response": "shipping"},
        {"id": "n2", "prompt": base.replace("Hello", "Hi") + "??", "response": "shipping"},  # near duplicate
        {"id": "n3", "prompt": "My invoice shows a charge for an item I returned last month.", "response": "billing"},
        {"id": "n4", "prompt": "Could you please tell me the capital city of France, in one word?",
         "response": "Paris"},
        {"id": "n5", "prompt": "Something completely different about passwords.", "response": "account"},
    ])
    evals = [{"id": "e1", "prompt": "Could you please tell me the capital city of France in one word",
              "response": "Paris"}]
    rep, out = _ingest(tmp_path, [DataSource(path=str(src))], evals=evals)
    reasons = {r["record"]["id"]: r["reason"] for r in _read(out / "quarantine.jsonl")}
    assert reasons["n2"].startswith("near duplicate of n1 (jaccard 0.")
    assert reasons["n4"].startswith("eval leak (near duplicate): prompt resembles held-out eval record e1")
    assert rep["per_reason"] == {"near duplicate": 1, "eval leak (near duplicate)": 1}
    assert rep["dedup"]["near_duplicates"] == 1 and rep["dedup"]["eval_leaks_near"] == 1
    assert [r["id"] for r in _read(out / "sft.jsonl")] == ["n1", "n3", "n5"]
    off, _ = _ingest(tmp_path / "off", [DataSource(path=str(src))], evals=evals,
                     dedup=DedupConfig(near_threshold=0))
    assert off["quarantined"] == 0


def test_short_texts_get_exact_dedup_only(tmp_path: Path) -> None:
    """'opposite of wet' and 'opposite of win' share most 5-grams but are different questions."""
    src = _jsonl(tmp_path / "s.jsonl", [{"id": "s1", "prompt": "What is the opposite of wet?", "response": "Dry"},
                                        {"id": "s2", "prompt": "What is the opposite of wit?", "response": "Dull"}])
    rep, _ = _ingest(tmp_path, [DataSource(path=str(src))],
                     evals=[{"id": "e1", "prompt": "What is the opposite of win?", "response": "Lose"}])
    assert rep["quarantined"] == 0
    rep, _ = _ingest(tmp_path / "strict", [DataSource(path=str(src))], dedup=DedupConfig(min_chars=0),
                     evals=[{"id": "e1", "prompt": "What is the opposite of win?", "response": "Lose"}])
    assert rep["per_reason"].get("eval leak (near duplicate)", 0) + rep["per_reason"].get("near duplicate", 0) >= 1


# -- replay ----------------------------------------------------------------------------------------
def _champion_file(tmp: Path, n: int) -> Path:
    rows = [{"id": f"old-{i}", "slice": "general_qa", "source": "old.jsonl", "prompt": "<rendered>",
             "completion": "x", "user_text": f"Old question number {i} about topic {i * 7 % 13}",
             "response": f"answer {i}", "turns": [{"role": "user", "content": f"Old question number {i} about "
                                                                            f"topic {i * 7 % 13}"}]}
            for i in range(n)]
    rows[0]["turns"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": rows[0]["user_text"]}]
    return _jsonl(tmp / "champ" / "sft.jsonl", rows)


def test_replay_mixes_the_configured_share(tmp_path: Path) -> None:
    champ = ChampionData("3", "run", _champion_file(tmp_path, 200))
    new = _jsonl(tmp_path / "new.jsonl", [{"id": f"new-{i}", "prompt": f"Brand new ticket {i} text, version {i}",
                                           "response": "billing"} for i in range(60)])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"id": "e1", "prompt": "Old question number 5 about topic 9",
                                         "response": "x"}])
    cfg = DataConfig(sources=[DataSource(path=str(new))], eval=[DataSource(path=str(ev))], replay_share=0.25,
                     dedup=DedupConfig(near_threshold=0))
    rep = ingest(cfg, None, tmp_path / "o", champion=champ)
    _adds_up(rep)
    r = rep["replay"]
    assert r["champion_version"] == "3" and r["pool"] == 200 and r["requested"] == 20 and r["read"] == 20
    sft = _read(tmp_path / "o" / "sft.jsonl")
    replayed = [x for x in sft if x["source"] == "replay:v3"]
    assert len(replayed) == r["accepted"] and r["accepted"] + (r["read"] - r["accepted"]) == 20
    assert r["actual_share"] == round(r["accepted"] / (60 + r["accepted"]), 4)
    assert rep["by_kind"]["sft"]["per_source"]["replay:v3"] == r["accepted"]
    # deterministic, and the same ids as sample_records picks
    picked = [x["id"] for x in sample_records(champ.sft, 20)]
    assert [x["id"] for x in replayed] == [i for i in picked if i != "old-5"]
    again = ingest(cfg, None, tmp_path / "o2", champion=champ)
    assert again["data_hash"] == rep["data_hash"]
    if "old-0" in picked:  # multi-turn records keep their turns
        assert next(x for x in replayed if x["id"] == "old-0")["turns"][0]["role"] == "system"
    leaks = [q for q in _read(tmp_path / "o" / "quarantine.jsonl") if q["source"] == "replay:v3"]
    assert all("eval leak" in q["reason"] for q in leaks)  # replayed data is checked against today's eval set
    assert sum(r["per_reason"].values()) == r["read"] - r["accepted"]


def test_replayed_duplicates_do_not_count_against_the_new_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Replaying the champion's data over the same new files: every replayed record is already there;
    that is no sign of bad input, so the quarantine and duplicate shares leave them out."""
    from tuneloop.config import load_config
    from tuneloop.data.validate import _ingest_checks
    from tuneloop.tiny import tiny_run_config

    cfg = load_config(tiny_run_config(tmp_path, tiny_model_dir, data__replay_share=0.5))
    first = ingest(cfg.data, None, tmp_path / "one")
    champ = ChampionData("1", "run", tmp_path / "one" / "sft.jsonl")
    rep = ingest(cfg.data, None, tmp_path / "two", champion=champ)
    assert rep["replay"]["read"] == first["by_kind"]["sft"]["accepted"] and rep["replay"]["accepted"] == 0
    assert rep["replay"]["per_reason"] == {"exact duplicate": rep["replay"]["read"]}
    checks = {c["expectation"]: c for c in _ingest_checks(cfg, rep, {})}
    assert checks["quarantined_share_at_most"]["passed"] and checks["duplicate_share_at_most"]["passed"]
    assert checks["duplicate_share_at_most"]["observed"].startswith("0.000 (0 exact, 0 near")


def test_replay_without_champion_or_share(tmp_path: Path) -> None:
    new = _jsonl(tmp_path / "new.jsonl", [{"prompt": "q", "response": "a"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"prompt": "e", "response": "a"}])
    rep = ingest(DataConfig(sources=[DataSource(path=str(new))], eval=[DataSource(path=str(ev))], replay_share=0.3),
                 None, tmp_path / "o", champion=None)
    assert rep["replay"]["accepted"] == 0 and rep["replay"]["note"] == "no champion yet: nothing to replay"
    champ = ChampionData("1", "run", _champion_file(tmp_path, 5))
    rep = ingest(DataConfig(sources=[DataSource(path=str(new))], eval=[DataSource(path=str(ev))]), None,
                 tmp_path / "o2", champion=champ)
    assert rep["replay"]["note"].startswith("replay is off")
    many = _jsonl(tmp_path / "many.jsonl", [{"prompt": f"q{i}", "response": "a"} for i in range(30)])
    rep = ingest(DataConfig(sources=[DataSource(path=str(many))], eval=[DataSource(path=str(ev))], replay_share=0.5),
                 None, tmp_path / "o3", champion=champ)
    assert rep["replay"]["requested"] == 5 and "holds only 5 records (30 wanted)" in rep["replay"]["note"]


# -- tuneloop ingest ---------------------------------------------------------------------------
@pytest.fixture()
def cli_inputs(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "in"
    _jsonl(d / "a.jsonl", [{"id": "a1", "prompt": "Where is my parcel? mail me at x@y.com", "response": "shipping"},
                           '{"broken',
                           {"id": "a3", "prompt": "Which queue?", "chosen": "billing", "rejected": "no idea"}])
    (d / "b.csv").write_text("id,prompt,response\nb1,Invoice is wrong,billing\nb2,Invoice is wrong,billing\n")
    return {"dir": d, "a": d / "a.jsonl", "b": d / "b.csv"}


def test_cli_ingest_writes_the_three_files(cli_inputs: dict[str, Path], tmp_path: Path) -> None:
    from tuneloop.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["ingest", str(cli_inputs["a"]), str(cli_inputs["b"]), "--out", str(out),
                                       "--max-quarantine-share", "1"])
    assert res.exit_code == 0, res.output
    assert "read 5, accepted 3, quarantined 2" in res.output
    acc = _read(out / "accepted.jsonl")
    assert [(r["kind"], r["id"]) for r in acc] == [("sft", "a1"), ("preference", "a3"), ("sft", "b1")]
    assert acc[0]["user_text"] == "Where is my parcel? mail me at <EMAIL_ADDRESS>" and "prompt" not in acc[2]
    q = _read(out / "quarantine.jsonl")
    assert [(x["row"], x["reason"]) for x in q] == [(2, q[0]["reason"]), (3, "exact duplicate of b1")]
    assert q[0]["record"] == '{"broken' and q[0]["reason"].startswith("malformed JSON")
    rep = json.loads((out / "report.json").read_text())
    assert (rep["read"], rep["accepted"], rep["quarantined"]) == (5, 3, 2)
    assert rep["per_reason"] == {"malformed JSON": 1, "exact duplicate": 1}
    assert rep["pii"]["entities"] == {"EMAIL_ADDRESS": 1} and rep["chat_formatted"] is False


def test_cli_ingest_with_tokenizer_template_and_eval(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneloop.cli import app

    src = _jsonl(tmp_path / "t.jsonl", [{"text": "My card was charged twice", "label": "billing"},
                                        {"text": "Where is my parcel", "label": "shipping"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"id": "e1", "prompt": "Route this ticket: Where is my parcel",
                                         "response": "shipping"}])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--max-quarantine-share", "1",
                                 "--template", "Route this ticket: {text}",
                                   "--tokenizer", str(tiny_model_dir), "--eval", str(ev), "--slice", "tickets"])
    assert res.exit_code == 0, res.output
    (acc,) = _read(out / "accepted.jsonl")
    assert acc["prompt"].endswith("<|im_start|>assistant\n") and acc["completion"] == "billing<|im_end|>"
    assert acc["slice"] == "tickets"
    (q,) = _read(out / "quarantine.jsonl")
    assert q["reason"].startswith("eval leak: prompt is held-out eval record e1")
    assert _read(out / "eval.jsonl")[0]["id"] == "e1"


@pytest.mark.parametrize("case", ["missing", "txt", "bad_parquet", "template"])
def test_cli_ingest_errors_are_one_line(cli_inputs: dict[str, Path], tmp_path: Path, case: str) -> None:
    from tuneloop.cli import app

    (tmp_path / "x.txt").write_text("hello\n")
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    argv, message = {
        "missing": ([str(tmp_path / "nope.jsonl")], f"{tmp_path / 'nope.jsonl'}: no such file or folder"),
        "txt": ([str(tmp_path / "x.txt")], "cannot tell the format from the extension '.txt'"),
        "bad_parquet": ([str(tmp_path / "bad.parquet")], "bad.parquet: not a readable Parquet file"),
        "template": ([str(cli_inputs["a"]), "--template", "{x!r}"], "use plain {field} placeholders"),
    }[case]
    res = CliRunner().invoke(app, ["ingest", *argv, "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert message in lines[0]


def test_cli_ingest_every_flag_has_help() -> None:
    import typer.main

    from tuneloop.cli import app

    cmd = typer.main.get_command(app).commands["ingest"]
    assert len(cmd.params) >= 13
    for p in cmd.params:
        assert p.help and len(p.help) > 15, p.name  # every flag and the argument explain themselves


# -- validate_data's suite -------------------------------------------------------------------------
def test_validation_suite_on_ingested_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from tuneloop.config import load_config
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.data.validate import validate_dataset
    from tuneloop.tiny import tiny_run_config

    cfg = load_config(tiny_run_config(tmp_path, tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ingest(cfg.data, ChatFormatter(tok), tmp_path / "ds")
    rep = validate_dataset(cfg, tmp_path / "ds", tok, tmp_path / "v")
    assert rep["passed"], rep["failed"]
    checks = {(c["table"], c["expectation"], c["column"]) for c in rep["checks"]}
    for want in [("sft", "expect_column_values_to_be_between", "pii_residue"),
                 ("sft", "expect_column_values_to_be_unique", "content_key"),
                 ("sft", "expect_column_values_to_match_regex", "roles"),
                 ("sft", "expect_column_values_to_be_between", "min_turn_chars"),
                 ("sft", "expect_column_values_to_be_between", "completion_seq_tokens"),
                 ("preference", "expect_column_values_to_be_between", "chosen_seq_tokens"),
                 ("eval", "expect_column_distinct_values_to_contain_set", "slice"),
                 ("ingest", "duplicate_share_at_most", ""), ("ingest", "quarantined_share_at_most", ""),
                 ("sft", "slice_records_at_least", "slice")]:
        assert want in checks, want
    cover = next(c for c in rep["checks"] if c["expectation"] == "slice_records_at_least")
    assert cover["observed"] == "general_qa 12, ticket_routing 24 (min 0)"
    # PII that got past ingest (scrubbing off there) is caught as residue; thin slices fail coverage
    cfg.data.pii.enabled = False
    ingest(cfg.data, ChatFormatter(tok), tmp_path / "ds2")
    with open(tmp_path / "ds2" / "sft.jsonl", "a") as f:
        f.write(json.dumps({"id": "leaky", "slice": "general_qa", "user_text": "Mail me at a@b.com",
                            "response": "ok", "turns": [{"role": "user", "content": "Mail me at a@b.com"}],
                            "prompt": "p", "completion": "ok<|im_end|>"}) + "\n")
    cfg.data.pii.enabled = True
    cfg.data.min_slice_records = 20
    rep = validate_dataset(cfg, tmp_path / "ds2", tok, tmp_path / "v2")
    failed = {(c["table"], c["column"]) for c in rep["failed"]}
    assert ("sft", "pii_residue") in failed and ("sft", "slice") in failed and not rep["passed"]
    assert "too few: general_qa" in next(c["observed"] for c in rep["failed"] if c["column"] == "slice")
    why = {c["column"]: c for c in rep["failed"]}  # every failure in words, with the records and the key
    assert why["pii_residue"]["config_key"] == "data.pii.entities"
    assert why["pii_residue"]["message"].startswith("1 of ")
    assert "(e.g. leaky (2 PII findings))" in why["pii_residue"]["message"]
    assert why["slice"]["config_key"] == "data.min_slice_records"
    assert why["slice"]["message"] == ("evaluated slices with fewer training records than data.min_slice_records "
                                       "(20): general_qa (13); add records for them to data.sources or lower "
                                       "data.min_slice_records")
    assert "- **sft**: " + why["slice"]["message"] in (tmp_path / "v2" / "report.md").read_text()
    assert "**FAIL**" in (tmp_path / "v2" / "report.md").read_text()


def test_validation_without_tokenizer_skips_token_checks(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneloop.config import load_config
    from tuneloop.data.validate import validate_dataset
    from tuneloop.tiny import tiny_run_config

    cfg = load_config(tiny_run_config(tmp_path, tiny_model_dir))
    ingest(cfg.data, None, tmp_path / "ds")
    rep = validate_dataset(cfg, tmp_path / "ds", None, tmp_path / "v")
    assert rep["passed"], rep["failed"]
    assert not any("seq_tokens" in c["column"] or c["column"] == "prompt_chars" for c in rep["checks"])
