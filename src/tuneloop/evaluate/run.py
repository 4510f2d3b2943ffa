"""Evaluate candidate and champion on the same held-out data, in one stage, and gate.

Writes into `out`:
    metrics.json      {candidate, champion, base: {slice: {metric: value}}, reference}
    predictions.jsonl one line per (model, record): prediction, reference, nll
    gate.json         the gate decision (see gates.py)
    report.md         per-slice comparison and the gate table
The champion is the registry's `champion` adapter; before there is one, the base model
stands in for it (it is what production would otherwise serve). The base model is always
scored too, so the gain of fine-tuning is visible on every run.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.evaluate.gates import apply_gates, gate_table
from tuneloop.evaluate.metrics import score_records, slice_metrics

REPORT_METRICS = ("accuracy", "macro_f1", "exact_match", "token_f1", "nll", "perplexity")


def _score(base_dir: Path, adapter: Path | None, records: list[dict[str, Any]], cfg: RunConfig) -> list[dict]:
    from tuneloop.models import load_causal_lm

    model, tok = load_causal_lm(base_dir, adapter)
    try:
        return score_records(model, tok, records, cfg.evaluate.batch_size, cfg.evaluate.max_new_tokens)
    finally:
        del model
        gc.collect()


def evaluate_models(cfg: RunConfig, base_dir: Path, eval_path: Path, candidate: Path, champion: Path | None,
                    reference_name: str, out: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{eval_path}: no evaluation records")
    out.mkdir(parents=True, exist_ok=True)
    scored = {"candidate": _score(base_dir, candidate, records, cfg), "base": _score(base_dir, None, records, cfg)}
    scored["champion"] = _score(base_dir, champion, records, cfg) if champion is not None else scored["base"]
    metrics = {who: slice_metrics(s, cfg.evaluate) for who, s in scored.items()}
    gate = apply_gates(cfg.evaluate.gates, metrics["candidate"], metrics["champion"], reference_name)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for who, rows in scored.items():
            for r in rows:
                f.write(json.dumps({"model": who, **r}, ensure_ascii=False) + "\n")
    public = {who: {sl: {k: v for k, v in m.items() if not k.startswith("per_record")} for sl, m in ms.items()}
              for who, ms in metrics.items()}
    (out / "metrics.json").write_text(json.dumps({**public, "reference": reference_name}, indent=2))
    (out / "gate.json").write_text(json.dumps(gate, indent=2))
    (out / "report.md").write_text(report_markdown(public, gate, reference_name))
    return {"metrics": public, "gate": gate, "reference": reference_name}


def report_markdown(metrics: dict[str, Any], gate: dict[str, Any], reference: str) -> str:
    lines = ["# Evaluation", "", f"Candidate vs {reference} (and the base model) on the held-out set.", ""]
    for sl in sorted(metrics["candidate"]):
        lines += [f"## slice `{sl}` (n={metrics['candidate'][sl]['n']})", "",
                  "| metric | candidate | reference | base |", "|---|---|---|---|"]
        for k in REPORT_METRICS:
            if k in metrics["candidate"][sl]:
                lines.append(f"| {k} | {metrics['candidate'][sl][k]:.4f} | {metrics['champion'][sl][k]:.4f} | "
                             f"{metrics['base'][sl][k]:.4f} |")
        lines.append("")
    lines.append(gate_table(gate))
    return "\n".join(lines)
