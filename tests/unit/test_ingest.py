"""Ingest over a corpus of bad inputs: every record is accepted or quarantined with its reason,
counts add up, accepted records are rendered with the model's chat template. Also the feedback
store and its conversion into training data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuneloop.config import DataConfig, DataSource
from tuneloop.data import readers
from tuneloop.data.formatting import ChatFormatter
from tuneloop.data.ingest import ingest
from tuneloop.data.feedback import feedback_to_training
from tuneloop.feedback.store import FeedbackStore

from conftest import read_jsonl as _read  # noqa: E402
from conftest import write_jsonl as _jsonl  # noqa: E402

pytestmark = pytest.mark.unit

ASSISTANT = "<|im_start|>assistant\n"
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tok.eos_token == EOS
    return tok


@pytest.fixture()
def formatter(tokenizer: Any) -> ChatFormatter:
    return ChatFormatter(tokenizer)



@pytest.fixture()
def corpus(tmp_path: Path) -> dict[str, Path]:
    """A folder of sources where almost every record is broken in its own way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    _jsonl(d / "eval" / "eval.jsonl", [
        {"id": "e1", "prompt": "What is the capital of France?", "response": "Paris", "slice": "general_qa"},
        {"id": "e2", "prompt": "My card was charged twice.", "response": "billing", "slice": "ticket_routing"},
    ])
    _jsonl(d / "train.jsonl", [
        {"id": "t1", "prompt": "Where is my parcel?", "response": "shipping", "slice": "ticket_routing"},  # row 1 ok
        '{"id": "t2", "prompt": "I was charged tw',  # row 2: truncated line
        b'{"id": "t3", "prompt": "caf\xe9 order", "response": "billing"}',  # row 3: latin-1 byte
        "[1, 2, 3]",  # row 4: not an object
        {"id": "t5", "prompt": "  \t  ", "response": "billing"},  # row 5: whitespace prompt
        {"id": "t6", "prompt": "Please refund me"},  # row 6: no response
        {"id": "t7", "prompt": 42, "response": "billing"},  # row 7: int prompt
        {"id": "t1", "prompt": "Completely different question", "response": "account"},  # row 8: duplicate id
        {"id": "t9", "prompt": "  WHERE is   my PARCEL? ", "response": " Shipping"},  # row 9: exact duplicate
        {"id": "t10", "prompt": "what is the capital of  FRANCE?", "response": "Paris."},  # row 10: eval leak
        {"id": "t11", "prompt": "x" * (readers.MAX_LINE_BYTES + 10), "response": "y"},  # row 11: oversized
        {"id": "t12", "messages": [{"role": "system", "content": "Be brief."},  # row 12: valid chat record
                                   {"role": "user", "content": "Hi, how do I reset my password?"},
                                   {"role": "assistant", "content": "account"}], "slice": "ticket_routing"},
        {"id": "t13", "messages": [{"role": "robot", "content": "beep"},  # row 13: bad role
                                   {"role": "assistant", "content": "boop"}]},
        {"id": "t14", "messages": [{"role": "user", "content": "hello"},  # row 14: ends on the user
                                   {"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]},
        "",  # blank lines are not records
        {"id": "t16", "prompt": "The app crashes when I open settings", "response": "technical"},  # row 16 ok
    ])
    (d / "empty.jsonl").write_bytes(b"")
    (d / "nocol.csv").write_text("id,prompt\nc1,How do I change my address?\nc2,Where is my invoice?\n")
    (d / "good.csv").write_text("id,prompt,response,slice\n"
                                "g1,\"Hello, my order is late\",shipping,ticket_routing\n"
                                "g2,Too,many,fields,here\n")
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "prompt": [1, 2, 3],
                             "response": ["billing", None, "account"]}), d / "typed.parquet")
    pq.write_table(pa.table({"id": ["p4"], "prompt": ["Parquet rows work too"], "response": ["technical"]}),
                   d / "ok.parquet")
    _jsonl(d / "prefs.jsonl", [
        {"id": "pp1", "prompt": "My package is lost", "chosen": "shipping", "rejected": "Call the police."},
        {"id": "pp2", "prompt": "Which queue?", "chosen": "billing", "rejected": "  billing "},
        {"id": "pp3", "prompt": "Which queue now?", "chosen": "account"},
        {"id": "pp4", "prompt": "Which queue, exactly?", "chosen": "Billing", "rejected": "billing"},  # formatting
    ])
    return {"dir": d, "train": d / "train.jsonl", "empty": d / "empty.jsonl", "nocol": d / "nocol.csv",
            "good_csv": d / "good.csv", "typed": d / "typed.parquet", "ok_parquet": d / "ok.parquet",
            "prefs": d / "prefs.jsonl", "eval": d / "eval"}


