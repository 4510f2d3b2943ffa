"""Orchestration overhead: the pipeline through kfp.local vs the same stage functions called
directly in one process, on a tiny random model (real ZeRO-3 2-process training, real MLflow,
real gateway). Prints per-run wall times and, as its last line,
    overhead_ratio=<kfp.local time / direct time>

    python bench/orchestration_overhead.py [--repeats N]

Both sides run in the same invocation (alternating, each on a fresh state directory) so a
noisy machine affects both; the ratio uses the median of each side.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="runs per side (the ratio uses medians)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tuneloop.config import load_config
    from tuneloop.deploy.canary import start_gateway, stop_gateway
    from tuneloop.orchestrate import run_direct, run_local
    from tuneloop.tiny import build_tiny_model
    from tuneloop.tiny import tiny_run_config as tiny_config

    root = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    model = build_tiny_model(root / "model")
    times: dict[str, list[float]] = {"kfp_local": [], "direct": []}
    for i in range(args.repeats):
        for side in ("direct", "kfp_local"):
            cfg = load_config(tiny_config(root / f"{side}-{i}", model))
            started = time.perf_counter()
            if side == "kfp_local":
                summary = run_local(cfg, f"bench-{side}-{i}")
            else:
                gw = start_gateway(cfg)
                try:
                    summary = run_direct(cfg, f"bench-{side}-{i}", root / f"{side}-{i}" / "work")
                finally:
                    stop_gateway(gw)
            wall = time.perf_counter() - started
            times[side].append(wall)
            print(f"{side:10s} run {i}: {wall:6.1f} s  outcome: {summary['outcome']}", flush=True)
    k, d = statistics.median(times["kfp_local"]), statistics.median(times["direct"])
    print(f"median kfp.local {k:.1f} s, direct {d:.1f} s, added {k - d:.1f} s")
    print(f"overhead_ratio={k / d:.3f}")


if __name__ == "__main__":
    main()
