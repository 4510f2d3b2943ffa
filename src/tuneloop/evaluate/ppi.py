"""Prediction-powered inference: a human-rated sample made worth more by the model's own confidence.

The quantity is the mean of Y over all traffic (Y = 1 when the served answer is right). Humans rate
a uniform random sample (Y known there); the model gives every request a prediction Yhat (the
probability that its answer is right). PPI (Angelopoulos et al., Science 2023; the power-tuned
PPI++ estimator of ppi-python) estimates lambda * mean(Yhat over all traffic) + mean(Y - lambda *
Yhat over the rated sample): the rated sample corrects the model's bias, so the interval is valid
however miscalibrated Yhat is, and it is narrower than the classical interval on the rated sample
alone by as much as Yhat explains Y (lambda = 0 gives back the classical interval).

Valid only when the rated items are a uniform random sample of the same traffic as the unrated
ones: feedback or labels people chose to send are not (see monitor/realized.py).

Both PPI's interval and the classical one rest on the normal approximation, which fails when the
rated sample holds only a few wrong (or right) answers - at 98% accuracy, 50 rated answers are all
right half the time and both intervals shrink to nothing. With fewer than MIN_EACH of either, the
result falls back to the Wilson interval of the rated sample (valid, not narrower) and says so.
The human-only interval reported next to it is Wilson's, the better interval for a proportion.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIN_EACH = 5  # right and wrong answers the rated sample needs before a normal-approximation interval


def ppi_mean(y_rated: np.ndarray, yhat_rated: np.ndarray, yhat_unrated: np.ndarray,
             confidence: float) -> dict[str, Any]:
    """PPI++ estimate and interval of the share of right answers (Y in {0, 1}), next to the rated sample's
    own (Wilson) interval: {n_rated, n_unrated, method, value, lower, upper, width, human_only: {value,
    lower, upper, width}, width_ratio}."""
    from ppi_py import ppi_mean_ci, ppi_mean_pointestimate

    from tuneloop.evaluate.intervals import wilson

    y, yh, yu = (np.asarray(a, dtype=float) for a in (y_rated, yhat_rated, yhat_unrated))
    out: dict[str, Any] = {"n_rated": len(y), "n_unrated": len(yu)}
    k = int(y.sum())
    lo_h, hi_h = wilson(k, len(y), confidence)
    out["human_only"] = {"value": k / len(y), "lower": lo_h, "upper": hi_h, "width": hi_h - lo_h}
    if min(k, len(y) - k) < MIN_EACH:
        out.update({"method": f"wilson: fewer than {MIN_EACH} wrong or right answers among the rated, too few for "
                              "PPI's normal approximation", "value": k / len(y), "lower": lo_h, "upper": hi_h,
                    "width": hi_h - lo_h, "width_ratio": 1.0})
        return out
    lo, hi = (float(np.ravel(v)[0]) for v in ppi_mean_ci(y, yh, yu, alpha=1 - confidence))
    lo, hi = max(0.0, lo), min(1.0, hi)
    out.update({"method": "ppi++", "value": float(np.ravel(ppi_mean_pointestimate(y, yh, yu))[0]), "lower": lo,
                "upper": hi, "width": hi - lo})
    out["width_ratio"] = out["width"] / out["human_only"]["width"]
    return out
