"""`tuneloop ingest` outputs: written next to OUT and swapped in only when complete (an error leaves the old
outputs intact and no partial folder), a mostly-quarantined input exits non-zero with a one-line summary
(--max-quarantine-share), and a JSON array file is told to become JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.data.ingest_files import OutputFolderError, staged_output

pytestmark = pytest.mark.unit

GOOD = [{"id": "g1", "prompt": "What is two plus two, please?", "response": "Four."},
        {"id": "g2", "prompt": "Name the capital of France.", "response": "Paris."}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ingest(*args: str) -> tuple[int, list[str], list[str]]:
    res = CliRunner().invoke(app, ["ingest", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res.exit_code, res.stdout.splitlines(), res.stderr.splitlines()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_an_error_leaves_the_old_outputs_intact_and_no_partial_folder(tmp_path: Path) -> None:
    good = _jsonl(tmp_path / "good.jsonl", GOOD)
    out = tmp_path / "out"
    assert _ingest(str(good), "--out", str(out))[0] == 0
    before = _snapshot(out)
    assert set(before) == {"accepted.jsonl", "quarantine.jsonl", "report.json"}
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 but not really")  # fails while reading, after good.jsonl
    code, _, err = _ingest(str(good), str(tmp_path / "broken.parquet"), "--out", str(out))
    assert code == 1 and len(err) == 1 and "not a readable Parquet file" in err[0]
    assert _snapshot(out) == before  # not an empty accepted.jsonl next to an old report.json
    assert _leftovers(tmp_path) == []
    code, _, _ = _ingest(str(good), str(tmp_path / "broken.parquet"), "--out", str(tmp_path / "new"))
    assert code == 1 and not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_success_replaces_the_old_outputs_whole(tmp_path: Path) -> None:
    good = _jsonl(tmp_path / "good.jsonl", GOOD)
    ev = _jsonl(tmp_path / "ev.jsonl", [{"id": "e1", "prompt": "Something else entirely?", "response": "Yes."}])
    out = tmp_path / "out"
    assert _ingest(str(good), "--eval", str(ev), "--out", str(out))[0] == 0
    assert (out / "eval.jsonl").exists()
    other = _jsonl(tmp_path / "other.jsonl", [{"id": "o1", "prompt": "Is the sky blue today?", "response": "Yes."}])
    assert _ingest(str(other), "--out", str(out))[0] == 0
    assert not (out / "eval.jsonl").exists()  # no stale file from the earlier run
    assert [json.loads(x)["id"] for x in (out / "accepted.jsonl").read_text().splitlines()] == ["o1"]
    assert json.loads((out / "report.json").read_text())["inputs"] == [str(other)]
    assert _leftovers(tmp_path) == []


def test_a_folder_of_other_files_is_not_replaced(tmp_path: Path) -> None:
    good = _jsonl(tmp_path / "good.jsonl", GOOD)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep me")
    code, _, err = _ingest(str(good), "--out", str(mine))
    assert code == 2 and len(err) == 1 and "holds files that are not ingest outputs (notes.md)" in err[0]
    assert (mine / "notes.md").read_text() == "keep me" and _leftovers(tmp_path) == []
    code, _, err = _ingest(str(good), "--out", str(good))
    assert code == 2 and err == [f"error: --out {good}: is a file; give a folder for the outputs"]


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_staged_output_removes_the_stage_on_any_error(tmp_path: Path, interrupt: BaseException) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    with pytest.raises(type(interrupt)), staged_output(out) as staged:
        (staged / "report.json").write_text("new, half written")
        raise interrupt
    assert (out / "report.json").read_text() == "old" and _leftovers(tmp_path) == []
    with staged_output(out) as staged:
        (staged / "report.json").write_text("new")
    assert _snapshot(out) == {"report.json": b"new"} and _leftovers(tmp_path) == []
    with pytest.raises(OutputFolderError):
        with staged_output(tmp_path):  # holds `out`: not an output folder of ingest
            pass


def test_a_binary_file_renamed_jsonl_exits_non_zero_with_a_summary(tmp_path: Path) -> None:
    binary = tmp_path / "model.jsonl"
    noise = bytes(b for b in range(256) if b != ord("\n")) * 40
    binary.write_bytes(noise + b"\n" + noise)
    out = tmp_path / "out"
    code, stdout, err = _ingest(str(binary), "--out", str(out))
    assert code == 1 and stdout == [f"read 2, accepted 0, quarantined 2 (binary data, not JSON text 2) -> {out}"]
    assert len(err) == 1, err
    assert err[0].startswith("error: 2 of the 2 records read (100%) were quarantined, more than "
                             "--max-quarantine-share 0.1; e.g. model.jsonl row 1: binary data, not JSON text")
    assert err[0].endswith(f"all reasons in {out / 'quarantine.jsonl'}")
    assert (out / "quarantine.jsonl").exists()  # written: the reasons are what the operator reads next
    assert _ingest(str(binary), "--out", str(out), "--max-quarantine-share", "1")[0] == 0


def test_the_share_default_is_the_config_default(tmp_path: Path) -> None:
    from tuneloop.config import DataConfig

    default = DataConfig.model_fields["max_quarantine_share"].default
    rows = [*GOOD, *({"id": f"x{i}", "prompt": f"Question number {i} here?", "response": "Yes."} for i in range(7))]
    good = _jsonl(tmp_path / "mixed.jsonl", rows)
    with good.open("a") as f:
        f.write("{broken\n")  # 1 of 10 quarantined: exactly the default share, allowed
    assert default == 0.1 and _ingest(str(good), "--out", str(tmp_path / "o"))[0] == 0
    with good.open("a") as f:
        f.write("{broken again\n")  # 2 of 11: more
    assert _ingest(str(good), "--out", str(tmp_path / "o"))[0] == 1
    assert _ingest(str(good), "--out", str(tmp_path / "o"), "--max-quarantine-share", "2")[0] == 2


@pytest.mark.parametrize("text", [json.dumps(GOOD), json.dumps(GOOD, indent=2), "[\n" + ",\n".join(
    json.dumps(r) for r in GOOD) + "\n]\n"])
def test_a_json_array_gets_the_jsonl_hint(tmp_path: Path, text: str) -> None:
    path = tmp_path / "export.json"
    path.write_text(text)
    out = tmp_path / "out"
    code, _, err = _ingest(str(path), "--out", str(out))
    hint = "(the file is a JSON array, not JSON Lines: convert it with jq -c '.[]' export.json > export.jsonl)"
    assert code == 1 and len(err) == 1 and hint in err[0]
    reasons = [json.loads(x)["reason"] for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert reasons and all(r.endswith(hint) for r in reasons)
    rep = json.loads((out / "report.json").read_text())
    assert not any("jq" in k for k in rep["per_reason"])  # counted under the plain reason


@pytest.mark.parametrize("argv", [["{tmp}/nope.jsonl"], ["{tmp}/emptydir"], ["{tmp}/notes.txt"], ["{tmp}/empty.jsonl"],
                                  ["{tmp}/good.jsonl", "--kind", "weird"], ["{tmp}/good.jsonl", "--encoding", "rot13"],
                                  ["{tmp}/good.jsonl", "--template", "{0}"]])
def test_no_input_makes_ingest_print_a_traceback(tmp_path: Path, argv: list[str]) -> None:
    _jsonl(tmp_path / "good.jsonl", GOOD)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty.jsonl").write_text("")
    code, stdout, err = _ingest(*[a.replace("{tmp}", str(tmp_path)) for a in argv], "--out", str(tmp_path / "o"))
    assert code in (0, 1, 2)
    assert code == 0 or (len(err) == 1 and err[0].startswith("error: ")), err
