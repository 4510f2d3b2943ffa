"""The run config's training fields reach TRL under TRL's names, and TRL accepts every one of them."""

from __future__ import annotations

import pytest

from tuneloop.config import TrainConfig
from tuneloop.train.common import trainer_arguments
from tuneloop.train.spec import JobSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trl_accepts_the_arguments_built_from_the_config(tmp_path, stage):
    import trl

    train = TrainConfig.model_validate({"deepspeed": "none", stage: {"warmup_ratio": 0.1, "max_length": 64,
                                                                     "per_device_batch_size": 3}})
    spec = JobSpec(stage=stage, base_model_dir="/m", data_path="/d", output_dir=str(tmp_path), train=train)
    args = (trl.SFTConfig if stage == "sft" else trl.DPOConfig)(**trainer_arguments(spec))
    assert args.get_warmup_steps(100) == 10  # warmup_ratio 0.1 of 100 optimizer steps
    assert args.per_device_train_batch_size == 3 and args.max_length == 64
    if stage == "sft":
        assert args.packing is True and args.completion_only_loss is True
    else:
        assert args.beta == train.dpo.beta