def _cfg(c: dict[str, Path], **kw: Any) -> DataConfig:
    sft = [DataSource(path=str(c[k])) for k in ("train", "empty", "nocol", "good_csv", "typed", "ok_parquet")]
    return DataConfig(sources=[*sft, DataSource(path=str(c["prefs"]), kind="preference")],
                      eval=[DataSource(path=str(c["eval"]))], **kw)


@pytest.fixture()
def result(corpus: dict[str, Path], formatter: ChatFormatter, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "out"
    report = ingest(_cfg(corpus), formatter, out)
    return {"report": report, "out": out, "corpus": corpus,
            "quarantine": _read(out / "quarantine.jsonl"), "sft": _read(out / "sft.jsonl"),
            "pref": _read(out / "preference.jsonl"), "eval": _read(out / "eval.jsonl")}


def _q(result: dict[str, Any], file: str, row: int) -> dict[str, Any]:
    hits = [q for q in result["quarantine"] if Path(q["source"]).name == file and q["row"] == row]
    assert len(hits) == 1, f"{file} row {row}: expected one quarantine entry, got {hits}"
    return hits[0]


@pytest.mark.parametrize("row,needles", [
    (2, ["malformed JSON", "Unterminated string"]),
    (3, ["invalid UTF-8"]),
    (4, ["JSON object", "list"]),
    (5, ["`prompt`", "empty or whitespace"]),
    (6, ["missing field `response`"]),
    (7, ["`prompt`", "must be a string", "int"]),
    (8, ["`id`", "duplicate id 't1'"]),
    (9, ["exact duplicate of t1"]),
    (10, ["eval leak", "e1"]),
    (11, ["oversized line"]),
    (13, ["messages[0].role"]),
    (14, ["messages", "last turn must be the assistant"]),
])
def test_bad_jsonl_records_quarantined_with_reason(result: dict[str, Any], row: int, needles: list[str]) -> None:
    q = _q(result, "train.jsonl", row)
    assert q["kind"] == "sft"
    for n in needles:
        assert n in q["reason"], (n, q["reason"])


def test_unparseable_lines_keep_their_raw_text(result: dict[str, Any]) -> None:
    assert _q(result, "train.jsonl", 2)["record"] == '{"id": "t2", "prompt": "I was charged tw'
    assert "caf" in _q(result, "train.jsonl", 3)["record"]
    assert len(_q(result, "train.jsonl", 11)["record"]) <= 200  # oversized lines are not copied whole
    assert _q(result, "train.jsonl", 7)["record"] == {"id": "t7", "prompt": 42, "response": "billing"}


def test_csv_missing_column_and_extra_fields(result: dict[str, Any]) -> None:
    for row in (2, 3):
        assert "missing field `response`" in _q(result, "nocol.csv", row)["reason"]
    assert "more fields than the header" in _q(result, "good.csv", 3)["reason"]
    assert "g1" in {r["id"] for r in result["sft"]}


def test_parquet_wrong_types(result: dict[str, Any]) -> None:
    for row in (1, 2, 3):
        q = _q(result, "typed.parquet", row)
        assert "`prompt`" in q["reason"] and "must be a string" in q["reason"], q
    assert "p4" in {r["id"] for r in result["sft"]}


def test_preference_problems(result: dict[str, Any]) -> None:
    assert "are the same answer" in _q(result, "prefs.jsonl", 2)["reason"]
    assert _q(result, "prefs.jsonl", 2)["kind"] == "preference"
    assert "missing field `rejected`" in _q(result, "prefs.jsonl", 3)["reason"]
    assert [p["id"] for p in result["pref"]] == ["pp1", "pp4"]


def test_exactly_the_good_records_are_accepted(result: dict[str, Any]) -> None:
    assert [r["id"] for r in result["sft"]] == ["t1", "t12", "t16", "g1", "p4"]
    assert [r["id"] for r in result["eval"]] == ["e1", "e2"]
    quarantined = {(Path(q["source"]).name, q["row"]) for q in result["quarantine"]}
    assert quarantined == {("train.jsonl", r) for r in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14)} | {
        ("nocol.csv", 2), ("nocol.csv", 3), ("good.csv", 3), ("typed.parquet", 1), ("typed.parquet", 2),
        ("typed.parquet", 3), ("prefs.jsonl", 2), ("prefs.jsonl", 3)}


