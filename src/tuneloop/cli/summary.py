"""What the CLI prints after a pipeline run: stages, gates, gains per slice, canary, registry.

The same story is the pipeline run's description in MLflow (stages.tell_story); numbers are rounded as
there (evaluate/model_card.num: 0.667, 211,797), the canary's checks show their test, statistic,
p-value and threshold."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 200)  # CI and KFP logs: no truncated cells


def fmt(x: Any, signed: bool = False) -> str:
    from tuneloop.evaluate.model_card import num  # lazily: the CLI's start stays light

    return num(x, signed)


def print_summary(s: dict[str, Any], cfg: Any) -> None:
    console.rule("summary")
    t = Table(title=f"pipeline run {s['run_name']}: {s['outcome']}")
    for col in ("stage", "status", "wall s", "outcome"):
        t.add_column(col)
    for st in s["stages"]:
        t.add_row(st["stage"], st["status"], fmt(st["wall_s"]), st["outcome"])
    console.print(t)
    if s.get("validation"):
        v = s["validation"]
        console.print(f"data gate: {'PASSED' if v['passed'] else 'FAILED'} "
                      f"({len(v['checks']) - len(v['failed'])}/{len(v['checks'])} checks)")
        for c in v["failed"]:
            what = c.get("message") or f"{c['table']} {c['expectation']} {c['column']}: {c['observed']}"
            console.print(f"  FAIL {what}" + (f" [config: {c['config_key']}]" if c.get("config_key") else ""))
    if s.get("gate"):
        g = s["gate"]
        gt = Table(title=f"evaluation gate: {'PASSED' if g['passed'] else 'FAILED'} (reference: {g['reference']})")
        for col in ("slice", "metric", "candidate", "reference", "threshold", "result"):
            gt.add_column(col)
        for r in g["rules"]:
            gt.add_row(r["slice"], r["metric"], fmt(r["candidate"]), fmt(r["champion"]),
                       f"{r['kind']} {fmt(r['threshold'])}", "pass" if r["passed"] else "FAIL")
        console.print(gt)
    if s.get("metrics"):
        m = s["metrics"]
        mt = Table(title="candidate vs base model, per slice")
        for col in ("slice", "metric", "base", "candidate", "gain"):
            mt.add_column(col)
        for sl in sorted(k for k in m["candidate"] if k != "all"):
            for k in ("accuracy", "exact_match", "token_f1", "over_refusal", "nll"):
                if k in m["candidate"][sl]:
                    b, c = m["base"][sl][k], m["candidate"][sl][k]
                    mt.add_row(sl, k, fmt(b), fmt(c), fmt(c - b, signed=True))
        console.print(mt)
    if s.get("canary"):
        from tuneloop.evaluate.model_card import canary_tests

        c = s["canary"]
        ct = Table(title=f"canary analysis: {c['decision'].upper()} (alpha {cfg.deploy.canary.alpha})")
        for col in ("check", "test", "statistic", "p-value", "threshold", "result"):
            ct.add_column(col)
        for t in canary_tests(c, cfg.deploy.canary):
            ct.add_row(t["check"], t["test"], fmt(t["statistic"]), fmt(t["p_value"]), t["threshold"],
                       "pass" if t["passed"] else "FAIL")
        console.print(ct)
    _alignment(s)
    if (ladder := s.get("repair")) and ladder.get("ran"):
        lt = Table(title=f"forgetting repair: {'REPAIRED by ' + ladder['winner'] if ladder['winner'] else 'no repair'}"
                         f" (old slices {', '.join(ladder['old_slices']) or '-'}, {fmt(ladder['wall_s'])} s)")
        for col in ("#", "mitigation", "gate", "wall s", "error"):
            lt.add_column(col)
        for i, a in enumerate(ladder["attempts"], 1):
            lt.add_row(str(i), a["mitigation"], "pass" if a["passed"] else "FAIL", fmt(a["wall_s"]),
                       a.get("error") or "")
        console.print(lt)
    aliases = ", ".join(f"{a}=v{v}" for a, v in s["aliases"].items()) or "none"
    console.print(f"registry: model [bold]{s['model_name']}[/bold], this run's version: "
                  f"{('v' + s['model_version']) if s['model_version'] else 'none (not registered)'}; aliases: {aliases}")
    if s["model_version"]:
        console.print(f"MLflow model: mlflow.pyfunc.load_model(\"models:/{s['model_name']}/{s['model_version']}\") "
                      "answers a prompt; the run's description in MLflow is this summary")
    console.print(f"MLflow run: {s['parent_run_id']} (experiment {s['experiment_id']}) at {s['tracking_uri']}")
    if "pipeline_wall_s" in s:
        console.print(f"pipeline wall time: {s['pipeline_wall_s']:.0f} s")
    if s["tracking_uri"].startswith("sqlite:"):
        root = cfg.state_path
        console.print(f"open the MLflow UI: mlflow ui --backend-store-uri {s['tracking_uri']} "
                      f"--default-artifact-root {root / 'mlartifacts'} --port 5000  "
                      f"(then http://127.0.0.1:5000/#/experiments/{s['experiment_id']}/runs/{s['parent_run_id']})")




def _alignment(s: dict[str, Any]) -> None:
    """The reward model's held-out accuracy and the RL stage's watched metrics (train.alignment reward+rl)."""
    if (r := s.get("reward")) and r.get("slices"):
        rt = Table(title=f"reward model: held-out pairwise accuracy {fmt(r['accuracy'])} over {r['pairs']} pairs")
        for col in ("slice", "pairs", "accuracy"):
            rt.add_column(col)
        for name, v in r["slices"].items():
            rt.add_row(name, str(v["pairs"]), fmt(v["accuracy"]))
        console.print(rt)
    if (w := s.get("rl")) and w.get("history"):
        first, last = w["history"][0], w["history"][-1]
        title = f"STOPPED - {w['stopped']}" if w.get("stopped") else f"{last['step']} steps, no guard fired"
        rt = Table(title=f"rl: {title}")
        for col in ("metric", f"step {first['step']}", f"step {last['step']}"):
            rt.add_column(col)
        for k in ("reward_mean", "reward_std", "kl", "mean_length", "length_growth", "distinct_2",
                  "empty_or_clipped_share"):
            if k in last:
                rt.add_row(k, fmt(first.get(k)), fmt(last[k]))
        console.print(rt)
