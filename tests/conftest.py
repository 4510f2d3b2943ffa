"""Shared fixtures: a tiny random Llama with a real BPE tokenizer (tuneloop.tiny), tiny run configs.

Nothing is downloaded: the tokenizer is trained on the demo data's text, the model is a
2-layer LlamaConfig with random weights, and both are saved with save_pretrained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tuneloop.tiny import free_port  # noqa: F401 - used by tests via conftest
from tuneloop.tiny import tiny_run_config as tiny_config  # noqa: F401 - used by tests via conftest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# DeepSpeed's CPU op is compiled on first use (40 s to 2 min): once per machine, not once per test state dir
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tuneloop-torch-extensions"))



def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    """Unmarked tests are unit tests; gpu tests skip without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("integration", "gpu", "unit")):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuneloop.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSON lines; bytes and str rows are written as they are (for broken-input cases)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
            f.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
