"""The RL watch and its guards on fake TRL logs: the values computed, and each guard stopping with its reason."""

from __future__ import annotations

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from tuneloop.config.align import RLGuardsConfig
from tuneloop.config.train import TrainConfig
from tuneloop.train.rl import breach, distinct_n, watch_callback, watched
from tuneloop.train.spec import JobSpec

pytestmark = pytest.mark.unit

HEALTHY = {"loss": 0.1, "reward": 0.5, "reward_std": 0.2, "kl": 0.05, "completions/mean_length": 20.0,
           "completions/clipped_ratio": 0.1}
TEXTS = ["the parcel is late", "your order ships today", "we refund the fee", "please reset the password"]


def test_distinct_n() -> None:
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_n(["same same same"] * 4, 2) == 1 / 8
    assert distinct_n(["", " "], 2) is None
    # one-word answers are n-grams of themselves: a collapse onto them is seen (it was None, the guard blind)
    assert distinct_n(["Sorry."] * 8, 2) == 1 / 8
    assert distinct_n(["one", "", "two three"], 2) == 1.0


def test_watched_values() -> None:
    v = watched(HEALTHY, TEXTS + ["  "], first_length=10.0)
    assert v["reward_mean"] == 0.5 and v["reward_std"] == 0.2 and v["kl"] == 0.05
    assert v["length_growth"] == 2.0 and v["empty_share"] == 0.2
    assert v["empty_or_clipped_share"] == pytest.approx(0.3)
    assert v["distinct_2"] == 1.0


@pytest.mark.parametrize("logs, texts, key", [
    ({**HEALTHY, "kl": 3.0}, TEXTS, "max_kl"),
    ({**HEALTHY, "completions/mean_length": 80.0}, TEXTS, "max_length_growth"),
    (HEALTHY, ["I refuse I refuse I refuse"] * 8, "min_distinct_2"),
    (HEALTHY, ["No."] * 16, "min_distinct_2"),
    ({**HEALTHY, "completions/clipped_ratio": 0.9}, TEXTS, "max_empty_or_clipped_share"),
    (HEALTHY, [""] * 3 + TEXTS[:1], "max_empty_or_clipped_share"),
])
def test_each_guard_names_itself(logs: dict, texts: list[str], key: str) -> None:
    reason = breach(watched(logs, texts, first_length=20.0), RLGuardsConfig(), step=7)
    assert reason is not None and reason.startswith("step 7: ") and f"train.rl.guards.{key}" in reason


def test_healthy_and_switched_off_and_not_yet() -> None:
    g = RLGuardsConfig()
    assert breach(watched(HEALTHY, TEXTS, 20.0), g, 3) is None
    off = RLGuardsConfig(max_kl=0)
    assert breach(watched({**HEALTHY, "kl": 50.0}, TEXTS, 20.0), off, 3) is None
    late = RLGuardsConfig(start_step=5)
    assert breach(watched({**HEALTHY, "kl": 50.0}, TEXTS, 20.0), late, 4) is None
    assert breach(watched({**HEALTHY, "kl": 50.0}, TEXTS, 20.0), late, 5) is not None


class _FakeTrainer:
    def __init__(self) -> None:
        self._logs = {"completion": list(TEXTS)}


def test_callback_adds_values_to_the_logs_and_stops_training(tmp_path) -> None:  # noqa: ANN001
    spec = JobSpec(stage="rl", base_model_dir="b", data_path="d", output_dir=str(tmp_path),
                   train=TrainConfig.model_validate({"rl": {"guards": {"max_length_growth": 1.5}}}))
    cb = watch_callback(spec)
    cb.trainer = _FakeTrainer()
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerState(), \
        TrainerControl()
    state.global_step = 1
    logs = dict(HEALTHY)
    cb.on_log(args, state, control, logs=logs)
    assert logs["distinct_2"] == 1.0 and logs["length_growth"] == 1.0 and not control.should_training_stop
    state.global_step = 2
    cb.trainer._logs["completion"] = ["yes yes yes yes"] * 4
    cb.on_log(args, state, control, logs={**HEALTHY, "completions/mean_length": 40.0})
    assert control.should_training_stop and not control.should_save
    assert cb.stopped.startswith("step 2: mean completion length grew 2.00x")
    cb.write()
    import json

    saved = json.loads((tmp_path / "rl_watch.json").read_text())
    assert saved["stopped"] == cb.stopped and [h["step"] for h in saved["history"]] == [1, 2]


def test_a_breach_fails_the_worker_before_anything_is_saved(tmp_path) -> None:  # noqa: ANN001
    from tuneloop.train.common import StageStopped
    from tuneloop.train.rl import after_rl

    spec = JobSpec(stage="rl", base_model_dir="b", data_path="d", output_dir=str(tmp_path), train=TrainConfig())
    cb = watch_callback(spec)
    cb.stopped, cb.history = "step 3: KL to the reference 9.0 is above train.rl.guards.max_kl 1.0", [{"kl": 9.0}]

    class T:
        rl_watch = cb

    with pytest.raises(StageStopped, match="max_kl"):
        after_rl(spec, T())
    assert not (tmp_path / "adapter").exists()


