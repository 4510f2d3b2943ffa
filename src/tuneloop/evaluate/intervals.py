"""Confidence intervals of a proportion (a share of right answers, a precision, a recall)."""

from __future__ import annotations

import math


def wilson(k: int, n: int, confidence: float) -> tuple[float | None, float | None]:
    """Wilson score interval of k successes in n (None, None for n = 0): unlike the normal approximation it
    stays inside [0, 1] and does not collapse to a point at 0/n or n/n."""
    if n == 0:
        return None, None
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)