def test_report_counts_add_up(result: dict[str, Any]) -> None:
    rep = result["report"]
    assert rep == json.loads((result["out"] / "report.json").read_text())
    assert rep["read"] == rep["accepted"] + rep["quarantined"]
    assert rep["quarantined"] == len(result["quarantine"]) == 20
    assert rep["accepted"] == len(result["sft"]) + len(result["pref"]) + len(result["eval"]) == 9
    assert sum(rep["per_reason"].values()) == rep["quarantined"]
    for kind, c in rep["by_kind"].items():
        assert c["read"] == c["accepted"] + c["quarantined"], kind
        assert sum(c["per_reason"].values()) == c["quarantined"], kind
        assert sum(c["per_slice"].values()) == c["accepted"], kind
        assert sum(c["per_source"].values()) == c["accepted"], kind
    assert rep["by_kind"]["sft"]["read"] == 15 + 2 + 2 + 3 + 1  # train (no blank line), csvs, parquets
    assert rep["by_kind"]["preference"] == {**rep["by_kind"]["preference"], "read": 4, "accepted": 2,
                                            "quarantined": 2}
    assert rep["by_kind"]["eval"]["per_slice"] == {"general_qa": 1, "ticket_routing": 1}
    assert rep["by_kind"]["sft"]["per_source"] == {"train.jsonl": 3, "good.csv": 1, "ok.parquet": 1}
    assert rep["per_reason"]["eval leak"] == 1
    assert rep["per_reason"]["exact duplicate"] == 1  # grouped, not one key per duplicated id
    assert rep["per_reason"]["malformed JSON"] == 1 and rep["per_reason"]["oversized line"] == 1
    assert rep["per_reason"]["missing field `response`"] == 3  # row 6 and the two CSV rows
    assert rep["feedback"] == {"rows": 0, "sft": 0, "preference": 0, "no_pair_empty_output": 0,
                              "corrections_trusted": 0, "corrections_untrusted": 0}


