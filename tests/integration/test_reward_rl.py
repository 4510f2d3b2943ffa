"""The reward+rl alignment path for real on the tiny model: TRL RewardTrainer and RLOOTrainer under DeepSpeed
ZeRO-3 in 2 CPU processes (gloo) through the local launcher, inside their pipeline stages (MLflow runs, the
reward gate, the registry). The reward stage trains on preference + safety pairs and reports held-out pairwise
accuracy per slice (safety among them) and registers <model>-reward; the RL stage produces an adapter and the
watched metrics; a guard set to a threshold the tiny model cannot meet stops the stage with its reason."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.registry import Registry
from tuneloop.tiny import build_random_adapter, tiny_training_files

pytestmark = [pytest.mark.integration, pytest.mark.rlhf]

REWARD = {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "max_length": 160,
          "eval_share": 0.3, "safety": {"max_pairs": 24},
          "gate": {"min_accuracy": 0.0, "min_slice_accuracy": {"safety": 0.0}, "min_pairs": 1}}
RL = {"max_steps": 2, "per_device_batch_size": 2, "num_generations": 2, "max_completion_length": 8,
      "learning_rate": 5e-3, "logging_steps": 1,
      # a random tiny model never says EOS: every completion is clipped
      "guards": {"max_empty_or_clipped_share": 1.0, "max_kl": 100.0, "max_length_growth": 100.0,
                 "min_distinct_2": 0.0}}


def _cfg(tmp, model_dir, **rl_overrides):  # noqa: ANN001, ANN202
    return load_config(tiny_config(tmp, model_dir, train__alignment="reward+rl", train__reward=REWARD,
                                   train__rl={**RL, **rl_overrides}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):  # noqa: ANN001, ANN201
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELOOP_ZERO3_PARTITION_ALL", "1")
    tmp = tmp_path_factory.mktemp("reward_rl")
    data = tmp / "dataset"
    tiny_training_files(data, tiny_model_dir, n_pref=24)
    (data / "report.json").write_text(json.dumps({"data_hash": "d" * 64}))
    sft = tmp / "sft"
    build_random_adapter(tiny_model_dir, sft / "adapter", seed=1, alpha=8)  # stands in for the SFT adapter
    cfg = _cfg(tmp, tiny_model_dir)
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("rl-1", "kfp-rl-1", {})
    yield {"tmp": tmp, "data": data, "sft": sft, "cfg": cfg, "reg": reg, "parent": parent, "mp": mp}
    mp.undo()


@pytest.fixture(scope="module")
def rewarded(setup):  # noqa: ANN001, ANN201
    from tuneloop.stages import reward_stage

    return reward_stage(setup["cfg"], setup["parent"], setup["data"], setup["tmp"] / "reward")


def test_reward_stage_trains_gates_and_registers(setup, rewarded) -> None:  # noqa: ANN001
    out = setup["tmp"] / "reward"
    assert rewarded["world_size"] == 2 and rewarded["deepspeed"] == "zero3"
    assert rewarded["zero"]["partitioned_params"] == rewarded["zero"]["params"] > 0
    assert any(out.glob("adapter/*.safetensors"))
    ev = json.loads((out / "reward_eval.json").read_text())
    assert ev["pairs"] > 0 and 0.0 <= ev["accuracy"] <= 1.0
    assert {"safety", "preference"} <= set(ev["slices"]), ev
    print("reward held-out accuracy:", ev["accuracy"], {s: v for s, v in ev["slices"].items()})
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert sum(p.get("slice") == "safety" for p in pairs) == 24
    from tuneloop.stages.train import reward_registry

    rreg = reward_registry(setup["cfg"])
    assert rreg.name == "tiny-model-reward"
    mv = rreg.alias_version("champion")
    assert mv is not None and str(mv.version) == rewarded["version"]
    assert mv.tags["tuneloop.data_hash"] == "d" * 64 and mv.tags["tuneloop.kind"] == "reward_model"
    run = setup["reg"].stage_runs(setup["parent"], "reward")[0]
    assert "reward.accuracy.safety" in run.data.metrics


def test_rl_stage_produces_an_adapter_and_the_watched_metrics(setup, rewarded) -> None:  # noqa: ANN001
    from tuneloop.stages import rl_stage

    r = rl_stage(setup["cfg"], setup["parent"], setup["sft"], setup["tmp"] / "reward", setup["tmp"] / "rl")
    out = setup["tmp"] / "rl"
    assert r["steps"] == 2 and r["world_size"] == 2
    assert any(out.glob("adapter/*.safetensors"))
    final = r["rl_final"]
    for k in ("reward_mean", "reward_std", "kl", "mean_length", "distinct_2", "empty_or_clipped_share",
              "length_growth"):
        assert k in final, (k, final)
    watch = json.loads((out / "rl_watch.json").read_text())
    assert [h["step"] for h in watch["history"]] == [1, 2] and watch["stopped"] is None
    run = setup["reg"].stage_runs(setup["parent"], "rl")[0]
    hist = setup["reg"].client.get_metric_history(run.info.run_id, "rl/distinct_2")
    # streamed live, a point per logging step (a relaunch after a native crash of gloo logs its steps again)
    assert {m.step for m in hist} == {1, 2}


def test_rl_guard_stops_the_stage_with_its_reason(setup, rewarded, tiny_model_dir) -> None:  # noqa: ANN001
    from tuneloop.stages import rl_stage
    from tuneloop.train.local import GuardStopped

    cfg = _cfg(setup["tmp"] / "guard", tiny_model_dir,
               guards={**RL["guards"], "max_empty_or_clipped_share": 0.0})  # impossible for the tiny model
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("rl-guard", "kfp-rl-guard", {})
    out = setup["tmp"] / "rl-guard"
    with pytest.raises(GuardStopped, match=r"step 1: .*empty or clipped.*max_empty_or_clipped_share 0.0"):
        rl_stage(cfg, parent, setup["sft"], setup["tmp"] / "reward", out)
    assert not any(out.glob("adapter/*.safetensors")), "a stopped run saves nothing to register"
    assert json.loads((out / "rl_watch.json").read_text())["stopped"].startswith("step 1:")
    run = reg.stage_runs(parent, "rl")[0]
    assert run.info.status == "FAILED" and run.data.tags["tuneloop.rl_guard"] == "stopped"


def test_reward_stage_reuses_the_champion_reward_model(setup, rewarded, tiny_model_dir) -> None:  # noqa: ANN001
    from tuneloop.stages import reward_stage

    cfg = load_config(tiny_config(setup["tmp"] / "reuse", tiny_model_dir, train__alignment="reward+rl",
                                  train__reward={**REWARD, "reuse_champion": True}, train__rl=RL,
                                  state_dir=str(setup["cfg"].state_path)))
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("rl-reuse", "kfp-rl-reuse", {})
    r = reward_stage(cfg, parent, setup["data"], setup["tmp"] / "reward-reused")
    assert r["reused_version"] == rewarded["version"] and "steps" not in r
    assert any((setup["tmp"] / "reward-reused").glob("adapter/*.safetensors"))


def test_grpo_runs_from_the_same_config(setup, rewarded, tiny_model_dir) -> None:  # noqa: ANN001
    from tuneloop.stages import rl_stage

    cfg = _cfg(setup["tmp"] / "grpo", tiny_model_dir, trainer="grpo", max_steps=1)
    reg = Registry(cfg)
    parent = reg.start_pipeline_run("rl-grpo", "kfp-rl-grpo", {})
    r = rl_stage(cfg, parent, setup["sft"], setup["tmp"] / "reward", setup["tmp"] / "rl-grpo")
    assert r["steps"] == 1 and "distinct_2" in r["rl_final"] and "reward_mean" in r["rl_final"]


def test_reward_resumes_after_sigkill_of_a_rank_to_the_same_adapter(tmp_path, tiny_model_dir, monkeypatch) -> None:  # noqa: ANN001
    """SIGKILL of rank 1 after the first complete checkpoint; the rerun resumes from it and ends with the adapter
    (LoRA and score head) of an uninterrupted run."""
    import signal
    import threading
    import time
    from pathlib import Path

    import psutil
    from safetensors.torch import load_file

    from tuneloop.stages.train import reward_pairs
    from tuneloop.train.checkpoints import newest_complete, step_of
    from tuneloop.train.launch import build_spec, launch
    from tuneloop.train.local import TrainingFailed

    monkeypatch.setenv("TUNELOOP_ZERO3_PARTITION_ALL", "1")
    data = tmp_path / "dataset"
    tiny_training_files(data, tiny_model_dir, n_pref=24)
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, train__alignment="reward+rl",
                                  train__reward={**REWARD, "max_steps": 16, "per_device_batch_size": 2},
                                  train__checkpoint={"every_steps": 4, "keep": 2}))
    pairs = reward_pairs(cfg, data, tmp_path / "pairs")
    straight = launch(cfg, build_spec(cfg, "reward", tiny_model_dir, pairs, tmp_path / "straight",
                                      pipeline_run="straight"), "straight")
    spec = build_spec(cfg, "reward", tiny_model_dir, pairs, tmp_path / "killed", pipeline_run="killed")
    ckpts, box = Path(spec.checkpoint_dir), {}

    def first_launch() -> None:
        try:
            box["result"] = launch(cfg, spec, "killed")
        except BaseException as e:  # noqa: BLE001 - inspected below
            box["error"] = e

    t = threading.Thread(target=first_launch, daemon=True)
    t.start()
    end = time.monotonic() + 240
    while newest_complete(ckpts) is None and time.monotonic() < end:
        time.sleep(0.01)
    rank1 = [p for p in psutil.Process().children(recursive=True)
             if "tuneloop.train.reward" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"
             and "torch.distributed.run" not in " ".join(p.cmdline())]
    assert rank1, "rank 1 not found"
    rank1[0].send_signal(signal.SIGKILL)
    t.join(120)
    assert isinstance(box.get("error"), TrainingFailed), box
    first = newest_complete(ckpts)
    assert first is not None and step_of(first) < 16
    resumed = launch(cfg, spec, "killed")
    assert resumed["steps"] == 16 and resumed["resumed_from_step"] == step_of(first)
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("score" in k for k in a), sorted(a)[:5]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"reward resume: max |resumed - uninterrupted| over {len(a)} tensors = {worst:.3e}")
    assert worst <= 1e-6
    assert resumed["reward_eval"] == straight["reward_eval"]
