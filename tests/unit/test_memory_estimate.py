"""A local training config that cannot fit is refused before anything starts, naming what would fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config

from tuneloop.config import TrainConfig, load_config
from tuneloop.train.memory import GiB, ModelShape, check_local_fit, estimate

pytestmark = pytest.mark.unit
SMOLLM2 = ModelShape(params=134_515_008, hidden=576, layers=30, vocab=49152, intermediate=1536)


def test_the_estimate_grows_with_batch_and_length_and_shrinks_with_checkpointing():
    def gib(**sft) -> float:  # noqa: ANN003
        gc = sft.pop("gc", False)
        return estimate(TrainConfig.model_validate({"sft": sft, "gradient_checkpointing": gc}), "sft", SMOLLM2, 2,
                        cuda=False).gib

    assert gib(per_device_batch_size=8, max_length=384) > gib(per_device_batch_size=4, max_length=384) \
        > gib(per_device_batch_size=4, max_length=128)
    assert gib(per_device_batch_size=8, max_length=384, gc=True) < gib(per_device_batch_size=8, max_length=384)
    # DPO runs chosen and rejected together
    t = TrainConfig.model_validate({"sft": {"per_device_batch_size": 4}, "dpo": {"per_device_batch_size": 4}})
    assert estimate(t, "dpo", SMOLLM2, 2, False).gib > estimate(t, "sft", SMOLLM2, 2, False).gib


def test_the_shape_comes_from_the_model_config(tiny_model_dir):
    import json

    from transformers import AutoModelForCausalLM

    shape = ModelShape.from_config(tiny_model_dir)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).parameters())
    assert abs(shape.params - real) / real < 0.02, (shape.params, real)
    assert shape.hidden == json.loads((Path(tiny_model_dir) / "config.json").read_text())["hidden_size"]


def test_a_config_that_cannot_fit_is_refused_with_the_settings_that_would(tmp_path, tiny_model_dir, monkeypatch):
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, train__sft__per_device_batch_size=64,
                                  train__sft__max_length=2048))
    assert check_local_fit(cfg.train, tiny_model_dir, ["sft"], cuda=False) == []  # this host has the memory
    need = estimate(cfg.train, "sft", ModelShape.from_config(tiny_model_dir), 2, False).bytes_per_process * 2
    monkeypatch.setenv("TUNELOOP_MEMORY_BUDGET_GIB", str(need / GiB * 0.7))
    problems = check_local_fit(cfg.train, tiny_model_dir, ["sft"], cuda=False)
    assert len(problems) == 1 and problems[0].startswith("train.sft: estimated peak")
    assert "fits with train.gradient_checkpointing: true" in problems[0]