def test_accepted_records_are_rendered_with_the_chat_template(result: dict[str, Any]) -> None:
    for r in [*result["sft"], *result["eval"]]:
        assert r["prompt"].startswith("<|im_start|>")
        assert r["prompt"].endswith(ASSISTANT), r["prompt"]
        assert r["user_text"] in r["prompt"]
        assert r["completion"] == r["response"] + EOS
    for p in result["pref"]:
        assert p["prompt"].endswith(ASSISTANT)
        assert p["chosen"].endswith(EOS) and p["rejected"].endswith(EOS)
    by_id = {r["id"]: r for r in result["sft"]}
    t12 = by_id["t12"]
    assert t12["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                             "Hi, how do I reset my password?<|im_end|>\n" + ASSISTANT)
    assert t12["user_text"] == "Hi, how do I reset my password?" and t12["response"] == "account"
    assert by_id["t1"]["slice"] == "ticket_routing" and by_id["g1"]["slice"] == "ticket_routing"
    assert by_id["t16"]["slice"] == "default"


def test_output_is_deterministic(corpus: dict[str, Path], formatter: ChatFormatter, tmp_path: Path) -> None:
    a = ingest(_cfg(corpus), formatter, tmp_path / "a")
    b = ingest(_cfg(corpus), formatter, tmp_path / "b")
    assert a["data_hash"] == b["data_hash"] and a["file_sha256"] == b["file_sha256"]


def test_system_prompt_and_length_limits(corpus: dict[str, Path], tokenizer: Any, tmp_path: Path) -> None:
    cfg = _cfg(corpus, system_prompt="You route tickets.", max_prompt_chars=25)
    rep = ingest(cfg, ChatFormatter(tokenizer, cfg.system_prompt), tmp_path / "o")
    sft = {r["id"]: r for r in _read(tmp_path / "o" / "sft.jsonl")}
    assert sft["t1"]["prompt"].startswith("<|im_start|>system\nYou route tickets.<|im_end|>")
    # a conversation with its own system turn keeps it
    assert "Be brief." in sft["t12"]["prompt"] and "You route tickets." not in sft["t12"]["prompt"]
    assert "t16" not in sft  # 36 characters > 25
    q = [q for q in _read(tmp_path / "o" / "quarantine.jsonl") if q["row"] == 16]
    assert len(q) == 1 and "field `prompt` is too long (36 > 25" in q[0]["reason"]
    assert rep["per_reason"]["field `prompt` is too long"] >= 1


def test_records_without_ids_get_content_ids_and_duplicates_are_named(formatter: ChatFormatter,
                                                                      tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "noid.jsonl", [
        {"prompt": "Where is my parcel?", "response": "shipping"},
        {"prompt": "where IS my  parcel?", "response": "Shipping"},
        {"prompt": "Is my parcel late?", "response": "shipping"},
    ])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"prompt": "Unrelated eval prompt", "response": "x"}])
    rep = ingest(DataConfig(sources=[DataSource(path=str(src))], eval=[DataSource(path=str(ev))]), formatter,
                 tmp_path / "o")
    sft = _read(tmp_path / "o" / "sft.jsonl")
    assert [r["user_text"] for r in sft] == ["Where is my parcel?", "Is my parcel late?"]
    assert all(r["id"].startswith("h-") for r in sft) and sft[0]["id"] != sft[1]["id"]
    (q,) = _read(tmp_path / "o" / "quarantine.jsonl")
    assert q["row"] == 2 and q["reason"] == f"exact duplicate of {sft[0]['id']}"
    assert rep["per_reason"] == {"exact duplicate": 1} and rep["quarantined"] == 1