def test_stopped_file_becomes_the_launchers_reason(tmp_path) -> None:  # noqa: ANN001
    import json

    from tuneloop.train.local import GuardStopped, stopped_by_guard

    assert stopped_by_guard(tmp_path) is None
    (tmp_path / "stopped.json").write_text(json.dumps({"stage": "rl", "reason": "step 2: diversity collapsed"}))
    e = stopped_by_guard(tmp_path)
    assert isinstance(e, GuardStopped) and str(e) == "rl: stopped by a guard: step 2: diversity collapsed"


def test_reward_gate_reasons() -> None:
    from tuneloop.config.align import RewardGateConfig
    from tuneloop.stages.train import reward_gate

    class C:
        class train:  # noqa: N801
            class reward:  # noqa: N801
                gate = RewardGateConfig(min_accuracy=0.6, min_slice_accuracy={"safety": 0.8, "general_qa": 0.5},
                                        min_pairs=4)

    ok = {"accuracy": 0.9, "pairs": 20, "slices": {"safety": {"pairs": 8, "accuracy": 0.9},
                                                   "general_qa": {"pairs": 12, "accuracy": 0.6}}}
    assert reward_gate(C, ok) == []
    bad = {"accuracy": 0.5, "pairs": 20, "slices": {"safety": {"pairs": 8, "accuracy": 0.75},
                                                    "general_qa": {"pairs": 2, "accuracy": 1.0}}}
    why = reward_gate(C, bad)
    assert len(why) == 3
    assert "min_accuracy 0.6" in why[0] and "general_qa: 2 held-out pairs" in why[1]
    assert "slice safety: held-out pairwise accuracy 0.750" in why[2]
    assert reward_gate(C, {"accuracy": None, "pairs": 0, "slices": {}})[0].startswith("no held-out pairs")


@pytest.mark.parametrize("alignment", ["dpo", "none"])
def test_off_the_path_reward_and_rl_pass_the_adapter_through_without_a_run(tmp_path, alignment) -> None:  # noqa: ANN001
    from conftest import tiny_config

    from tuneloop.config import load_config
    from tuneloop.stages import reward_stage, rl_stage

    cfg = load_config(tiny_config(tmp_path, tmp_path / "no-model", train__alignment=alignment))
    (tmp_path / "dpo" / "adapter").mkdir(parents=True)
    (tmp_path / "dpo" / "adapter" / "adapter_config.json").write_text("{}")
    r = reward_stage(cfg, "no-parent-run", tmp_path / "dataset", tmp_path / "reward")
    assert r["skipped"] and (tmp_path / "reward" / "NOT_TRAINED.txt").exists()
    r = rl_stage(cfg, "no-parent-run", tmp_path / "dpo", tmp_path / "reward", tmp_path / "rl")
    assert r["skipped"] and (tmp_path / "rl" / "adapter" / "adapter_config.json").read_text() == "{}"
    assert not (tmp_path / "state" / "mlflow.db").exists()  # no MLflow run was opened


def test_a_retried_task_fails_at_once_with_the_guards_reason(tmp_path) -> None:  # noqa: ANN001
    from tuneloop.train.launch import refuse_known_stop, remember_stop
    from tuneloop.train.local import GuardStopped

    spec = JobSpec(stage="rl", base_model_dir="b", data_path="d", output_dir=str(tmp_path / "out"),
                   train=TrainConfig(), checkpoint_dir=str(tmp_path / "ckpt" / "run" / "rl"))
    refuse_known_stop(spec)  # nothing remembered yet
    remember_stop(spec, GuardStopped("rl: stopped by a guard: step 4: diversity collapsed", {"last": {"kl": 0.1}}))
    with pytest.raises(GuardStopped, match="not retried: .*step 4: diversity collapsed"):
        refuse_known_stop(spec)
    other = spec.model_copy(update={"train": TrainConfig.model_validate({"rl": {"beta": 0.5}})})
    refuse_known_stop(other)  # other settings: a fresh attempt


def test_the_off_values() -> None:
    bad = watched({**HEALTHY, "kl": 50.0, "completions/mean_length": 500.0, "completions/clipped_ratio": 1.0},
                  ["a a a a a a"] * 4, 20.0)
    off = RLGuardsConfig(max_kl=0, max_length_growth=0, min_distinct_2=0, max_empty_or_clipped_share=1)
    assert breach(bad, off, 9) is None
    strict = RLGuardsConfig(max_kl=0, max_length_growth=0, min_distinct_2=0, max_empty_or_clipped_share=0)
    assert "max_empty_or_clipped_share 0" in breach(bad, strict, 9)  # 0 is a real threshold for a share


def test_the_watch_state_travels_with_the_checkpoint(tmp_path) -> None:  # noqa: ANN001
    spec = JobSpec(stage="rl", base_model_dir="b", data_path="d", output_dir=str(tmp_path), train=TrainConfig())
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerState(), \
        TrainerControl()
    cb = watch_callback(spec)
    cb.trainer = _FakeTrainer()
    state.global_step = 4
    cb.on_log(args, state, control, logs=dict(HEALTHY))
    (tmp_path / "checkpoint-4").mkdir()
    cb.on_save(args, state, control)
    resumed = watch_callback(spec)
    resumed.trainer = _FakeTrainer()
    resumed.on_train_begin(args, state, control)
    assert resumed.first_length == 20.0 and resumed.history == cb.history
    state.global_step = 5
    logs = {**HEALTHY, "completions/mean_length": 30.0}
    resumed.on_log(args, state, control, logs=logs)
    assert logs["length_growth"] == 1.5  # against the first step of the stage, not of the resumed process
