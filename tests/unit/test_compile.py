"""The committed KFP YAML matches the pipeline code; it carries no secrets; components are documented."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import walk

from tuneloop.orchestrate import compiled_is_current, compiled_path

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SECRET_KEY = re.compile(r"password|passwd|secret|token|api[_-]?key|credential|access[_-]?key", re.I)
SECRET_VALUE = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub tokens
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face tokens
    re.compile(r"\bsk-[A-Za-z0-9]{20,}"),
    re.compile(r"(password|passwd|secret|token|api_?key)\s*[:=]\s*['\"][^'\"\s]{4,}['\"]", re.I),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # credentials inside a URL
]


def test_committed_yaml_is_the_one_next_to_the_pipeline() -> None:
    assert compiled_path() == REPO / "pipelines" / "continuous_training.yaml"
    assert compiled_path().exists()


def test_committed_yaml_is_current() -> None:
    same, diff = compiled_is_current(compiled_path())
    assert same, f"pipelines/continuous_training.yaml is stale; run `tuneloop compile`:\n{diff[:3000]}"
    assert diff == ""


@pytest.fixture(scope="module")
def stale(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = compiled_path().read_text()
    assert "tuneloop-continuous-training" in text
    p = tmp_path_factory.mktemp("compile") / "stale.yaml"
    p.write_text(text.replace("tuneloop-continuous-training", "tuneloop-old-name", 1) + "# edited by hand\n")
    return p


def test_modified_copy_is_stale_with_a_diff(stale: Path) -> None:
    same, diff = compiled_is_current(stale)
    assert not same
    assert f"--- {stale}" in diff and "+++ compiled" in diff
    assert "-# edited by hand" in diff
    assert re.search(r"^-.*tuneloop-old-name", diff, re.M)
    assert re.search(r"^\+.*tuneloop-continuous-training", diff, re.M)


def test_missing_file_is_stale(tmp_path: Path) -> None:
    same, diff = compiled_is_current(tmp_path / "absent.yaml")
    assert not same and "+++ compiled" in diff


def test_cli_compile_check_fails_on_stale_file(stale: Path) -> None:
    before = stale.read_text()
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "compile", "--check", "--out", str(stale)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "stale" in r.stdout + r.stderr
    assert stale.read_text() == before  # --check never writes


@pytest.fixture(scope="module")
def compiled() -> dict[str, Any]:
    docs = list(yaml.safe_load_all(compiled_path().read_text()))
    assert docs and isinstance(docs[0], dict)
    return docs[0]


def test_compiled_yaml_has_no_secret_values(compiled: dict[str, Any]) -> None:
    nodes = walk(compiled)
    for path, value in nodes:
        key = path.rsplit(".", 1)[-1]
        if SECRET_KEY.search(key) and not isinstance(value, (dict, list)):
            assert value in (None, "", False), f"{path} holds a literal secret-looking value"
        if isinstance(value, dict) and isinstance(value.get("name"), str) and SECRET_KEY.search(value["name"]):
            # an env var / parameter named like a secret must come from a secret reference, not a literal
            assert "value" not in value or not value["value"], f"{path} ({value['name']}) is set to a literal"
        if isinstance(value, str):
            for pat in SECRET_VALUE:
                assert not pat.search(value), f"{path}: looks like a credential ({pat.pattern})"


def test_compiled_yaml_pins_no_local_paths(compiled: dict[str, Any]) -> None:
    # the run config is a runtime parameter, not baked into the package
    text = compiled_path().read_text()
    assert str(REPO) not in text and "/tmp/" not in text
    assert "config" in compiled["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in compiled["root"]["inputDefinitions"]["parameters"]["config"]


def _component_modules() -> list[Any]:
    import tuneloop.components as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def test_every_component_is_exported_and_documented() -> None:
    from kfp.dsl.python_component import PythonComponent

    import tuneloop.components as c

    defined = {name: obj for mod in _component_modules() for name, obj in vars(mod).items()
               if isinstance(obj, PythonComponent)}
    assert len(defined) >= 10
    assert set(defined) == set(c.__all__), "every component is exported from tuneloop.components"
    for name in c.__all__:
        comp = getattr(c, name)
        doc = (comp.python_func.__doc__ or "").strip()
        assert len(doc) > 20, f"component {name} has no docstring"
        assert comp.description and comp.description.strip().startswith(doc.splitlines()[0][:30]), name


def test_every_component_calls_a_stage_function() -> None:
    import inspect

    import tuneloop.components as c
    from tuneloop import stages

    for name in c.__all__:
        src = inspect.getsource(getattr(c, name).python_func)
        called = re.findall(r"from tuneloop\.stages import (\w+)", src)
        assert len(called) == 1, f"{name} should delegate to exactly one stage function, imports {called}"
        assert callable(getattr(stages, called[0], None)), f"{name}: tuneloop.stages.{called[0]} does not exist"


def test_every_component_is_in_the_compiled_pipeline(compiled: dict[str, Any]) -> None:
    import tuneloop.components as c

    executors = compiled["deploymentSpec"]["executors"]
    for name in c.__all__:
        comp = getattr(c, name)
        assert f"exec-{comp.name}" in executors, f"{name} is not used by the pipeline"


def test_alignment_paths_share_one_chain(compiled: dict[str, Any]) -> None:
    """sft -> dpo -> rl -> merge -> evaluate -> repair, with reward feeding rl: train.alignment picks the path
    inside the stages (the tasks off the path pass the adapter through), so evaluate reads the same chain's
    adapter on every path, and register what repair passes on."""
    t = {name: task for comp in compiled["components"].values() for name, task in comp.get("dag", {}).get(
        "tasks", {}).items()}

    def source(task: str, arg: str) -> str:
        a = t[task]["inputs"]["artifacts"][arg]
        return a["taskOutputArtifact"]["producerTask"] if "taskOutputArtifact" in a else a["componentInputArtifact"]

    assert source("dpo", "sft_adapter") == "sft"
    assert source("rl", "policy_adapter") == "dpo" and source("rl", "reward_model") == "reward"
    assert source("merge", "candidate") == "rl" and source("evaluate", "adapter") == "merge"
    assert source("repair", "candidate") == "merge" and source("repair", "evaluation") == "evaluate"
    # register takes what the repair stage passes on: the evaluated candidate, or the repaired one
    assert source("register", "adapter") == "pipelinechannel--repair-adapter"
    assert source("register", "evaluation") == "pipelinechannel--repair-final_evaluation"
