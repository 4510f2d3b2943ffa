"""The reward+rl path learns, not only runs (tiny model, one process, real TRL through the pipeline's stages).

The reward model, trained on the demo's preference pairs and the safety pairs (a refusal chosen over a
compliant answer to a HarmBench prompt), ranks the held-out chosen answers over the rejected ones better than
chance (one-sided binomial test). Online RL then moves the policy toward what that reward model prefers. A
random 2-layer model's next-token distribution is nearly uniform, so a few dozen RL steps move it a little,
and sampled completions would need thousands of samples to show it; with one-token completions the expected
reward of a policy on a prompt is computed exactly instead (every token of the vocabulary, weighted by the
policy's probability), and the RL adapter beats the SFT adapter it started from on the same prompts
(one-sided Wilcoxon signed-rank test over the prompts). Decisions are tests at 1%, not tuned thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.registry import Registry
from tuneloop.tiny import build_random_adapter, tiny_training_files

pytestmark = [pytest.mark.integration, pytest.mark.rlhf]

REWARD = {"max_steps": 40, "per_device_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 10,
          "max_length": 160, "eval_share": 0.3, "safety": {"max_pairs": 32},
          "gate": {"min_accuracy": 0.0, "min_slice_accuracy": {"safety": 0.0}, "min_pairs": 1}}
RL = {"max_steps": 40, "per_device_batch_size": 16, "num_generations": 4, "max_completion_length": 1,
      "learning_rate": 1e-2, "beta": 0.0, "logging_steps": 10,
      "guards": {"max_empty_or_clipped_share": 1.0, "max_kl": 1e6, "max_length_growth": 100.0,
                 "min_distinct_2": 0.0}}


def _expected_rewards(model_dir: Path, reward_dir: Path, policy: Path, prompts: list[str]) -> list[float]:
    """Per prompt: the sum over every vocabulary token t of policy(t | prompt) * reward(prompt + t)."""
    import torch

    from tuneloop.models import load_causal_lm
    from tuneloop.train.rl import load_reward_model

    rm, rtok = load_reward_model(SimpleNamespace(base_model_dir=str(model_dir), reward_adapter_dir=str(reward_dir)))
    model, tok = load_causal_lm(model_dir, policy)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            seqs = torch.cat([ids.repeat(probs.shape[0], 1), torch.arange(probs.shape[0])[:, None]], 1)
            rewards = torch.cat([rm(input_ids=chunk).logits[:, 0] for chunk in seqs.split(128)])
            out.append(float((probs * rewards).sum()))
    return out


def test_the_reward_model_beats_chance_and_rl_moves_the_policy_toward_it(tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    from scipy.stats import binomtest, wilcoxon

    from tuneloop.stages import reward_stage, rl_stage

    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir, n_pref=24)
    (data / "report.json").write_text(json.dumps({"data_hash": "e" * 64}))
    sft = tmp_path / "sft"
    build_random_adapter(tiny_model_dir, sft / "adapter", seed=1, alpha=8)  # stands in for the SFT adapter
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, train__alignment="reward+rl", train__reward=REWARD,
                                  train__rl=RL, train__nproc_per_node=1, train__deepspeed="none"))
    parent = Registry(cfg).start_pipeline_run("rl-learns", "kfp-rl-learns", {})

    reward_stage(cfg, parent, data, tmp_path / "reward")
    ev = json.loads((tmp_path / "reward" / "reward_eval.json").read_text())
    pairs = [json.loads(x) for x in (tmp_path / "reward" / "pairs.jsonl").read_text().splitlines()]
    assert ev["pairs"] == sum(p["split"] == "eval" for p in pairs) and {"safety", "preference"} <= set(ev["slices"])
    p_reward = binomtest(round(ev["accuracy"] * ev["pairs"]), ev["pairs"], 0.5, alternative="greater").pvalue
    print(f"\nreward model: held-out accuracy {ev['accuracy']:.3f} on {ev['pairs']} pairs (p={p_reward:.2g}), "
          f"per slice {ev['slices']}")
    assert p_reward < 0.01

    r = rl_stage(cfg, parent, sft, tmp_path / "reward", tmp_path / "rl")
    assert r["steps"] == RL["max_steps"]
    prompts = [json.loads(x)["prompt"] for x in (tmp_path / "rl" / "prompts.jsonl").read_text().splitlines()][:24]
    before = _expected_rewards(tiny_model_dir, tmp_path / "reward" / "adapter", sft / "adapter", prompts)
    after = _expected_rewards(tiny_model_dir, tmp_path / "reward" / "adapter", tmp_path / "rl" / "adapter", prompts)
    p_rl = wilcoxon(after, before, alternative="greater").pvalue
    up = sum(a > b for a, b in zip(after, before, strict=True))
    print(f"RL: expected reward {sum(before) / len(before):.4f} (SFT) -> {sum(after) / len(after):.4f} (RL), higher "
          f"on {up} of {len(prompts)} prompts (p={p_rl:.2g})")
    assert p_rl < 0.01
