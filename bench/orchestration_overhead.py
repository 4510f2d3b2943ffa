"""Orchestration overhead: the pipeline through kfp.local vs the same stage functions called
directly in one process, on a tiny random model (real ZeRO-3 2-process training, real MLflow,
real gateway). Prints per-run wall times, what each task costs before and after its stage's own
work, the median and spread of each side and, as its last line,
    overhead_ratio=<median kfp.local time / median direct time>

    python bench/orchestration_overhead.py [--repeats N] [--cold]

Both sides run in the same invocation (alternating, each on a fresh state directory) so a
noisy machine affects both; the ratio uses the median of each side. kfp.local is run as
`tuneloop run` runs it: its tasks forked from one warm interpreter (tuneloop.warm_tasks).
--cold adds a third side, kfp.local starting every task in a fresh interpreter as it does by
itself (`tuneloop run --cold-tasks`), and prints its ratio too.

DeepSpeed's CPU communication op (deepspeed_shm_comm) is compiled once before anything is
timed, into one TORCH_EXTENSIONS_DIR that every run shares: a state directory that lives on
compiles it on its first run only (35-85 s here), and a fresh state directory per run would
add that one-time cost to every run of both sides.

Per-task start-up cost. Under kfp.local every task is a process of its own: forked from the warm
interpreter (the client's start, the fork, the stage's imports the server did not preload, opening
MLflow's sqlite store) or, cold, a fresh interpreter (kfp's executor, tuneloop.config,
tuneloop.stages, the stage's own imports, MLflow) that also has to exit; called directly, the
stages share one process. The table compares warm kfp.local with direct. The cost is read
from the run itself, not from a separate probe: stage i's task time is the gap between the end of
its MLflow stage run and the end of the previous one (the run's start for the first stage), and
its own time is the `stage_wall_s` metric the stage logs (stages.py: from before its nested run
opens to the end of its work). start-up = task time - own time: the interpreter start and imports
of this task, the exit of the previous one, kfp.local's bookkeeping between them, and
constructing the Registry (for the first stage also starting the gateway and, under kfp.local,
the orchestrator). The same figure for the direct side (the stage's lazy imports, paid
once per process) is printed next to it, and "added" is their difference. The time after the
last stage run (its task's exit, stopping the gateway, reading the summary back) is "tail".
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

SIDES = ("direct", "kfp_local")
LABELS = {"direct": "direct", "kfp_local": "kfp.local", "kfp_local_cold": "kfp.local cold"}


def build_deepspeed_cpu_op() -> None:
    """Compile (or find compiled) DeepSpeed's shm communication op in the shared TORCH_EXTENSIONS_DIR."""
    import subprocess
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def task_costs(cfg: Any, parent_run_id: str, started_ms: float, ended_ms: float) -> dict[str, dict[str, float]]:
    """{stage: {task_s, own_s, startup_s}} from the stage runs' end times and stage_wall_s, plus
    {"tail": {task_s}} for the time after the last stage run."""
    from tuneloop.registry import Registry

    prev = started_ms
    out: dict[str, dict[str, float]] = {}
    for run in Registry(cfg).stage_runs(parent_run_id):
        name = run.data.tags.get("tuneloop.stage", run.info.run_name)
        end = run.info.end_time or run.info.start_time
        task = (end - prev) / 1000
        own = run.data.metrics.get("stage_wall_s", 0.0)
        out[name] = {"task_s": task, "own_s": own, "startup_s": task - own}
        prev = end
    out["tail"] = {"task_s": (ended_ms - prev) / 1000, "own_s": 0.0, "startup_s": (ended_ms - prev) / 1000}
    return out


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def print_tasks(costs: dict[str, list[dict[str, dict[str, float]]]]) -> None:
    stages: list[str] = []
    for runs in costs.values():
        for r in runs:
            stages += [s for s in r if s not in stages]
    stages = [s for s in stages if s != "tail"] + ["tail"]

    def col(side: str, stage: str, key: str) -> float:
        return _med([r[stage][key] for r in costs[side] if stage in r])

    print("\nper task, medians in s (start-up = task - own; see the docstring)")
    print(f"{'stage':19s} | {'kfp.local task':>14s} {'own':>7s} {'start-up':>8s} | {'direct task':>11s} {'own':>7s} "
          f"{'start-up':>8s} | {'added':>7s}")
    total_k = total_d = 0.0
    for s in stages:
        k_task, k_own, k_up = (col("kfp_local", s, key) for key in ("task_s", "own_s", "startup_s"))
        d_task, d_own, d_up = (col("direct", s, key) for key in ("task_s", "own_s", "startup_s"))
        total_k += 0.0 if math.isnan(k_up) else k_up
        total_d += 0.0 if math.isnan(d_up) else d_up
        print(f"{s:19s} | {k_task:14.1f} {k_own:7.1f} {k_up:8.1f} | {d_task:11.1f} {d_own:7.1f} {d_up:8.1f} | "
              f"{k_up - d_up:7.1f}")
    n = len(stages) - 1
    print(f"start-up over {n} tasks + tail: kfp.local {total_k:.1f} s ({total_k / max(n, 1):.1f} s/task), "
          f"direct {total_d:.1f} s, added {total_k - total_d:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3,
                    help="whole-pipeline runs per side, alternating direct and kfp.local (default 3; each pair "
                         "takes ~1.5 min on 2 cores, --cold adds ~1.5 min); the ratio uses the median of each side")
    ap.add_argument("--cold", action="store_true",
                    help="also run kfp.local with every task in a fresh interpreter (tuneloop run --cold-tasks) "
                         "as a third side, and print its ratio against direct")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    sides = SIDES + (("kfp_local_cold",) if args.cold else ())
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tuneloop-torch-extensions"))
    build_deepspeed_cpu_op()
    logging.basicConfig(level=logging.WARNING)
    from tuneloop.config import load_config
    from tuneloop.deploy.canary import start_gateway, stop_gateway
    from tuneloop.orchestrate import run_direct, run_local
    from tuneloop.tiny import build_tiny_model
    from tuneloop.tiny import tiny_run_config as tiny_config

    root = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    model = build_tiny_model(root / "model")
    times: dict[str, list[float]] = {side: [] for side in sides}
    costs: dict[str, list[dict[str, dict[str, float]]]] = {side: [] for side in sides}
    for i in range(args.repeats):
        for side in sides:
            cfg = load_config(tiny_config(root / f"{side}-{i}", model))
            started_ms = time.time() * 1000
            started = time.perf_counter()
            if side.startswith("kfp_local"):
                summary = run_local(cfg, f"bench-{side}-{i}", warm_tasks=side == "kfp_local")
            else:
                gw = start_gateway(cfg)
                try:
                    summary = run_direct(cfg, f"bench-{side}-{i}", root / f"{side}-{i}" / "work")
                finally:
                    stop_gateway(gw)
            wall = time.perf_counter() - started
            ended_ms = time.time() * 1000
            times[side].append(wall)
            costs[side].append(task_costs(cfg, summary["parent_run_id"], started_ms, ended_ms))
            print(f"{LABELS[side]:14s} run {i}: {wall:6.1f} s  outcome: {summary['outcome']}", flush=True)
    print_tasks(costs)
    k, d = statistics.median(times["kfp_local"]), statistics.median(times["direct"])
    for side in sides:
        ts = times[side]
        print(f"{LABELS[side]:14s} median {statistics.median(ts):6.1f} s, spread {min(ts):.1f}-{max(ts):.1f} s "
              f"({max(ts) - min(ts):.1f} s) over {len(ts)} runs")
    if "kfp_local_cold" in times:
        c = statistics.median(times["kfp_local_cold"])
        print(f"cold tasks: median {c:.1f} s, ratio to direct {c / d:.3f}; warm tasks save {c - k:.1f} s")
    print(f"median kfp.local {k:.1f} s, direct {d:.1f} s, added {k - d:.1f} s")
    print(f"overhead_ratio={k / d:.3f}")


if __name__ == "__main__":
    main()
