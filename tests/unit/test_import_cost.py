"""What a pipeline task pays before its stage works: every kfp.local / KFP task is a fresh
interpreter that imports tuneloop.config and tuneloop.stages and calls one stage function. Those
two modules (and the prerequisites check when it fails) must not drag in the libraries only some
stages use; each stage imports its own inside the function. Checked on sys.modules in a fresh
subprocess, never on timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

# Libraries that cost a task seconds to import, or that only some stages need.
HEAVY = ("torch", "transformers", "deepspeed", "peft", "trl", "great_expectations", "evidently", "mlflow",
         "sqlalchemy", "alembic", "pandas", "pyarrow", "numpy", "scipy", "sklearn", "presidio_analyzer", "spacy",
         "sentence_transformers", "datasets", "kubernetes", "kfp", "httpx")


def _loaded_heavy(code: str) -> list[str]:
    """Run code in a fresh interpreter; the HEAVY top-level packages it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    return sorted(loaded & set(HEAVY))


def test_config_and_stages_import_no_heavy_library() -> None:
    assert _loaded_heavy("from tuneloop.config import parse_config\nimport tuneloop.stages") == []


@pytest.mark.parametrize("module", ["tuneloop.registry", "tuneloop.data.validate"])
def test_what_stages_imports_at_module_level_stays_light(module: str) -> None:
    assert _loaded_heavy(f"import {module}") == []


def test_failing_prerequisites_import_no_training_library(tmp_path: Path) -> None:
    """The prerequisites check looks the training libraries up without importing them (torch and
    transformers are seconds), and a config with missing data fails before MLflow is touched."""
    from tuneloop.tiny import tiny_run_config

    cfg_path = tiny_run_config(tmp_path, tmp_path / "no-model")
    code = f"""
from tuneloop.config import load_config
from tuneloop.stages import PrerequisiteError, check_prerequisites
cfg = load_config({str(cfg_path)!r})
cfg.data.sources[0].path = {str(tmp_path / "missing.jsonl")!r}
try:
    check_prerequisites(cfg, "probe", "probe")
except PrerequisiteError as e:
    assert "missing.jsonl" in str(e), e
else:
    raise AssertionError("no PrerequisiteError")
"""
    # httpx is the gateway probe's; numpy comes with deploy.canary (evaluate/metrics.py imports it at the top)
    assert [m for m in _loaded_heavy(code) if m not in ("httpx", "numpy")] == []
