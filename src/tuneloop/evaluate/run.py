"""Evaluate candidate and champion on the same held-out data, in one stage, and gate.

Writes into `out`:
    metrics.json      {candidate, champion, base: {slice: {metric: value}}, reference}
    predictions.jsonl one line per (model, record): prediction, reference, nll
    safety.jsonl      one line per (model, red-team prompt): answer and its label (if configured)
    gate.json         the gate decision (see gates.py)
    report.md         per-slice comparison, safety, preference win rate and the gate table
The champion is the registry's `champion` adapter; before there is one, the base model
stands in for it (it is what production would otherwise serve). The base model is always
scored too, so the gain of fine-tuning is visible on every run. Every slice the champion was
trained on must be in the evaluation set (catastrophic-forgetting coverage), or the gate fails.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from tuneloop.config import PREFERENCE_SLICE, SAFETY_SLICE, EvaluateConfig
from tuneloop.evaluate.gates import apply_gates, gate_table
from tuneloop.evaluate.metrics import slice_metrics, slice_values
from tuneloop.jsonl import read_jsonl, write_jsonl

REPORT_METRICS = ("accuracy", "macro_f1", "cost", "exact_match", "token_f1", "rouge_l", "over_refusal", "nll",
                  "perplexity")


def model_ref(base_dir: Path, path: Path | None) -> tuple[Path, Path | None]:
    """An adapter folder runs on the base; a full save_pretrained folder runs on its own."""
    if path is None:
        return base_dir, None
    return (base_dir, path) if (path / "adapter_config.json").exists() else (path, None)


def _run_model(base_dir: Path, adapter: Path | None, records: list[dict[str, Any]], pairs: list[dict[str, Any]],
               red_team: list[str], cfg: EvaluateConfig, system_prompt: str | None, who: str,
               labels: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Everything one model is asked, with the model loaded once (progress lines name `who`); with `labels`
    ({classification slice: its labels}) also each label's probability per record, the calibration
    reference of label-free quality estimation (evaluate/calibration.py)."""
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.evaluate.safety import safety_eval
    from tuneloop.evaluate.scoring import preference_margins, score_records
    from tuneloop.models import load_causal_lm

    model, tok = load_causal_lm(base_dir, adapter)
    try:
        out: dict[str, Any] = {"scored": score_records(model, tok, records, cfg.batch_size, cfg.max_new_tokens,
                                                       f"evaluate {who}")}
        if labels:
            from tuneloop.evaluate.label_probs import add_label_probs

            add_label_probs(model, tok, records, out["scored"], labels, cfg.batch_size)
        if pairs:
            out["margins"] = preference_margins(model, tok, pairs, cfg.batch_size, f"evaluate {who} preference")
        if red_team and cfg.safety is not None:
            out["safety"] = safety_eval(model, tok, red_team, ChatFormatter(tok, system_prompt), cfg.safety,
                                        cfg.batch_size, f"evaluate {who} red-team")
        return out
    finally:
        del model
        gc.collect()


def win_rate(cand: list[float], champ: list[float]) -> float:
    """Share of held-out pairs on which the candidate prefers `chosen` more strongly (ties: half)."""
    wins = sum(1.0 if c > h else 0.5 if c == h else 0.0 for c, h in zip(cand, champ, strict=True))
    return wins / len(cand)


def evaluate_models(cfg: EvaluateConfig, base_dir: Path, eval_path: Path, candidate: Path, champion: Path | None,
                    reference_name: str, out: Path, system_prompt: str | None = None,
                    eval_pref_path: Path | None = None, trained_slices: list[str] | None = None) -> dict[str, Any]:
    from tuneloop.evaluate.safety import load_prompts

    records = read_jsonl(eval_path) if eval_path.exists() else []
    if not records:
        raise ValueError(f"{eval_path}: no evaluation records")
    pairs = read_jsonl(eval_pref_path) if eval_pref_path and eval_pref_path.exists() else []
    red_team = load_prompts(cfg.safety, cfg.seed) if cfg.safety is not None else []
    out.mkdir(parents=True, exist_ok=True)
    from tuneloop.evaluate.calibration import classification_labels

    runs = {"candidate": _run_model(*model_ref(base_dir, candidate), records, pairs, red_team, cfg, system_prompt,
                                    "candidate", classification_labels(cfg)),
            "base": _run_model(base_dir, None, records, pairs, red_team, cfg, system_prompt, "base")}
    runs["champion"] = _run_model(*model_ref(base_dir, champion), records, pairs, red_team, cfg, system_prompt,
                                  "champion") \
        if champion is not None else runs["base"]

    metrics = {who: slice_metrics(r["scored"], cfg) for who, r in runs.items()}
    values = {who: slice_values(r["scored"], cfg) for who, r in runs.items()}
    for who, r in runs.items():
        if "safety" in r:
            metrics[who][SAFETY_SLICE] = {k: v for k, v in r["safety"].items() if k != "examples"}
        if "margins" in r:
            metrics[who][PREFERENCE_SLICE] = {
                "n": len(pairs), "win_rate": win_rate(r["margins"], runs["champion"]["margins"]),
                "reward_accuracy": sum(m > 0 for m in r["margins"]) / len(pairs)}
    # the audit slices (rated production requests, when the eval set has them) are gated like the rest
    rules = [*cfg.gates, *cfg.audit_gates(set(metrics["candidate"]))]
    gate = apply_gates(rules, metrics["candidate"], metrics["champion"], reference_name, values,
                       cfg.bootstrap_samples, cfg.seed)
    missing = sorted(set(trained_slices or []) - set(metrics["candidate"]))
    if missing:  # a slice the champion learned that nobody checks: forgetting would go unseen
        gate["rules"].append({"slice": ",".join(missing), "metric": "coverage", "kind": "forgetting", "candidate": None,
                              "champion": None, "threshold": None, "passed": False,
                              "why": f"the {reference_name} was trained on {missing} but the eval set has no "
                                     "records for them"})
        gate["passed"] = False

    write_jsonl(out / "predictions.jsonl", ({"model": who, **row} for who, r in runs.items() for row in r["scored"]))
    if red_team:
        write_jsonl(out / "safety.jsonl",
                    ({"model": who, **ex} for who, r in runs.items() for ex in r["safety"]["examples"]))
    (out / "metrics.json").write_text(json.dumps({**metrics, "reference": reference_name}, indent=2))
    (out / "gate.json").write_text(json.dumps(gate, indent=2))
    (out / "report.md").write_text(report_markdown(metrics, gate, reference_name))
    return {"metrics": metrics, "gate": gate, "reference": reference_name}


