"""Always-valid (sequential) canary tests: canary vs champion, evaluated after every batch.

Each metric is "Delta: how much worse the canary is than the champion", with its allowed margin
delta, and e-values E(d) against the point "Delta = d" that stay valid however often they are
looked at (Ville's inequality: under the null, P(E ever >= 1/a) <= a); {d : E(d) < 1/a} is a
(1 - a) confidence sequence (CS) for Delta.

  error rate   Delta = p_canary - p_champion                    delta = max_error_rate_increase
  latency      Delta = mean log latency (answered requests),    delta = log(max_p95_latency_ratio)
               canary - champion: a multiplicative slowdown by r shifts every quantile, p95 included,
               by log r, so this is the p95-ratio limit for such a shift; log latency is close to
               normal and its mean is not moved by one stall the way a small-sample p95 is. A canary
               slower in its tail only is caught later than by its p95.
  feedback     Delta = mean score champion - canary             delta = -min_feedback_delta

- clear harm (rollback): for some metric the canary is shown worse than the champion, E(0) >= k/alpha
  (its 1 - alpha/k CS lies above 0; k = 3 metrics, Bonferroni), and its estimate is beyond the
  margin: the fixed test's rule (significant, and beyond the margin) with an always-valid test. A
  canary no worse than the champion is rolled back with probability <= alpha, peeking included.
- clear success (promote): for every metric the canary is shown within its margin, E(delta) >=
  1/alpha with the estimate inside it (its 1 - alpha CS lies entirely on the good side of the
  margin). A canary beyond some margin is promoted early with probability <= alpha
  (intersection-union).
- neither by the window's maximum: see `decide` (`deploy.canary.inconclusive`).

Means (latency, feedback) use savvi's anytime-valid t-test for a regression coefficient
(`savvi.linear_regression`, Lindon, Ham, Tingley & Bojinov 2024, "Anytime-valid linear models and
regression adjusted causal inference in randomized experiments"): y = b0 + b1 [canary], b1 the
difference of means, its Bayes factor `log_bf` against b1 = delta and the confidence sequence that
inverts it (the same formula as `LinearRegression.calculate_conf_int`). The mixing prior on the
standardised effect has standard deviation margin / 0.5 (0.5: the largest standard deviation of a
score in [0, 1], typical for log latency), fixed by the config before any data.

savvi's count tests (`InhomogeneousBernoulliProcess`, `InhomogeneousPoissonProcess`) compare error
*ratios* given known assignment probabilities and solve a convex program per look; the margin here
is an additive difference and the realised split is what counts, and a t-test on 0/1 errors
collapses when no side has failed yet. So the error rate uses the smallest exact construction,
`bernoulli_log_e`: Krichevsky-Trofimov (Beta(1/2, 1/2)) mixtures over each side's error rate
divided by the likelihood maximised over {p_canary - p_champion = delta} (universal inference,
Wasserman, Ramdas & Balakrishnan 2020, PNAS 117(29); Robbins 1970 for mixtures):

  E(delta) = prod_s B(1/2 + x_s, 1/2 + n_s - x_s) / B(1/2, 1/2)
             / max_{p_ch} (p_ch + delta)^x_ca (1 - p_ch - delta)^(n_ca - x_ca) p_ch^x_ch (1 - p_ch)^(n_ch - x_ch)

For any (p_ca, p_ch) in the null the ratio is at most the mixture over the true likelihood, a
nonnegative martingale with mean 1, whatever the order of arrivals and split between sides.

Every function takes numpy arrays (one entry per simulated canary) or scalars, so the pipeline
and `bench/canary_sequential.py` run the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from savvi.linear_regression import log_bf
from scipy.special import betaln, xlogy

METRICS = ("error_rate", "latency", "feedback")
TEST_NAME = "sequential: KT-mixture e-process (error rate), savvi anytime-valid t-test (latency, feedback)"
TYPICAL_SD = 0.5  # of a feedback score in [0, 1] (at most 0.5) and of an LLM endpoint's log latency
CONTINUE, PROMOTE, ROLLBACK = 0, 1, -1


@dataclass
class Side:
    """Sufficient statistics of one side (arrays of equal shape, or scalars): requests and failed
    requests; answered requests with the sum and sum of squares of their log latency (ms); scored
    requests with the sum and sum of squares of their score."""

    requests: Any
    errors: Any
    lat_n: Any
    lat_sum: Any
    lat_sumsq: Any
    fb_n: Any
    fb_sum: Any
    fb_sumsq: Any

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> Side:
        ok = [math.log(max(r["latency_ms"], 1e-3)) for r in rows if r["status"] == "ok"]
        scores = [float(r["score"]) for r in rows if r["score"] is not None]
        return cls(*(np.asarray(v, dtype=float) for v in (
            len(rows), sum(r["status"] != "ok" for r in rows), len(ok), sum(ok), sum(x * x for x in ok),
            len(scores), sum(scores), sum(x * x for x in scores))))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name), dtype=float) for f in fields(self)}


@dataclass(frozen=True)
class Margins:
    """The allowed 'canary worse by' per metric, from deploy.canary (see the module docstring)."""

    error_rate: float
    latency: float
    feedback: float

    @classmethod
    def from_config(cls, c: Any) -> Margins:
        return cls(c.max_error_rate_increase, math.log(c.max_p95_latency_ratio), -c.min_feedback_delta)


# -- error rate: exact two-sample Bernoulli e-value --
def _kt_log_mixture(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """log of the Krichevsky-Trofimov marginal likelihood of x failures in n Bernoulli trials."""
    return betaln(0.5 + x, 0.5 + n - x) - betaln(0.5, 0.5)


def _bernoulli_loglik(x: np.ndarray, n: np.ndarray, p: np.ndarray) -> np.ndarray:
    return xlogy(x, p) + xlogy(n - x, 1 - p)


def bernoulli_log_e(x_a, n_a, x_b, n_b, delta) -> np.ndarray:
    """log e-value against p_a - p_b = delta (a: canary, b: champion; x failures of n); the formula is in
    the module docstring: the KT mixtures over the likelihood maximised on the line p_a = p_b + delta (concave
    along it: bisection on the derivative). Negative near the estimate (no evidence); 0 for |delta| >= 1,
    which no data can cross. Arrays broadcast, delta included."""
    x_a, n_a, x_b, n_b = (np.asarray(v, dtype=float) for v in (x_a, n_a, x_b, n_b))
    delta = np.asarray(delta, dtype=float)
    shape = np.broadcast(x_a, n_a, x_b, n_b, delta).shape
    lo = np.broadcast_to(np.maximum(0.0, -delta), shape).copy()
    hi = np.broadcast_to(np.minimum(1.0, 1.0 - delta), shape).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(60):
            u = (lo + hi) / 2
            pa = u + delta
            grad = (np.where(x_a > 0, x_a / pa, 0) - np.where(n_a - x_a > 0, (n_a - x_a) / (1 - pa), 0)
                    + np.where(x_b > 0, x_b / u, 0) - np.where(n_b - x_b > 0, (n_b - x_b) / (1 - u), 0))
            up = grad > 0
            lo, hi = np.where(up, u, lo), np.where(up, hi, u)
        u = (lo + hi) / 2
        line = _bernoulli_loglik(x_a, n_a, u + delta) + _bernoulli_loglik(x_b, n_b, u)
    return np.where(np.abs(delta) < 1, _kt_log_mixture(x_a, n_a) + _kt_log_mixture(x_b, n_b) - line, 0.0)


# -- means: savvi's anytime-valid t-test on the difference of two means --
def _two_group(n_a, s_a, q_a, n_b, s_b, q_b) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Estimate of mean_a - mean_b, its standard error, z2 (savvi: (sigma / se)^2) and the degrees of
    freedom nu = n - p - 1 of the regression y = b0 + b1 [side a] (p = 2)."""
    n_a, s_a, q_a, n_b, s_b, q_b = (np.asarray(v, dtype=float) for v in (n_a, s_a, q_a, n_b, s_b, q_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = s_a / n_a - s_b / n_b
        sse = np.maximum(q_a - s_a * s_a / n_a, 0) + np.maximum(q_b - s_b * s_b / n_b, 0)
        nu = n_a + n_b - 3
        sigma2 = sse / (n_a + n_b - 2)
        z2 = 1 / (1 / n_a + 1 / n_b)
        se = np.sqrt(sigma2 / z2)
    return diff, se, z2, nu


def _usable(n_a, n_b, se, nu) -> np.ndarray:
    # both sides observed, and a residual spread: a t-test of two constant samples is undefined
    return (np.asarray(n_a) >= 1) & (np.asarray(n_b) >= 1) & (nu >= 1) & np.isfinite(se) & (se > 1e-12)


def phi_for(margin: float) -> float:
    """savvi's prior scale: the mixing distribution of the standardised effect has sd |margin| / 0.5."""
    return (TYPICAL_SD / max(abs(margin), 0.02)) ** 2


def mean_log_e(n_a, s_a, q_a, n_b, s_b, q_b, delta: float, phi: float) -> tuple[np.ndarray, np.ndarray]:
    """(estimate of mean_a - mean_b, log Bayes factor against mean_a - mean_b = delta): savvi's `log_bf`
    with t = (estimate - delta) / se; 0 (no evidence) where the test is undefined."""
    diff, se, z2, nu = _two_group(n_a, s_a, q_a, n_b, s_b, q_b)
    ok = _usable(n_a, n_b, se, nu)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t2 = np.where(ok, (diff - delta) ** 2 / np.where(ok, se, 1) ** 2, 0.0)
        le = log_bf(t2, np.where(ok, nu, 1.0), phi, np.where(ok, z2, 1.0))
    return np.where(ok, diff, np.nan), np.where(ok, le, 0.0)


def mean_cs(n_a, s_a, q_a, n_b, s_b, q_b, alpha: float, phi: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidence sequence (1 - alpha) for mean_a - mean_b: savvi's `LinearRegression.calculate_conf_int`
    radius for the coefficient b1; (-inf, inf) where the test is undefined."""
    diff, se, z2, nu = _two_group(n_a, s_a, q_a, n_b, s_b, q_b)
    ok = _usable(n_a, n_b, se, nu)
    with np.errstate(divide="ignore", invalid="ignore"):
        nu_ = np.where(ok, nu, 1.0)
        r = phi / (phi + np.where(ok, z2, 1.0))
        g = (r * alpha ** 2) ** (1 / (nu_ + 1))
        radius = se * np.sqrt(nu_ * (1 - g) / np.maximum(0, g - r))
    return np.where(ok, diff - radius, -np.inf), np.where(ok, diff + radius, np.inf)


def bernoulli_cs(x_a, n_a, x_b, n_b, alphas: tuple[float, ...], step: float = 0.001) -> list[tuple[float, float]]:
    """Confidence sequences (1 - alpha, one per alpha) for p_a - p_b (scalars): the differences whose e-value
    stays below 1/alpha, on a grid of `step` (the e-value is convex in the difference, least at the estimate)."""
    if min(n_a, n_b) == 0:
        return [(-1.0, 1.0) for _ in alphas]
    grid = np.arange(-1 + step, 1, step)
    le = bernoulli_log_e(x_a, n_a, x_b, n_b, grid)
    out = []
    for alpha in alphas:
        inside = grid[le < math.log(1 / alpha)]
        out.append((float(inside.min()), float(inside.max())) if inside.size else (float("nan"), float("nan")))
    return out


# -- the decision --
def decide(canary: Side, champion: Side, margins: Margins, alpha: float, min_requests: int, final: Any,
           inconclusive: str = "promote") -> dict[str, Any]:
    """One look -> per metric the estimate of "canary worse by", the log e-values against no difference
    (harm) and against the margin (success) with the verdicts, and the decision (CONTINUE, PROMOTE,
    ROLLBACK) per entry; harm and success as in the module docstring.

    Before `final` (the window's maximum) a decision needs `min_requests` requests on each side; then
    harm of any metric rolls back and success of every metric promotes. At `final`: no requests on a
    side rolls back (nothing to compare with), harm rolls back, success of every metric with data on
    both sides promotes, and anything else is `inconclusive`'s: "promote" (no harm was shown: the fixed
    test's rule) or "rollback" (the champion stays unless the canary was shown within its margins)."""
    a, b = canary.arrays(), champion.arrays()
    shape = np.broadcast(*a.values(), *b.values()).shape
    k = len(METRICS)
    harm_at, success_at = math.log(k / alpha), math.log(1 / alpha)
    out: dict[str, Any] = {"harm_log_threshold": harm_at, "success_log_threshold": success_at}
    both = (a["requests"] > 0) & (b["requests"] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        est_err = np.where(both, a["errors"] / a["requests"] - b["errors"] / b["requests"], np.nan)

    def err(delta: float) -> np.ndarray:
        return np.where(both, bernoulli_log_e(a["errors"], a["requests"], b["errors"], b["requests"], delta), 0.0)

    def lat(delta: float) -> tuple[np.ndarray, np.ndarray]:
        return mean_log_e(a["lat_n"], a["lat_sum"], a["lat_sumsq"], b["lat_n"], b["lat_sum"], b["lat_sumsq"],
                          delta, phi_for(margins.latency))

    def fb(delta: float) -> tuple[np.ndarray, np.ndarray]:  # champion - canary: worse is positive
        return mean_log_e(b["fb_n"], b["fb_sum"], b["fb_sumsq"], a["fb_n"], a["fb_sum"], a["fb_sumsq"],
                          delta, phi_for(margins.feedback))

    per = {"error_rate": (est_err, err(0.0), err(margins.error_rate), margins.error_rate),
           "latency": (lat(0.0)[0], lat(0.0)[1], lat(margins.latency)[1], margins.latency),
           "feedback": (fb(0.0)[0], fb(0.0)[1], fb(margins.feedback)[1], margins.feedback)}
    harm_any = np.zeros(shape, bool)
    success_all = np.ones(shape, bool)
    success_tested = np.ones(shape, bool)
    for name, (est, le_zero, le_margin, margin) in per.items():
        tested = np.isfinite(est)
        harm = tested & (est > margin) & (est > 0) & (le_zero >= harm_at)
        success = tested & (est < margin) & (le_margin >= success_at)
        out[name] = {"estimate": est, "log_e_harm": le_zero, "log_e_success": le_margin, "margin": margin,
                     "harm": harm, "success": success, "tested": tested}
        harm_any |= harm
        success_all &= success
        success_tested &= success | ~tested
    final = np.broadcast_to(np.asarray(final, bool), shape)
    enough = (a["requests"] >= min_requests) & (b["requests"] >= min_requests)
    early = np.where(enough & harm_any, ROLLBACK, np.where(enough & success_all, PROMOTE, CONTINUE))
    at_end = np.where(~both | harm_any, ROLLBACK,
                      np.where(success_tested | (inconclusive == "promote"), PROMOTE, ROLLBACK))
    out["decision"] = np.where(final, at_end, early)
    out["harm"], out["success"], out["no_traffic"] = harm_any, success_all, ~both
    return out


# -- the record: what the pipeline shows and stores --
def _num(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _finite(x: float) -> float | None:
    """JSON-safe: an unbounded end of a confidence sequence is null."""
    return x if math.isfinite(x) else None


def _share(x: np.ndarray, n: np.ndarray) -> float:
    return float(x / n) if n else 0.0


def _ratio(log_x: float) -> float:
    return math.exp(log_x) if log_x < 700 else math.inf


def _exp(log_x: float) -> float:
    return math.exp(min(log_x, 690.0))  # beyond 1e299 the figure says nothing more


def report(r: dict[str, Any], canary: Side, champion: Side, c: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per metric: the check (passed = no harm shown) and its record: the estimate and margin, the e-values
    against no difference (harm) and against the margin (success) with their thresholds, the confidence
    sequences at the rollback level (1 - alpha/k) and the promotion level (1 - alpha), the sample sizes.
    Shown as the fixed test shows them: error rate difference, latency ratio, feedback delta. `r`: one
    `decide` of a single canary; c: deploy.canary."""
    a, b = canary.arrays(), champion.arrays()
    k = len(METRICS)
    levels = {"rollback": c.alpha / k, "promote": c.alpha}
    margins = Margins.from_config(c)
    checks, record = [], {}
    for name in METRICS:
        m = r[name]
        est, tested = float(m["estimate"]), bool(m["tested"])
        if name == "error_rate":
            n = {"canary": int(a["requests"]), "champion": int(b["requests"])}
            bounds = bernoulli_cs(a["errors"], a["requests"], b["errors"], b["requests"], tuple(levels.values()))
            cs = dict(zip(levels, bounds))  # canary - champion
            shown = f"canary {_share(a['errors'], a['requests']):.3f} vs champion " \
                    f"{_share(b['errors'], b['requests']):.3f} ({est:+.3f}, allowed +{c.max_error_rate_increase})"
        elif name == "latency":
            n = {"canary": int(a["lat_n"]), "champion": int(b["lat_n"])}
            cs = {}
            for lv, level in levels.items():  # tested on log latency, shown as the ratio of geometric means
                lo, hi = mean_cs(a["lat_n"], a["lat_sum"], a["lat_sumsq"], b["lat_n"], b["lat_sum"], b["lat_sumsq"],
                                 level, phi_for(margins.latency))
                cs[lv] = (_ratio(float(lo)), _ratio(float(hi)))
            gm = {v: math.exp(_share(x["lat_sum"], x["lat_n"])) for v, x in (("canary", a), ("champion", b))}
            shown = f"geometric mean canary {gm['canary']:.0f} ms vs champion {gm['champion']:.0f} ms, ratio " \
                    f"{math.exp(est):.2f} (limit {c.max_p95_latency_ratio})" if tested else \
                f"not enough answered requests to test (canary {n['canary']}, champion {n['champion']})"
        else:
            n = {"canary": int(a["fb_n"]), "champion": int(b["fb_n"])}
            cs = {}
            for lv, level in levels.items():  # tested as champion - canary, shown as canary - champion
                lo, hi = mean_cs(b["fb_n"], b["fb_sum"], b["fb_sumsq"], a["fb_n"], a["fb_sum"], a["fb_sumsq"],
                                 level, phi_for(margins.feedback))
                cs[lv] = (-float(hi), -float(lo))
            shown = f"canary {_share(a['fb_sum'], a['fb_n']):.3f} vs champion " \
                    f"{_share(b['fb_sum'], b['fb_n']):.3f} (delta {-est:+.3f}, floor {c.min_feedback_delta})" \
                if tested else f"not enough feedback to test (canary {n['canary']}, champion {n['champion']})"
        state = "harm" if m["harm"] else "within margin" if m["success"] else "open" if tested else "no data"
        e_harm, e_ok = _exp(float(m["log_e_harm"])), _exp(float(m["log_e_success"]))
        lo, hi = cs["rollback"]
        checks.append({"check": name, "passed": not bool(m["harm"]),
                       "detail": f"{shown}; {state}: e-value {_num(e_harm)} against no difference (rollback at "
                                 f"{k / c.alpha:.0f} with the estimate beyond the margin), {_num(e_ok)} against the "
                                 f"margin (promote at {1 / c.alpha:.0f}); {1 - levels['rollback']:.3g} confidence "
                                 f"sequence [{_num(lo)}, {_num(hi)}]"})
        record[name] = {"estimate": est if tested else None, "margin": m["margin"], "state": state,
                        "e_value_no_difference": e_harm, "rollback_at": k / c.alpha,
                        "e_value_margin": e_ok, "promote_at": 1 / c.alpha, "n": n,
                        "confidence_sequence": {lv: {"level": 1 - level, "low": _finite(cs[lv][0]),
                                                     "high": _finite(cs[lv][1])} for lv, level in levels.items()}}
    return checks, record
