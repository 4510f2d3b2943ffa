"""Memory estimate vs measured peak: SFT on the demo's base model (SmolLM2-135M-Instruct, LoRA, fp32,
ZeRO-3 on 2 CPU processes) for a few configs, a handful of steps each. The estimate is what
check_prerequisites compares with the host's memory (tuneloop/train/memory.py); the measured figure is
the largest peak resident set of any rank (`peak_rss_mb` in train_metrics.json). Rows are packed to
max_length, so every step runs full-length rows - the case the estimate is made for.

    python bench/memory_estimate.py [--steps N] [--repeats N] [--configs NAME,...]

Prints one row per config (median of the repeats with min-max), and as its last line
    max_underestimate=<largest measured/estimate ratio>
Needs ~20 GB free for the largest config; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {  # name -> train.sft overrides (and train-level ones)
    "demo": {"per_device_batch_size": 8, "max_length": 160},
    "b4x256": {"per_device_batch_size": 4, "max_length": 256},
    "b8x384": {"per_device_batch_size": 8, "max_length": 384},
    "b8x384+gc": {"per_device_batch_size": 8, "max_length": 384, "gradient_checkpointing": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per config; the median is printed (default 1)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--state-dir", default=str(Path(tempfile.gettempdir()) / "tuneloop-bench-memory"),
                    help="where the base model is converted once and kept between runs")
    args = ap.parse_args()

    from tuneloop.config import demo_config_path, load_config
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.data.ingest import ingest
    from tuneloop.models import materialize_base_model
    from tuneloop.train.launch import build_spec
    from tuneloop.train.local import OutOfMemory, launch_local
    from tuneloop.train.memory import GiB, ModelShape, estimate

    rows = []
    for name in args.configs.split(","):
        over = dict(CONFIGS[name])
        gc = over.pop("gradient_checkpointing", False)
        cfg = load_config(demo_config_path(), state_dir=args.state_dir)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
            "gradient_checkpointing": gc, "sft": cfg.train.sft.model_copy(update={
                **over, "max_steps": args.steps, "packing": True, "logging_steps": 1})})})
        base = materialize_base_model(cfg.base_model, cfg.state_path)
        work = Path(tempfile.mkdtemp(prefix=f"mem-{name}-"))
        from transformers import AutoTokenizer

        ingest(cfg.data, ChatFormatter(AutoTokenizer.from_pretrained(str(base)), cfg.data.system_prompt),
               work / "dataset", [], None)
        est = estimate(cfg.train, "sft", ModelShape.from_config(base), cfg.train.nproc_per_node, cuda=False)
        measured = []
        for i in range(args.repeats):
            spec = build_spec(cfg, "sft", base, work / "dataset" / "sft.jsonl", work / f"out{i}",
                              pipeline_run=f"mem-{name}-{i}")
            spec.checkpoint_dir = None
            try:
                result = launch_local(spec, cfg.train.nproc_per_node, cfg.state_path, 3600)
            except OutOfMemory as e:  # the kernel killed a rank: the estimate should have refused it
                print(f"{name:10s} estimate {est.gib:5.2f} GiB  measured: KILLED for memory ({str(e).splitlines()[0]})",
                      flush=True)
                break
            measured.append(result["peak_rss_mb"] * 1024 * 1024 / GiB)
        if not measured:
            continue
        med = statistics.median(measured)
        rows.append((name, est.gib, med, min(measured), max(measured), med / est.gib))
        print(f"{name:10s} estimate {est.gib:5.2f} GiB  measured {med:5.2f} GiB (min {min(measured):.2f}, "
              f"max {max(measured):.2f}, n={len(measured)})  measured/estimate {med / est.gib:.2f}  "
              f"[{est.describe()}]", flush=True)
    print(json.dumps([dict(zip(("config", "estimate_gib", "measured_gib", "min", "max", "ratio"), r)) for r in rows]))
    print(f"max_underestimate={max(r[5] for r in rows):.2f}")


if __name__ == "__main__":
    main()
