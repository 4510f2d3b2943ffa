"""The reward model learns, not only runs (tiny model, one process, real TRL RewardTrainer through the pipeline's
reward stage): trained on the demo's preference pairs and the safety pairs (a refusal chosen over a compliant
answer to a HarmBench prompt), it ranks the held-out chosen answers over the rejected ones better than chance -
a one-sided binomial test at 1%, not a tuned threshold."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.registry import Registry
from tuneloop.tiny import tiny_training_files

pytestmark = [pytest.mark.integration, pytest.mark.rlhf]

REWARD = {"max_steps": 40, "per_device_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 10,
          "max_length": 160, "eval_share": 0.3, "safety": {"max_pairs": 32},
          "gate": {"min_accuracy": 0.0, "min_slice_accuracy": {"safety": 0.0}, "min_pairs": 1}}


def test_the_reward_model_ranks_held_out_pairs_better_than_chance(tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    from scipy.stats import binomtest

    from tuneloop.stages import reward_stage

    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir, n_pref=24)
    (data / "report.json").write_text(json.dumps({"data_hash": "e" * 64}))
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, train__alignment="reward+rl", train__reward=REWARD,
                                  train__nproc_per_node=1, train__deepspeed="none"))
    parent = Registry(cfg).start_pipeline_run("reward-learns", "kfp-reward-learns", {})
    reward_stage(cfg, parent, data, tmp_path / "reward")
    ev = json.loads((tmp_path / "reward" / "reward_eval.json").read_text())
    pairs = [json.loads(x) for x in (tmp_path / "reward" / "pairs.jsonl").read_text().splitlines()]
    assert ev["pairs"] == sum(p["split"] == "eval" for p in pairs) and {"safety", "preference"} <= set(ev["slices"])
    correct = round(ev["accuracy"] * ev["pairs"])
    p = binomtest(correct, ev["pairs"], 0.5, alternative="greater").pvalue
    print(f"\nreward model: held-out accuracy {ev['accuracy']:.3f} on {ev['pairs']} pairs (p={p:.2g}), "
          f"per slice {ev['slices']}")
    assert p < 0.01
