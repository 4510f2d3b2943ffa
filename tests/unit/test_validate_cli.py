"""`tuneloop validate` checks what can be checked in seconds: the config (YAML errors as file:line:col,
duplicate keys) and the data it names (paths exist and hold data files, URIs answer with the configured
credentials). Every refusal is one line, exits non-zero, and no input prints a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.tiny import tiny_run_config

pytestmark = pytest.mark.unit


def _validate(*args: str) -> tuple[int, list[str]]:
    res = CliRunner().invoke(app, ["validate", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res.exit_code, [ln for ln in res.output.splitlines() if ln.strip()]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _config(tmp_path: Path, **overrides) -> Path:
    return tiny_run_config(tmp_path, tmp_path / "model", **overrides)


def test_a_valid_config_passes(tmp_path: Path) -> None:
    code, lines = _validate(str(_config(tmp_path)))
    assert code == 0 and len(lines) == 1 and lines[0].startswith("ok: "), lines


def test_missing_data_file_is_one_line_naming_key_and_path(tmp_path: Path) -> None:
    """As a subprocess, the way an operator runs it: stderr is a pipe, one unwrapped line."""
    missing = tmp_path / ("a-long-folder-name-" * 8) / "tickets.jsonl"  # > 200 characters: must not wrap
    cfg = _config(tmp_path, data__sources=[{"path": "data/tickets.jsonl"}, {"path": str(missing)}])
    r = _cli("validate", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{cfg}: data.sources[1].path: {missing} does not exist; correct the path (a relative path is taken from "
        "the config file's folder) or remove the entry"]


def test_folder_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not records\n")
    code, lines = _validate(str(_config(tmp_path, data__eval=[{"path": "empty"}])))
    assert code == 1 and len(lines) == 1, lines
    assert f"data.eval[0].path: {tmp_path / 'empty'} holds no .jsonl, .csv or .parquet file" in lines[0]


def test_json_array_source_gets_the_jq_hint(tmp_path: Path) -> None:
    (tmp_path / "data" / "arr.json").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "arr.json").write_text(json.dumps([{"prompt": "a", "response": "b"}], indent=2))
    code, lines = _validate(str(_config(tmp_path, data__sources=[{"path": "data/arr.json"}])))
    assert code == 1 and len(lines) == 1, lines
    assert "data.sources[0].path: " in lines[0] and "is a JSON array, not JSON Lines" in lines[0]
    assert "jq -c '.[]' arr.json > arr.jsonl" in lines[0]


@pytest.mark.parametrize("case", ["directory", "missing", "not_utf8", "empty", "yaml_syntax", "tab", "duplicate",
                                  "duplicate_nested", "control_char", "list_top", "wrong_types"])
def test_config_refusals_are_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "run.yaml"
    expected = {
        "directory": (tmp_path, f"{tmp_path}: is a folder; give the run config YAML file itself"),
        "missing": (tmp_path / "nope.yaml", f"{tmp_path / 'nope.yaml'}: no such config file"),
        "not_utf8": (path, f"{path}:1:8: not UTF-8 text (byte 0xe9 at offset 7); save the config as UTF-8"),
        "empty": (path, f"{path}: holds no settings (empty, or only comments); a run config must be a mapping"),
        "yaml_syntax": (path, f"{path}:3:5: not valid YAML: expected ',' or ']', but got '{{'"),
        "tab": (path, f"{path}:2:1: not valid YAML: found character '\\t' that cannot start any token"),
        "duplicate": (path, f"{path}:3:1: duplicate key 'name' (first at line 1)"),
        "duplicate_nested": (path, f"{path}:4:5: duplicate key 'kind' (first at line 3)"),
        "control_char": (path, f"{path}:1:7: not valid YAML: control character U+0001 is not allowed"),
        "list_top": (path, f"{path}: the top level must be a mapping of keys, got list"),
        "wrong_types": (path, f"{path}: base_model: Input should be a valid dictionary"),
    }
    content = {
        "not_utf8": "name: d\xe9mo\n".encode("latin-1"),
        "empty": b"",
        "yaml_syntax": b"name: demo\ndata: [unclosed\n  - {path: x\n",
        "tab": b"data:\n\tsources: []\n",
        "duplicate": b"name: a\nstate_dir: /tmp/x\nname: b\n",
        "duplicate_nested": b"data:\n  sources:\n    kind: sft\n    kind: preference\n",
        "control_char": b"name: \x01\n",
        "list_top": b"- a\n- b\n",
        "wrong_types": b"name: x\ndata: [1]\nbase_model: 3\n",
    }
    target, message = expected[case]
    if case in content:
        path.write_bytes(content[case])
    code, lines = _validate(str(target))
    assert code == 2, lines
    if case != "wrong_types":
        assert len(lines) == 1, lines
    assert lines[0].startswith(message), lines


def test_duplicate_key_is_not_silently_the_last(tmp_path: Path) -> None:
    raw = yaml.safe_load(_config(tmp_path).read_text())
    text = yaml.safe_dump(raw, sort_keys=False).replace("name: tiny\n", "name: tiny\nname: other\n", 1)
    (tmp_path / "dup.yaml").write_text(text)
    code, lines = _validate(str(tmp_path / "dup.yaml"))
    assert code == 2 and lines == [f"{tmp_path / 'dup.yaml'}:2:1: duplicate key 'name' (first at line 1)"]


def test_yaml_merge_keys_still_work() -> None:
    """`<<: *anchor` then an explicit key is an override, not a duplicate."""
    from tuneloop.config.load import _UniqueKeyLoader

    assert yaml.load("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", Loader=_UniqueKeyLoader)["c"] == {"x": 3, "y": 2}


def _no_aws(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def test_s3_source_without_credentials_is_one_line_and_offline_skips_it(tmp_path: Path) -> None:
    cfg = _config(tmp_path, data__sources=[
        {"path": "data/tickets.jsonl"},
        {"path": "s3://tuneloop-data/train/", "storage_options": {"endpoint_url": "http://127.0.0.1:9"}}])
    env = _no_aws(tmp_path)
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "validate", str(cfg)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"{cfg}: data.sources[1].path: s3://tuneloop-data/train/: no usable credentials "
                           "(NoCredentialsError"), line
    assert "AWS_ACCESS_KEY_ID" in line and "--offline" in line
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "validate", str(cfg), "--offline"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stderr == "" and "URIs not checked: --offline" in r.stdout


def test_unreachable_s3_endpoint_names_the_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in _no_aws(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = _config(tmp_path, data__eval=[{"path": "s3://b/eval.jsonl",
                                         "storage_options": {"endpoint_url": "http://127.0.0.1:9"}}])
    code, lines = _validate(str(cfg))
    assert code == 1 and len(lines) == 1, lines
    assert "data.eval[0].path: s3://b/eval.jsonl: cannot reach the storage service from http://127.0.0.1:9" in lines[0]
    assert "data.eval[0].storage_options.endpoint_url" in lines[0]


def test_preflight_covers_every_configured_path(tmp_path: Path) -> None:
    """Sources (preference ones too), eval sets, the canary traffic file, red-team prompt files: one problem
    each, in config order, each naming its key."""
    from tuneloop.config import load_config
    from tuneloop.data.preflight import preflight

    cfg = load_config(_config(
        tmp_path, data__sources=[{"path": "data/tickets.jsonl"}, {"path": "gone/prefs.jsonl", "kind": "preference"}],
        data__eval=[{"path": "gone/eval"}, {"path": "data/eval"}],
        deploy__canary__traffic_file="gone/traffic.jsonl",
        evaluate__safety={"prompt_files": ["gone/prompts.txt"]},
        evaluate__gates=[{"metric": "nll", "slice": "ticket_routing", "max_regression": 1.0}]))
    keys = [p.split(": ", 1)[0] for p in preflight(cfg)]
    assert keys == ["data.sources[1].path", "data.eval[0].path", "evaluate.safety.prompt_files[0]",
                    "deploy.canary.traffic_file"]


def test_every_input_to_validate_is_a_line_not_a_traceback(tmp_path: Path) -> None:
    """Odd values in every place of a valid config: refused or accepted, never a crash."""
    from tuneloop.config import ConfigError, load_config
    from tuneloop.data.preflight import preflight

    base = yaml.safe_load(_config(tmp_path).read_text())
    odd = [None, [], {}, "", 5, [[1]], "s3://b/x", "../../nowhere"]
    for section in ("data", "deploy", "evaluate", "base_model", "train"):
        for key in list(base[section]):
            for value in odd:
                raw = json.loads(json.dumps(base))
                raw[section][key] = value
                path = tmp_path / "odd.yaml"
                path.write_text(yaml.safe_dump(raw))
                try:
                    preflight(load_config(path), offline=True)
                except ConfigError:
                    pass
