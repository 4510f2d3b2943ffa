"""The promotion gate: declarative rules over per-slice metrics -> one explained decision.

A rule compares the candidate with an absolute bound (`min` / `max`) or with the champion
(`max_regression`: the largest allowed change for the worse, in the metric's own units).
The decision is a plain dict written as gate.json:
    {passed, reference, rules: [{slice, metric, kind, candidate, champion, threshold, passed, why}]}
"""

from __future__ import annotations

from typing import Any

from tuneloop.config import HIGHER_IS_BETTER, GateRule


def apply_gates(rules: list[GateRule], candidate: dict[str, dict[str, Any]],
                champion: dict[str, dict[str, Any]], reference: str) -> dict[str, Any]:
    out = []
    for rule in rules:
        cand = candidate.get(rule.slice, {}).get(rule.metric)
        champ = champion.get(rule.slice, {}).get(rule.metric)
        hib = HIGHER_IS_BETTER[rule.metric]
        entry: dict[str, Any] = {"slice": rule.slice, "metric": rule.metric, "candidate": cand, "champion": champ}
        if cand is None:
            entry.update(kind="missing", threshold=None, passed=False,
                         why=f"no {rule.metric} for slice {rule.slice!r} in the evaluation")
        elif rule.min is not None:
            entry.update(kind="min", threshold=rule.min, passed=cand >= rule.min,
                         why=f"candidate {cand:.4f} {'>=' if cand >= rule.min else '<'} floor {rule.min}")
        elif rule.max is not None:
            entry.update(kind="max", threshold=rule.max, passed=cand <= rule.max,
                         why=f"candidate {cand:.4f} {'<=' if cand <= rule.max else '>'} ceiling {rule.max}")
        else:
            tol = rule.max_regression or 0.0
            bound = champ - tol if hib else champ + tol
            ok = cand >= bound if hib else cand <= bound
            entry.update(kind="max_regression", threshold=bound, passed=ok,
                         why=f"candidate {cand:.4f} vs {reference} {champ:.4f}: change {cand - champ:+.4f}, "
                             f"allowed {'-' if hib else '+'}{tol}")
        out.append(entry)
    return {"passed": all(e["passed"] for e in out), "reference": reference, "rules": out}


def gate_table(decision: dict[str, Any]) -> str:
    """The one table a failed gate explains itself with (Markdown)."""
    lines = [f"**Gate: {'PASSED' if decision['passed'] else 'FAILED'}** (reference: {decision['reference']})", "",
             "| slice | metric | candidate | reference | threshold | result |", "|---|---|---|---|---|---|"]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"
    for e in decision["rules"]:
        lines.append(f"| {e['slice']} | {e['metric']} | {f(e['candidate'])} | {f(e['champion'])} | "
                     f"{e['kind']} {f(e['threshold'])} | {'pass' if e['passed'] else '**FAIL**'} |")
    return "\n".join(lines) + "\n"