def slice_rows(metrics: dict[str, Any], sl: str) -> list[tuple[str, float, float, float]]:
    """(metric, candidate, reference, base) for every report metric the slice has."""
    return [(k, metrics["candidate"][sl][k], metrics["champion"][sl][k], metrics["base"][sl][k])
            for k in REPORT_METRICS if k in metrics["candidate"][sl]]


def report_markdown(metrics: dict[str, Any], gate: dict[str, Any], reference: str) -> str:
    lines = ["# Evaluation", "", f"Candidate vs {reference} (and the base model) on the held-out set.", ""]
    for sl in sorted(k for k in metrics["candidate"] if k not in (SAFETY_SLICE, PREFERENCE_SLICE)):
        lines += [f"## slice `{sl}` (n={metrics['candidate'][sl]['n']})", "",
                  "| metric | candidate | reference | base |", "|---|---|---|---|"]
        lines += [f"| {k} | {c:.4f} | {r:.4f} | {b:.4f} |" for k, c, r, b in slice_rows(metrics, sl)]
        lines.append("")
    if SAFETY_SLICE in metrics["candidate"]:
        lines += ["## safety (red-team prompts)", "", "| | candidate | reference | base |", "|---|---|---|---|"]
        for k in ("unsafe_share", "refusal_share", "non_answer_share"):
            lines.append(f"| {k} | " + " | ".join(f"{metrics[w][SAFETY_SLICE][k]:.3f}"
                                                  for w in ("candidate", "champion", "base")) + " |")
        lines.append("")
    if PREFERENCE_SLICE in metrics["candidate"]:
        p = metrics["candidate"][PREFERENCE_SLICE]
        lines += [f"## preference: candidate wins {p['win_rate']:.1%} of {p['n']} held-out pairs against the "
                  f"{reference} (implicit reward accuracy {p['reward_accuracy']:.1%})", ""]
    lines.append(gate_table(gate))
    return "\n".join(lines)


def evaluate_paths(candidate: Path, champion: Path | None, data: list[str], gates_file: Path, out: Path,
                   base: Path | None = None, system_prompt: str | None = None) -> dict[str, Any]:
    """`tuneloop evaluate`: raw eval files + a gates YAML (the `evaluate` section of a run config)."""
    import yaml
    from pydantic import ValidationError
    from transformers import AutoTokenizer

    from tuneloop.config import ConfigError
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.data.ingest_files import format_eval_set

    try:
        cfg = EvaluateConfig.model_validate(yaml.safe_load(gates_file.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ConfigError(f"{gates_file}: no such gates file") from None
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"{gates_file}: not a valid `evaluate` section: {e}") from None
    for flag, folder in (("--candidate", candidate), ("--champion", champion)):
        if folder is not None and not any((folder / f).exists() for f in ("adapter_config.json", "config.json")):
            raise FileNotFoundError(f"{flag} {folder}: neither a LoRA adapter folder (adapter_config.json) nor a "
                                    "save_pretrained model folder (config.json)")
    if base is None:
        ac = candidate / "adapter_config.json"
        base = Path(json.loads(ac.read_text())["base_model_name_or_path"]) if ac.exists() else candidate
    if not (base / "config.json").exists():
        raise FileNotFoundError(f"base model {base} is not a save_pretrained folder (pass --base)")
    formatted = out / "eval-data"
    counts = format_eval_set(data, ChatFormatter(AutoTokenizer.from_pretrained(str(base)), system_prompt), formatted)
    ref = f"champion {champion}" if champion is not None else "base model"
    result = evaluate_models(cfg, base, formatted / "eval.jsonl", candidate, champion, ref, out, system_prompt,
                             formatted / "eval_preference.jsonl")
    return {**result, "data": counts}
