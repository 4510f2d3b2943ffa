"""Catastrophic forgetting is caught per slice: a candidate trained only on a new slice until it
forgets the old one is blocked by the forgetting gate, which names the slice; a candidate
trained on both slices passes. Real TRL training (tiny random Llama, one process), real
evaluation through `tuneloop evaluate`. On a random 2-layer model the 4-label routing task is
what a few dozen steps can teach, so routing is the old skill here and free-text QA the new one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.forgetting]
DEMO = Path(__file__).resolve().parents[2] / "src" / "tuneloop" / "demo" / "data"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
HP = {"max_steps": 80, "epochs": 1.0, "learning_rate": 2e-2, "per_device_batch_size": 8,
      "gradient_accumulation_steps": 1, "max_length": 128, "logging_steps": 10}
GATES = {
    "slices": {"ticket_routing": {"task": "classification", "labels": ["billing", "shipping", "account", "technical"]},
               "general_qa": {"task": "generation"}},
    "max_new_tokens": 4, "batch_size": 16, "bootstrap_samples": 1000,
    "gates": [{"metric": "nll", "slice": "general_qa", "max_regression": 0.10, "confidence": 0.9},
              {"metric": "nll", "slice": "ticket_routing", "max_regression": 0.10, "confidence": 0.9}],
}


def _train(model_dir: Path, files: list[str], out: Path, tmp: Path, *, replay_from: Path | None = None,
           replay_share: float = 0.0, sft: dict | None = None, init_adapter: Path | None = None,
           deepspeed: str = "none", nproc: int = 1, check_loss: bool = True, **spec: object) -> Path:
    """Ingest the demo files (plus `replay_share` of the champion's training records `replay_from`, as ingest
    replays them) and train an SFT adapter: HP updated with `sft`, continuing `init_adapter` when given."""
    from transformers import AutoTokenizer

    from tuneloop.config import DataConfig, DataSource, TrainConfig
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.data.ingest import ingest
    from tuneloop.data.replay import ChampionData
    from tuneloop.train.spec import JobSpec
    from tuneloop.train.local import launch_local

    data = out / "data"
    ingest(DataConfig(sources=[DataSource(path=str(DEMO / f)) for f in files],
                      eval=[DataSource(path=str(DEMO / "eval"))], replay_share=replay_share),
           ChatFormatter(AutoTokenizer.from_pretrained(str(model_dir))), data,
           champion=ChampionData("1", "-", replay_from) if replay_from else None)
    spec = JobSpec(stage="sft", base_model_dir=str(model_dir), data_path=str(data / "sft.jsonl"),
                   output_dir=str(out), init_adapter_dir=str(init_adapter) if init_adapter else None,
                   train=TrainConfig(sft={**HP, **(sft or {})}, lora=LORA, deepspeed=deepspeed, seed=1,
                                     nproc_per_node=nproc), **spec)
    result = launch_local(spec, nproc=nproc, state_dir=tmp, timeout_s=600)
    if check_loss:
        assert result["final_loss"] < result["first_loss"]
    return out / "adapter"


def _evaluate(candidate: Path, champion: Path, gates: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "evaluate", "--candidate", str(candidate),
                        "--champion", str(champion), "--data", str(DEMO / "eval"), "--gates", str(gates),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr  # 0 whether the gate passes or fails
    return json.loads((out / "gate.json").read_text())


def test_forgetting_gate_blocks_the_degraded_candidate_and_passes_the_good_one(tmp_path, tiny_model_dir):
    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump(GATES))
    champion = _train(tiny_model_dir, ["train/tickets.jsonl"], tmp_path / "champion", tmp_path)
    degraded = _train(tiny_model_dir, ["train/general.jsonl"], tmp_path / "degraded", tmp_path)
    good = _train(tiny_model_dir, ["train/general.jsonl", "train/tickets.jsonl"], tmp_path / "good", tmp_path)

    bad = _evaluate(degraded, champion, gates, tmp_path / "eval-degraded")
    assert bad["passed"] is False
    failed = [r for r in bad["rules"] if not r["passed"]]
    assert [r["slice"] for r in failed] == ["ticket_routing"], failed
    assert failed[0]["verdict"] == "fail"  # clear forgetting, not an inconclusive interval
    report = (tmp_path / "eval-degraded" / "report.md").read_text()
    assert "| ticket_routing | nll |" in report and "**FAIL**" in report

    ok = _evaluate(good, champion, gates, tmp_path / "eval-good")
    assert ok["passed"] is True, ok["rules"]
