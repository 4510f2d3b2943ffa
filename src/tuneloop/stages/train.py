"""Stages 4-5: SFT and DPO through the training launchers (local torchrun, TrainJob, PyTorchJob)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.registry import Registry
from tuneloop.stages.common import timed_stage, base_model_dir


# 4, 5 ----------------------------------------------------------------------------------------
def _train(cfg: RunConfig, parent_id: str, stage: str, data: Path, out: Path,
           init_adapter: Path | None) -> dict[str, Any]:
    from tuneloop.evaluate.model_card import num
    from tuneloop.train.launch import build_spec, launch

    reg = Registry(cfg)
    section = cfg.train.sft if stage == "sft" else cfg.train.dpo

    def run(run_id: str) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        if not section.enabled or not data.read_text().strip():
            reason = "disabled" if not section.enabled else "no training records"
            if init_adapter is None:
                raise RuntimeError(f"{stage}: {reason} and there is no adapter to pass on")
            shutil.copytree(init_adapter, out / "adapter", dirs_exist_ok=True)
            return {"outcome": f"skipped ({reason}); adapter passed through", "skipped": True}
        reg.log_params(run_id, {f"{stage}.{k}": v for k, v in section.model_dump().items()})
        reg.log_params(run_id, {"deepspeed": cfg.train.deepspeed, "nproc_per_node": cfg.train.nproc_per_node,
                                "backend": cfg.train.backend, "num_nodes": cfg.train.num_nodes,
                                "method": cfg.train.method,
                                **{f"lora.{k}": v for k, v in cfg.train.lora.model_dump().items()}})
        spec = build_spec(cfg, stage, base_model_dir(cfg), data, out, init_adapter,
                          {"tracking_uri": reg.uri, "run_id": run_id}, pipeline_run=parent_id)
        result = launch(cfg, spec, parent_id)  # a rerun of this pipeline run resumes from its checkpoints
        reg.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool)})
        outcome = (f"{result['steps']} steps, loss {num(result['first_loss'])} -> {num(result['final_loss'])}, "
                   f"{result['tokens_per_s']:.0f} tokens/s")
        resumed = result.get("resumed_from_step")
        return {**result, "adapter": str(out / "adapter"), "outcome": outcome,
                "description": f"**{stage}: {outcome}** - {cfg.train.deepspeed}, {cfg.train.nproc_per_node} processes "
                               f"per node x {cfg.train.num_nodes} nodes ({cfg.train.backend})"
                               + (f"; resumed from the checkpoint at step {resumed}" if resumed else "")
                               + f"; the adapter goes on to {'dpo' if stage == 'sft' else 'evaluate'}."}

    return timed_stage(reg, parent_id, stage, run)


def sft_stage(cfg: RunConfig, parent_id: str, dataset: Path, out: Path) -> dict[str, Any]:
    return _train(cfg, parent_id, "sft", dataset / "sft.jsonl", out, None)


def dpo_stage(cfg: RunConfig, parent_id: str, dataset: Path, sft_out: Path, out: Path) -> dict[str, Any]:
    return _train(cfg, parent_id, "dpo", dataset / "preference.jsonl", out, sft_out / "adapter")
