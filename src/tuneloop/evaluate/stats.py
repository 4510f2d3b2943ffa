"""Statistics shared by the evaluation gate's neighbours: canary analysis (deploy/canary.py) and
production monitoring (monitor/). Plain functions of numbers; no I/O."""

from __future__ import annotations

import math
from typing import Any


def p95(xs: list[float]) -> float | None:
    """95th percentile (nearest rank); None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def fisher_greater(errors_a: int, n_a: int, errors_b: int, n_b: int) -> float:
    """One-sided Fisher exact test p-value that side a fails more often than side b."""
    from scipy import stats

    _, p = stats.fisher_exact([[errors_a, n_a - errors_a], [errors_b, max(n_b - errors_b, 0)]],
                              alternative="greater")
    return float(p)


def welch_less(a: list[float], b: list[float]) -> float:
    """One-sided Welch t-test p-value that mean(a) < mean(b); 1.0 when undefined (both sides constant)."""
    from scipy import stats

    p = stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue
    return float(p) if p == p else 1.0


def spc(baseline: list[float], window: list[float], min_window: int) -> dict[str, Any]:
    """Mean chart with 3-sigma limits from the baseline; verdict only with enough data on both sides."""
    if len(baseline) < 2 or len(window) < min_window:
        return {"verdict": "insufficient", "baseline_n": len(baseline), "window_n": len(window)}
    mean = sum(baseline) / len(baseline)
    sigma = math.sqrt(sum((x - mean) ** 2 for x in baseline) / (len(baseline) - 1))
    half = 3 * sigma / math.sqrt(len(window))
    cur = sum(window) / len(window)
    verdict = "below" if cur < mean - half else "above" if cur > mean + half else "in_control"
    return {"verdict": verdict, "baseline_mean": mean, "baseline_sigma": sigma, "lcl": mean - half,
            "ucl": mean + half, "window_mean": cur, "baseline_n": len(baseline), "window_n": len(window)}
