"""The contract between a launcher and its training worker: `JobSpec`, written as job_spec.json.

It carries the validated `train` section of the run config itself (pydantic dump on the launcher's
side, validation again on every rank), so a field keeps its type and its name from YAML to the
worker; only where the field meets HF/TRL is it renamed (train/common.py: trainer_arguments).
Datasets, models and adapters travel as paths in durable storage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneloop.config.align import RewardConfig, RLConfig
from tuneloop.config.train import DPOConfig, SFTConfig, TrainConfig

if TYPE_CHECKING:
    from tuneloop.config import RunConfig


class JobSpec(BaseModel):
    """Everything one training worker needs; written by the launcher, read by every rank."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["sft", "dpo", "reward", "rl"]
    base_model_dir: str
    data_path: str
    output_dir: str
    train: TrainConfig = Field(default_factory=TrainConfig)  # the run config's `train` section
    init_adapter_dir: str | None = None  # DPO and RL continue the SFT adapter
    reward_adapter_dir: str | None = None  # RL: the reward model's LoRA adapter (sequence classification on the base)
    mlflow: dict[str, str] = Field(default_factory=dict)  # tracking_uri, run_id: live metrics
    persistence_threshold_zero: bool = False  # tests: force ZeRO-3 to partition tiny models
    checkpoint_dir: str | None = None  # durable: <state_dir>/checkpoints/<pipeline run>/<stage>
    checkpoint_mirror: str | None = None  # s3://... copy of every complete checkpoint

    @property
    def section(self) -> SFTConfig | DPOConfig | RewardConfig | RLConfig:
        """This stage's section of the train config (train.sft, .dpo, .reward or .rl)."""
        return getattr(self.train, self.stage)

    def write(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def read(cls, path: str | Path) -> JobSpec:
        return cls.model_validate_json(Path(path).read_text())


def checkpoint_dir(state_dir: Path, pipeline_run: str, stage: str) -> Path:
    """Durable checkpoints of one stage of one pipeline run: a rerun of that run finds them."""
    return state_dir / "checkpoints" / pipeline_run / stage


def build_spec(cfg: RunConfig, stage: str, base_dir: Path, data_path: Path, out_dir: Path,
               init_adapter: Path | None = None, mlflow_run: dict[str, str] | None = None,
               pipeline_run: str = "adhoc", reward_adapter: Path | None = None) -> JobSpec:
    """The spec of one stage of one pipeline run, from the run config."""
    t = cfg.train
    mirror = f"{t.checkpoint.uri.rstrip('/')}/{pipeline_run}/{stage}" if t.checkpoint.uri else None
    return JobSpec(stage=stage, base_model_dir=str(base_dir), data_path=str(data_path), output_dir=str(out_dir),
                   train=t, init_adapter_dir=str(init_adapter) if init_adapter else None, mlflow=mlflow_run or {},
                   persistence_threshold_zero=os.environ.get("TUNELOOP_ZERO3_PARTITION_ALL") == "1",
                   checkpoint_dir=str(checkpoint_dir(cfg.state_path, pipeline_run, stage).resolve()),
                   checkpoint_mirror=mirror, reward_adapter_dir=str(reward_adapter) if reward_adapter else None)
