"""Records longer than the training max_length, handled by ingest before training
(`data.long_records`: quarantine | truncate_prompt), and the data gate's messages: what failed, for
which records and which config key changes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuneloop.config import DataConfig, DataSource, DedupConfig, DPOConfig, SFTConfig, TrainConfig
from tuneloop.data.formatting import ChatFormatter, count_tokens
from tuneloop.data.ingest import ingest

from conftest import read_jsonl as _read  # noqa: E402
from conftest import write_jsonl as _jsonl  # noqa: E402

pytestmark = pytest.mark.unit

EOS = "<|im_end|>"
# a long review: ~130 words, some hundreds of tokens for the tiny tokenizer
LONG = ("We booked this hotel for a week in August and I have to say the first impression was not good at "
        "all. The lobby smelled of smoke, the lift was broken for three days and nobody told us when it would "
        "be fixed. Our room faced the main road, so the traffic noise started at five in the morning and never "
        "really stopped. The bathroom had mould around the shower and the towels were changed only twice. "
        "Breakfast was the same every day: cold eggs, dry bread and coffee that tasted burnt. When we asked to "
        "change rooms the manager said the hotel was full, yet the website showed free rooms that very evening. "
        "On the last day they charged us for a minibar we never opened and it took an hour to get the money "
        "back. The final straw was the checkout queue that took forty minutes.")
TEMPLATE = "Classify this review: {text}\nAnswer positive or negative."


@pytest.fixture(scope="module")
def fmt(tiny_model_dir: Path) -> ChatFormatter:
    from transformers import AutoTokenizer

    return ChatFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)))


def _train(sft: int = 64, dpo: int = 64, dpo_enabled: bool = True) -> TrainConfig:
    return TrainConfig(sft=SFTConfig(max_length=sft), dpo=DPOConfig(max_length=dpo, enabled=dpo_enabled))


def _run(tmp: Path, fmt: ChatFormatter, sources: list[DataSource], policy: str, train: TrainConfig
         ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    ev = _jsonl(tmp / "ev.jsonl", [{"id": "e1", "prompt": "An unrelated eval prompt", "response": "x"}])
    cfg = DataConfig(sources=sources, eval=[DataSource(path=str(ev))], long_records=policy,
                     dedup=DedupConfig(near_threshold=0))
    rep = ingest(cfg, fmt, tmp / "out", train=train)
    assert rep["read"] == rep["accepted"] + rep["quarantined"]
    q = {r["record"]["id"]: r for r in _read(tmp / "out" / "quarantine.jsonl")}
    acc = {r["id"]: r for r in _read(tmp / "out" / "sft.jsonl") + _read(tmp / "out" / "preference.jsonl")}
    return rep, q, acc


def _tokens(fmt: ChatFormatter, r: dict[str, Any], answer: str = "completion") -> int:
    return count_tokens(fmt.tokenizer, [r["prompt"] + r[answer]])[0]


def test_quarantine_policy_names_the_key_to_raise(tmp_path: Path, fmt: ChatFormatter) -> None:
    src = _jsonl(tmp_path / "reviews.jsonl", [{"id": "short", "prompt": "Was the room clean?", "response": "yes"},
                                              {"id": "long", "prompt": LONG, "response": "negative"}])
    rep, q, acc = _run(tmp_path, fmt, [DataSource(path=str(src))], "quarantine", _train())
    assert set(acc) == {"short"} and set(q) == {"long"}
    n = fmt.seq_tokens([{"role": "user", "content": LONG}], [fmt.completion("negative")])
    assert n > 64
    assert q["long"]["reason"] == (f"too long for training: {n} tokens > train.sft.max_length 64 (raise "
                                   "train.sft.max_length, or set data.long_records: truncate_prompt to cut the prompt)")
    assert rep["per_reason"] == {"too long for training": 1}
    assert rep["long_records"] == {"policy": "quarantine", "max_length": {"sft": 64, "preference": 64},
                                   "truncated": 0, "quarantined": 1,
                                   "per_source": {"reviews.jsonl": {"truncated": 0, "quarantined": 1}},
                                   "examples": {"truncated": [], "quarantined": ["long"]}}
    assert _tokens(fmt, acc["short"]) <= 64


def test_truncate_prompt_keeps_the_label_and_the_instruction(tmp_path: Path, fmt: ChatFormatter) -> None:
    src = _jsonl(tmp_path / "tickets.jsonl", [
        {"id": "c1", "text": LONG, "label": "negative"},
        {"id": "c2", "text": "Lovely stay, friendly staff.", "label": "positive"}])
    source = DataSource(path=str(src), kind="classification", template=TEMPLATE)
    rep, q, acc = _run(tmp_path, fmt, [source], "truncate_prompt", _train(sft=96))
    assert not q
    c1 = acc["c1"]
    assert c1["response"] == "negative" and c1["completion"] == "negative" + EOS  # the label survives
    assert c1["user_text"].startswith("Classify this review: ")  # the instruction too
    assert c1["user_text"].endswith("forty minutes.\nAnswer positive or negative.")  # the review's end is kept
    assert "We booked this hotel" not in c1["user_text"]  # its start was cut
    kept = c1["user_text"][len("Classify this review: "):-len("\nAnswer positive or negative.")]
    assert LONG.endswith(kept) and LONG[-len(kept) - 1] == " "  # cut at a word boundary
    assert c1["turns"] == [{"role": "user", "content": c1["user_text"]}]
    assert 64 < _tokens(fmt, c1) <= 96  # it fits, and not by cutting much more than needed
    assert acc["c2"]["user_text"] == "Classify this review: Lovely stay, friendly staff.\nAnswer positive or negative."
    assert rep["long_records"]["truncated"] == 1 and rep["long_records"]["examples"]["truncated"] == ["c1"]
    assert rep["quarantined"] == 0


def test_truncate_prompt_drops_old_turns_first_and_quarantines_a_too_long_answer(tmp_path: Path,
                                                                                 fmt: ChatFormatter) -> None:
    src = _jsonl(tmp_path / "chat.jsonl", [
        {"id": "m1", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": LONG},
                                  {"role": "assistant", "content": "That sounds awful."},
                                  {"role": "user", "content": "Should I ask for a refund?"},
                                  {"role": "assistant", "content": "Yes, ask for one."}]},
        {"id": "p1", "prompt": "Summarise the review: " + LONG, "response": "Noisy, dirty, overcharged."},
        {"id": "a1", "prompt": "Repeat it", "response": LONG},  # the answer alone is over the limit
    ])
    rep, q, acc = _run(tmp_path, fmt, [DataSource(path=str(src))], "truncate_prompt", _train())
    m1 = acc["m1"]
    assert m1["turns"] == [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Should I ask for a refund?"}]
    assert m1["completion"] == "Yes, ask for one." + EOS and _tokens(fmt, m1) <= 64
    p1 = acc["p1"]
    assert LONG.endswith(p1["user_text"]) and p1["completion"] == "Noisy, dirty, overcharged." + EOS
    assert _tokens(fmt, p1) <= 64
    assert q["a1"]["reason"].startswith("too long for training even with its prompt cut: the answer with the "
                                        "least prompt takes ")
    assert q["a1"]["reason"].endswith("tokens > train.sft.max_length 64 (raise train.sft.max_length)")
    assert rep["long_records"]["truncated"] == 2 and rep["long_records"]["quarantined"] == 1
    assert rep["per_reason"] == {"too long for training even with its prompt cut": 1}


def test_preference_pairs_use_the_dpo_limit(tmp_path: Path, fmt: ChatFormatter) -> None:
    src = _jsonl(tmp_path / "prefs.jsonl", [{"id": "pp1", "prompt": LONG, "chosen": "negative",
                                             "rejected": "The hotel sounds fine to me overall."}])
    rep, q, acc = _run(tmp_path, fmt, [DataSource(path=str(src), kind="preference")], "truncate_prompt",
                       _train(sft=512, dpo=64))
    pp1 = acc["pp1"]
    assert pp1["chosen"] == "negative" + EOS and pp1["rejected"] == "The hotel sounds fine to me overall." + EOS
    assert _tokens(fmt, pp1, "chosen") <= 64 and _tokens(fmt, pp1, "rejected") <= 64
    assert LONG.endswith(pp1["user_text"]) and rep["long_records"]["truncated"] == 1
    rep, q, _ = _run(tmp_path / "q", fmt, [DataSource(path=str(src), kind="preference")], "quarantine",
                     _train(sft=512, dpo=64))
    assert "> train.dpo.max_length 64 (raise train.dpo.max_length" in q["pp1"]["reason"]
    rep, q, acc = _run(tmp_path / "off", fmt, [DataSource(path=str(src), kind="preference")], "quarantine",
                       _train(sft=512, dpo=64, dpo_enabled=False))
    assert not q and rep["long_records"]["max_length"] == {"sft": 512}  # DPO does not run: not its records


def test_without_train_config_or_tokenizer_lengths_are_not_checked(tmp_path: Path, fmt: ChatFormatter) -> None:
    src = _jsonl(tmp_path / "r.jsonl", [{"id": "long", "prompt": LONG, "response": "negative"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"id": "e1", "prompt": "An unrelated eval prompt", "response": "x"}])
    cfg = DataConfig(sources=[DataSource(path=str(src))], eval=[DataSource(path=str(ev))])
    for formatter, train, out in ((fmt, None, "a"), (None, _train(), "b")):
        rep = ingest(cfg, formatter, tmp_path / out, train=train)
        assert rep["quarantined"] == 0 and rep["long_records"]["note"].startswith("token lengths not checked")


def test_cli_length_flags(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneloop.cli import app

    src = _jsonl(tmp_path / "t.jsonl", [{"text": LONG, "label": "negative"},
                                        {"text": "Nice and quiet", "label": "positive"}])
    run = CliRunner().invoke
    res = run(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--max-length", "64"])
    assert res.exit_code == 2 and res.output.strip() == \
        "error: --max-length needs --tokenizer: tokens are counted with the model's tokenizer"
    res = run(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--long-records", "truncate_prompt"])
    assert res.exit_code == 2 and "--long-records needs --max-length" in res.output
    base = ["ingest", str(src), "--out", str(tmp_path / "o"), "--template", TEMPLATE,
            "--tokenizer", str(tiny_model_dir), "--max-length", "64", "--max-quarantine-share", "1"]
    res = run(app, base)
    assert res.exit_code == 0, res.output
    assert "read 2, accepted 1, quarantined 1 (too long for training 1)" in res.output
    (q,) = _read(tmp_path / "o" / "quarantine.jsonl")
    assert "> --max-length 64 (raise --max-length, or rerun with --long-records truncate_prompt" in q["reason"]
    res = run(app, [*base, "--long-records", "truncate_prompt"])
    assert res.exit_code == 0 and "read 2, accepted 2, quarantined 0; 1 prompts cut to --max-length" in res.output
    acc = _read(tmp_path / "o" / "accepted.jsonl")
    assert [a["completion"] for a in acc] == ["negative" + EOS, "positive" + EOS]


# -- the data gate's messages ------------------------------------------------------------------------
def _run_config(tmp: Path, tiny_model_dir: Path, rows: list[dict[str, Any]], **overrides: Any) -> Any:
    from tuneloop.config import load_config
    from tuneloop.tiny import tiny_run_config

    src = _jsonl(tmp / "reviews.jsonl", rows)
    return load_config(tiny_run_config(tmp, tiny_model_dir, data__sources=[
        {"path": str(src), "slice": "general_qa"}, {"path": "data/prefs.jsonl", "kind": "preference"}],
        data__dedup={"near_threshold": 0}, **overrides))


def _reviews(n_long: int, n_short: int) -> list[dict[str, Any]]:
    return [{"id": f"long-{i}", "prompt": f"{LONG} Stay number {i}.", "response": "negative"}
            for i in range(n_long)] + \
        [{"id": f"short-{i}", "prompt": f"Was stay number {i} quiet?", "response": "yes"} for i in range(n_short)]


def test_gate_failure_names_the_records_and_the_key(tmp_path: Path, tiny_model_dir: Path, fmt: ChatFormatter) -> None:
    """Records ingested without the length step (another tokenizer, an old dataset) that are longer than
    train.sft.max_length: the gate says which, and which key to change."""
    from tuneloop.data.validate import validate_dataset

    cfg = _run_config(tmp_path, tiny_model_dir, _reviews(3, 30))
    ingest(cfg.data, fmt, tmp_path / "ds")  # no train: lengths are not handled
    rep = validate_dataset(cfg, tmp_path / "ds", fmt.tokenizer, tmp_path / "v")
    (fail,) = [c for c in rep["failed"] if c["column"] == "completion_seq_tokens"]
    assert {"table", "expectation", "column", "observed", "message", "config_key"} <= set(fail)
    assert fail["table"] == "sft" and fail["expectation"] == "expect_column_values_to_be_between"
    assert fail["observed"].startswith("3 of ") and fail["config_key"] == "train.sft.max_length"
    msg = fail["message"]
    assert msg.startswith("3 of 33 training records are longer than train.sft.max_length (128 tokens, prompt + "
                          "answer) (e.g. long-0 (")
    assert " tokens), long-1 (" in msg and "long-2 (" in msg and "short-" not in msg
    assert "raise train.sft.max_length" in msg and "data.long_records" in msg and "\n" not in msg
    md = (tmp_path / "v" / "report.md").read_text()
    assert msg in md and "`train.sft.max_length`" in md
    assert all(c["message"] == "" for c in rep["checks"] if c["passed"])


def test_a_cut_prompt_that_makes_two_records_equal_is_a_duplicate(tmp_path: Path, fmt: ChatFormatter) -> None:
    src = _jsonl(tmp_path / "r.jsonl", [{"id": f"v{i}", "prompt": f"Version {i} of the review. {LONG}",
                                         "response": "negative"} for i in range(3)])
    rep, q, acc = _run(tmp_path, fmt, [DataSource(path=str(src))], "truncate_prompt", _train())
    assert set(acc) == {"v0"}
    assert q["v1"]["reason"] == q["v2"]["reason"] == "exact duplicate of v0 once its prompt was cut to fit"
    assert rep["long_records"]["truncated"] == 1 and rep["per_reason"] == {"exact duplicate": 2}


def test_long_records_quarantined_by_ingest_then_the_gate_judges_the_share(tmp_path: Path, tiny_model_dir: Path,
                                                                         fmt: ChatFormatter) -> None:
    from tuneloop.data.validate import validate_dataset

    cfg = _run_config(tmp_path, tiny_model_dir, _reviews(10, 30))
    ing = ingest(cfg.data, fmt, tmp_path / "ds", train=cfg.train)
    assert ing["long_records"]["quarantined"] == 10
    rep = validate_dataset(cfg, tmp_path / "ds", fmt.tokenizer, tmp_path / "v")
    assert [(c["table"], c["expectation"]) for c in rep["failed"]] == [("ingest", "quarantined_share_at_most")]
    (fail,) = rep["failed"]
    assert fail["config_key"] == "data.max_quarantine_share"
    msg = fail["message"]
    read = ing["read"]
    assert msg.startswith(f"10 of the {read} records read ({10 / read:.1%}) were quarantined, more than "
                          "data.max_quarantine_share (10.0%): too long for training 10; e.g. reviews.jsonl row 1 "
                          "(id long-0): too long for training: ")
    assert "raise train.sft.max_length, or set data.long_records: truncate_prompt" in msg
    assert msg.endswith("Fix the data or the setting its reason names, or raise data.max_quarantine_share")
    # the share allowed: the gate passes, the long records stay out of training
    cfg.data.max_quarantine_share = 0.5
    assert validate_dataset(cfg, tmp_path / "ds", fmt.tokenizer, tmp_path / "v2")["passed"]
    # or truncate their prompts: nothing quarantined, every record trains
    cfg.data.long_records = "truncate_prompt"
    cfg.data.max_quarantine_share = 0.1
    ing = ingest(cfg.data, fmt, tmp_path / "ds3", train=cfg.train)
    assert ing["quarantined"] == 0 and ing["long_records"]["truncated"] == 10
    assert validate_dataset(cfg, tmp_path / "ds3", fmt.tokenizer, tmp_path / "v3")["passed"]
    rows = [json.loads(line) for line in (tmp_path / "ds3" / "sft.jsonl").read_text().splitlines()]
    assert all(r["completion"] == "negative" + EOS for r in rows if r["id"].startswith("long-"))


def test_first_contact_with_a_public_csv(tmp_path: Path, tiny_model_dir: Path, fmt: ChatFormatter) -> None:
    """The issue's run: a cp1252 CSV of reviews with HTML entities, some longer than max_length, read with
    encoding auto and long_records truncate_prompt, passes the data gate with every label intact."""
    from tuneloop.config import load_config
    from tuneloop.data.validate import validate_dataset
    from tuneloop.tiny import tiny_run_config

    rows = [(f"r{i}", f"Stay {i}: the caf\u00e9 was fine, staff didn&#039;t smile \u2013 \u201cok\u201d for \u20ac{i}.",
             "negative" if i % 2 else "positive") for i in range(30)]
    rows += [(f"long{i}", f"Stay {i}: {LONG} We paid \u20ac{100 + i}.", "negative") for i in range(4)]
    csv = "id,text,label\r\n" + "".join(f'{rid},"{text}",{label}\r\n' for rid, text, label in rows)
    (tmp_path / "reviews.csv").write_bytes(csv.encode("cp1252"))
    cfg = load_config(tiny_run_config(tmp_path, tiny_model_dir, data__sources=[
        {"path": "reviews.csv", "kind": "classification", "template": "Review: {text}\nSentiment?",
         "slice": "general_qa", "encoding": "auto"}, {"path": "data/prefs.jsonl", "kind": "preference"}],
        data__long_records="truncate_prompt", data__dedup={"near_threshold": 0}))
    rep = ingest(cfg.data, fmt, tmp_path / "ds", train=cfg.train)
    assert rep["encodings"] == {str(tmp_path / "reviews.csv"): "cp1252"}
    assert rep["normalize"]["per_source"]["reviews.csv"] == {"html_entities": 30}  # the short reviews
    assert rep["long_records"]["truncated"] == 4 and rep["by_kind"]["sft"]["quarantined"] == 0
    sft = {r["id"]: r for r in _read(tmp_path / "ds" / "sft.jsonl")}
    assert sft["r1"]["user_text"] == "Review: Stay 1: the caf\u00e9 was fine, staff didn't smile \u2013 \u201cok\u201d " \
                                     "for \u20ac1.\nSentiment?"
    assert all(sft[f"long{i}"]["completion"] == "negative" + EOS for i in range(4))
    assert all(sft[f"long{i}"]["user_text"].endswith(f"We paid \u20ac{100 + i}.\nSentiment?") for i in range(4))
    gate = validate_dataset(cfg, tmp_path / "ds", fmt.tokenizer, tmp_path / "v")
    assert gate["passed"], gate["failed"]