def test_empty_file_contributes_nothing(formatter: ChatFormatter, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    assert list(readers.read_records(str(empty))) == []
    ev = _jsonl(tmp_path / "ev.jsonl", [{"prompt": "Eval prompt", "response": "x"}])
    rep = ingest(DataConfig(sources=[DataSource(path=str(empty))], eval=[DataSource(path=str(ev))]), formatter,
                 tmp_path / "o")
    assert rep["by_kind"]["sft"]["read"] == 0 and rep["read"] == 1 and rep["accepted"] == 1


def test_folder_source_reads_every_supported_file_in_order(corpus: dict[str, Path]) -> None:
    paths = [f for f, _ in readers.expand(str(corpus["dir"]))]
    assert paths == sorted(paths)  # reproducible order
    assert str(corpus["dir"] / "eval" / "eval.jsonl") in paths  # folders are read recursively
    files = [Path(f).name for f in paths]
    assert set(files) >= {"train.jsonl", "empty.jsonl", "nocol.csv", "good.csv", "typed.parquet", "prefs.jsonl"}
    kinds = dict((Path(f).name, k) for f, k in readers.expand(str(corpus["dir"])))
    assert kinds["typed.parquet"] == "parquet" and kinds["good.csv"] == "csv" and kinds["train.jsonl"] == "jsonl"


def test_missing_source_raises_source_error(formatter: ChatFormatter, tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not" / "exist.jsonl"
    with pytest.raises(readers.SourceError, match=str(missing)):
        list(readers.read_records(str(missing)))
    ev = _jsonl(tmp_path / "ev.jsonl", [{"prompt": "Eval prompt", "response": "x"}])
    with pytest.raises(readers.SourceError, match="no such file or folder"):
        ingest(DataConfig(sources=[DataSource(path=str(missing))], eval=[DataSource(path=str(ev))]), formatter,
               tmp_path / "o")


def test_unknown_extension_and_empty_folder_raise(tmp_path: Path) -> None:
    txt = tmp_path / "data.txt"
    txt.write_text("hello\n")
    with pytest.raises(readers.SourceError, match=r"data\.txt.*format"):
        readers.expand(str(txt))
    assert readers.expand(str(txt), "jsonl") == [(str(txt), "jsonl")]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(readers.SourceError, match="nothing"):
        readers.expand(str(tmp_path / "nothing"))


def test_non_utf8_csv_raises_source_error(tmp_path: Path) -> None:
    bad = tmp_path / "latin.csv"
    bad.write_bytes(b"prompt,response\ncaf\xe9,billing\n")
    with pytest.raises(readers.SourceError, match="latin.csv"):
        list(readers.read_records(str(bad)))


# -- the feedback store --
def _log(store: FeedbackStore, rid: str, prompt: str, output: str, **kw: Any) -> None:
    store.log_request(**{"request_id": rid, "user_id": "u", "model_version": "3", "variant": "champion",
                         "slice": "ticket_routing", "prompt": prompt, "output": output, "status": "ok",
                         "latency_ms": 12.5, **kw})


def test_feedback_store_round_trip(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "nested" / "feedback.db")
    _log(store, "r1", "Where is my parcel?", "billing")
    _log(store, "r2", "Where is my parcel?", "shipping", variant="canary", model_version="4")
    _log(store, "r3", "Unrated", "x", status="error")
    assert store.add_feedback("nope", score=1.0) is False
    assert store.add_feedback("r1", score=0.0, correction="shipping") is True
    assert store.add_feedback("r2", score=1.0) is True
    assert store.add_feedback("r2", score=0.5) is True
    rows = store.rows()
    assert [(r["request_id"], r["score"], r["correction"]) for r in rows] == [
        ("r1", 0.0, "shipping"), ("r2", 1.0, None), ("r2", 0.5, None)]
    assert rows[0]["prompt"] == "Where is my parcel?" and rows[0]["output"] == "billing"
    assert rows[1]["variant"] == "canary" and rows[1]["model_version"] == "4"
    reqs = {r["request_id"]: r for r in store.requests()}
    assert set(reqs) == {"r1", "r2", "r3"}
    assert reqs["r2"]["score"] == pytest.approx(0.75)  # mean of its feedback
    assert reqs["r3"]["score"] is None and reqs["r3"]["status"] == "error"
    assert reqs["r1"]["latency_ms"] == 12.5
    assert store.requests(since=reqs["r3"]["created"] + 1) == []
    assert store.served_by("r2") == ("4", "canary") and store.served_by("nope") is None
    # a second store on the same file sees the same data
    assert len(FeedbackStore(tmp_path / "nested" / "feedback.db").rows()) == 3


def _row(rid: str, prompt: str, output: str, score: float | None = None, correction: str | None = None,
         slice_: str = "ticket_routing") -> dict[str, Any]:
    return {"request_id": rid, "prompt": prompt, "output": output, "slice": slice_, "model_version": "7",
            "variant": "champion", "score": score, "correction": correction, "created": 0.0}


def test_feedback_to_training() -> None:
    rows = [
        _row("a", "Where is my parcel?", "billing", score=0.0, correction="shipping"),
        _row("b", "Where is my parcel?", "shipping", score=1.0),
        _row("c", "Why was I charged twice?", "billing", score=0.25),
        _row("d", "Why was I charged twice?", "technical", score=0.0),
        _row("e", "Reset my password", "account", correction=" account "),  # same answer: no pair
        _row("f", "What is 2+2?", "4", score=1.0, slice_=""),
    ]
    sft, pairs = feedback_to_training(rows)
    assert [(s["id"], s["prompt"], s["response"]) for s in sft] == [
        ("fb-a-sft", "Where is my parcel?", "shipping"), ("fb-e-sft", "Reset my password", "account")]
    assert all(s["slice"] == "ticket_routing" and s["model_version"] == "7" for s in sft)
    by_id = {p["id"]: p for p in pairs}
    assert by_id["fb-a-corr"]["chosen"] == "shipping" and by_id["fb-a-corr"]["rejected"] == "billing"
    assert by_id["fb-b-a"]["chosen"] == "shipping" and by_id["fb-b-a"]["rejected"] == "billing"
    assert by_id["fb-c-d"]["chosen"] == "billing" and by_id["fb-c-d"]["rejected"] == "technical"
    assert set(by_id) == {"fb-a-corr", "fb-b-a", "fb-c-d"}  # a lone rating makes no pair


def test_feedback_to_training_equal_scores_make_no_pair() -> None:
    _, pairs = feedback_to_training([_row("a", "q", "x", score=1.0), _row("b", "q", "y", score=1.0)])
    assert pairs == []


def test_ingest_adds_feedback(corpus: dict[str, Path], formatter: ChatFormatter, tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "fb.db")
    _log(store, "r1", "My refund has not arrived", "shipping")
    _log(store, "r2", "My refund has not arrived", "billing queue", variant="canary")
    _log(store, "r3", "What is the capital of France?", "Lyon")  # an eval prompt: must not leak
    store.add_feedback("r1", score=0.0, correction="billing")
    store.add_feedback("r2", score=1.0)
    store.add_feedback("r3", score=0.0, correction="Paris")
    rows = store.rows()
    rep = ingest(_cfg(corpus), formatter, tmp_path / "o", feedback_rows=rows)
    assert rep["feedback"] == {"rows": 3, "sft": 2, "preference": 3, "no_pair_empty_output": 0,
                               "corrections_trusted": 2, "corrections_untrusted": 0}
    assert rep["read"] == rep["accepted"] + rep["quarantined"]
    sft = [r for r in _read(tmp_path / "o" / "sft.jsonl") if r["source"] == "feedback-store"]
    assert [(r["id"], r["user_text"], r["response"]) for r in sft] == [
        ("fb-r1-sft", "My refund has not arrived", "billing")]
    assert sft[0]["completion"] == "billing" + EOS and sft[0]["prompt"].endswith(ASSISTANT)
    assert sft[0]["slice"] == "ticket_routing"
    prefs = {p["id"]: p for p in _read(tmp_path / "o" / "preference.jsonl") if p["source"] == "feedback-store"}
    assert set(prefs) == {"fb-r1-corr", "fb-r2-r1"}
    assert prefs["fb-r2-r1"]["chosen"] == "billing queue" + EOS and prefs["fb-r2-r1"]["rejected"] == "shipping" + EOS
    leaks = [q for q in _read(tmp_path / "o" / "quarantine.jsonl") if q["source"] == "feedback-store"]
    assert len(leaks) == 2 and all("eval leak" in q["reason"] for q in leaks)
    base = ingest(_cfg(corpus), formatter, tmp_path / "plain")
    assert rep["by_kind"]["sft"]["read"] == base["by_kind"]["sft"]["read"] + 2
    assert rep["by_kind"]["preference"]["read"] == base["by_kind"]["preference"]["read"] + 3
    assert rep["data_hash"] != base["data_hash"]



def test_feedback_on_an_empty_answer_makes_no_pair_and_is_counted() -> None:
    stats: dict[str, int] = {}
    rows = [_row("a", "q", "", score=0.0, correction="billing"), _row("b", "q", "", score=0.0),
            _row("c", "q2", "", score=0.0), _row("d", "q2", "shipping", score=1.0)]
    sft, pairs = feedback_to_training(rows, stats)
    assert [r["response"] for r in sft] == ["billing"]
    assert pairs == []
    assert stats["no_pair_empty_output"] == 2
