"""The promotion gate: declarative rules over per-slice metrics -> one explained decision.

A rule compares the candidate with an absolute bound (`min` / `max`) or with the champion
(`max_regression`: the largest allowed change for the worse, in the metric's own units).
With `confidence`, a max_regression rule decides on a paired bootstrap interval of the change
(candidate - champion on the same resampled records), so noise on a small slice neither
blocks a good candidate nor lets a bad one through by luck:
    whole interval within the tolerance  -> pass
    whole interval beyond it             -> fail
    straddles it                         -> `inconclusive` policy (fail by default)
The decision is a plain dict written as gate.json:
    {passed, reference, rules: [{slice, metric, kind, candidate, champion, threshold, passed, why, ...}]}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tuneloop.config import HIGHER_IS_BETTER, GateRule


def apply_gates(rules: list[GateRule], candidate: dict[str, dict[str, Any]],
                champion: dict[str, dict[str, Any]], reference: str,
                values: dict[str, dict[str, dict[str, np.ndarray]]] | None = None,
                bootstrap_samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """`values` (who -> slice -> per-record arrays, from metrics.slice_values) enables `confidence`."""
    from tuneloop.evaluate.metrics import paired_bootstrap

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
        elif champ is None:
            entry.update(kind="max_regression", threshold=None, passed=False,
                         why=f"no {rule.metric} for slice {rule.slice!r} for the {reference}")
        else:
            tol = rule.max_regression or 0.0
            bound = champ - tol if hib else champ + tol
            ok = cand >= bound if hib else cand <= bound
            why = (f"candidate {cand:.4f} vs {reference} {champ:.4f}: change {cand - champ:+.4f}, "
                   f"allowed {'-' if hib else '+'}{tol}")
            entry.update(kind="max_regression", threshold=bound, passed=ok, why=why)
            sides = values and values.get("candidate", {}).get(rule.slice) is not None \
                and values.get("champion", {}).get(rule.slice) is not None
            if rule.confidence is not None and sides:
                lo, hi = paired_bootstrap(values["candidate"][rule.slice], values["champion"][rule.slice],
                                          rule.metric, bootstrap_samples, rule.confidence, seed)
                # "worse" direction: for higher-is-better a drop is negative, else positive
                worst, best = (lo, hi) if hib else (hi, lo)
                within = worst >= -tol if hib else worst <= tol
                beyond = best < -tol if hib else best > tol
                verdict = "pass" if within else "fail" if beyond else "inconclusive"
                entry.update(kind=f"max_regression@{rule.confidence:g}", ci=[lo, hi], verdict=verdict,
                             passed=verdict == "pass" or (verdict == "inconclusive" and rule.inconclusive == "pass"),
                             why=f"{why}; {rule.confidence:.0%} CI of the change [{lo:+.4f}, {hi:+.4f}] -> {verdict}"
                                 + (f" (policy: {rule.inconclusive})" if verdict == "inconclusive" else ""))
        out.append(entry)
    return {"passed": all(e["passed"] for e in out), "reference": reference, "rules": out}


def gate_table(decision: dict[str, Any]) -> str:
    """The one table a failed gate explains itself with (Markdown)."""
    lines = [f"**Gate: {'PASSED' if decision['passed'] else 'FAILED'}** (reference: {decision['reference']})", "",
             "| slice | metric | candidate | reference | threshold | result | why |", "|---|---|---|---|---|---|---|"]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"
    for e in decision["rules"]:
        lines.append(f"| {e['slice']} | {e['metric']} | {f(e['candidate'])} | {f(e['champion'])} | "
                     f"{e['kind']} {f(e['threshold'])} | {'pass' if e['passed'] else '**FAIL**'} | {e['why']} |")
    return "\n".join(lines) + "\n"
