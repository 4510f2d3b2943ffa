from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from tuneloop.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def sft(config: dict, parent_run_id: str, dataset: Input[Dataset], adapter: Output[Model]):
    """Supervised fine-tuning (TRL SFTTrainer, LoRA) under DeepSpeed; outputs the adapter folder."""
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import sft_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = sft_stage(parse_config(config), parent_run_id, Path(dataset.path), Path(adapter.path))
    adapter.metadata.update({k: r[k] for k in ("steps", "final_loss") if k in r})


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def dpo(config: dict, parent_run_id: str, dataset: Input[Dataset], sft_adapter: Input[Model],
        adapter: Output[Model]):
    """Preference tuning (TRL DPOTrainer) continuing the SFT adapter; reference = adapter-disabled base."""
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import dpo_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = dpo_stage(parse_config(config), parent_run_id, Path(dataset.path), Path(sft_adapter.path),
                  Path(adapter.path))
    adapter.metadata.update({k: r[k] for k in ("steps", "final_loss") if k in r})


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def reward(config: dict, parent_run_id: str, dataset: Input[Dataset], reward_model: Output[Model]):
    """Reward model (TRL RewardTrainer, LoRA sequence classification) on preference + safety pairs, gated on
    held-out pairwise accuracy per slice and registered as <model_name>-reward, or the champion one reused;
    alignment reward+rl only (otherwise it returns at once)."""
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import reward_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = reward_stage(parse_config(config), parent_run_id, Path(dataset.path), Path(reward_model.path))
    reward_model.metadata.update({k: r[k] for k in ("steps", "version", "reused_version") if k in r})


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def rl(config: dict, parent_run_id: str, policy_adapter: Input[Model], reward_model: Input[Model],
       adapter: Output[Model]):
    """Online RL (TRL RLOO or GRPO) from the SFT adapter against the reward model, KL to the SFT policy, with
    reward-hacking guards that fail the task with their reason; off the reward+rl path it passes its input
    adapter (dpo's) through."""
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import rl_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = rl_stage(parse_config(config), parent_run_id, Path(policy_adapter.path), Path(reward_model.path),
                 Path(adapter.path))
    adapter.metadata.update({k: r[k] for k in ("steps",) if k in r})
