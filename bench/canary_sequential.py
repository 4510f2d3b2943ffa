"""Canary tests under continuous peeking: the fixed tests (Fisher, p95 ratio, Welch) looked at after
every batch, as an operator watching a dashboard would, against the sequential test.

    python bench/canary_sequential.py                     # 1,000 canaries per scenario, seed 0
    python bench/canary_sequential.py --sims 200 --seed 3 --traffic-percent 50

Scenarios (each --sims canaries, the same simulated requests for both tests):
  A/A            both sides alike: champion error rate, log-normal latency, thumbs-up share
  A/B error      canary error rate + --harm-error
  A/B latency    canary latency x --harm-latency
  A/B feedback   canary thumbs-up share - --harm-feedback
Each request goes to the canary with probability --traffic-percent; answered requests get a thumbs
up/down with probability --feedback-rate. Both tests look after every --batch requests, up to
--requests (the window's maximum). Fixed test: `deploy.canary.compare` at every look; the first look
that says rollback rolls back, otherwise its verdict at the window's end stands. Sequential test:
`evaluate.sequential.decide`, the decision function `analyze_canary` uses, on the same counts (a
check at the end runs the pipeline's own `sequential_compare` on the rows of some canaries and
requires the same decisions), with `deploy.canary.inconclusive: promote` (the default: at the
window's maximum without a decision, promote unless harm was shown) and, as `seq/rollbk`, with
`rollback` (the champion stays unless the canary was shown within every margin). Margins are
deploy.canary's defaults (error rate +0.05, latency ratio 2.0, feedback -0.1).

Wrong decision: rollback of an A/A canary (false rollback); promotion of an A/B canary (false
promotion: every harm here is beyond its margin). Requests to a decision: both sides, at the look
that decided. The last line uses the issue's keys: `aa_false_promotion_*` is the rate of wrong
decisions on A/A canaries, i.e. their false-rollback rate (an A/A canary cannot be falsely
promoted), for the fixed and the sequential test; `mean_requests_to_decision` is the sequential
test's, over every simulated canary (A/A and A/B).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import numpy as np  # noqa: E402

from tuneloop.config.deploy import CanaryConfig  # noqa: E402
from tuneloop.deploy.canary import compare, sequential_compare  # noqa: E402
from tuneloop.evaluate import sequential as seq  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--sims", type=int, default=1000, help="simulated canaries per scenario")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same figures)")
    p.add_argument("--requests", type=int, default=2000, help="window maximum: requests on both sides together")
    p.add_argument("--batch", type=int, default=100, help="requests between two looks (deploy.canary.batch_requests)")
    p.add_argument("--min-requests", type=int, default=50,
                   help="requests each side needs before the sequential test may stop early")
    p.add_argument("--traffic-percent", type=int, default=20, help="share of requests sent to the canary")
    p.add_argument("--alpha", type=float, default=0.05, help="deploy.canary.alpha")
    p.add_argument("--error-rate", type=float, default=0.02, help="champion's (and A/A canary's) error rate")
    p.add_argument("--latency-ms", type=float, default=900.0, help="median latency of an answered request")
    p.add_argument("--latency-sigma", type=float, default=0.5, help="standard deviation of log latency")
    p.add_argument("--thumbs-up", type=float, default=0.72, help="share of thumbs up among feedback")
    p.add_argument("--feedback-rate", type=float, default=0.3, help="share of answered requests that get feedback")
    p.add_argument("--harm-error", type=float, default=0.10,
                   help="A/B error: added canary error rate (the default margin is 0.05)")
    p.add_argument("--harm-latency", type=float, default=3.0,
                   help="A/B latency: canary latency factor (the default limit is 2.0)")
    p.add_argument("--harm-feedback", type=float, default=0.2,
                   help="A/B feedback: thumbs-up share removed on the canary (the default floor is -0.1)")
    p.add_argument("--workers", type=int, default=2, help="processes for the fixed test (row by row, the slow part)")
    p.add_argument("--check-sims", type=int, default=20,
                   help="canaries per scenario re-decided through the pipeline's sequential_compare as a check")
    a = p.parse_args(argv)
    if a.requests % a.batch:
        p.error("--requests must be a multiple of --batch")
    return a


def canary_config(a: argparse.Namespace, inconclusive: str = "promote") -> CanaryConfig:
    """deploy.canary as the bench runs it: its defaults (margins) with the flags' window and alpha."""
    return CanaryConfig(traffic_percent=a.traffic_percent, requests=a.requests, batch_requests=a.batch,
                        min_requests=a.min_requests, alpha=a.alpha, inconclusive=inconclusive)


def simulate(a: argparse.Namespace, rng: np.random.Generator, harm: dict[str, float]) -> dict[str, np.ndarray]:
    """Requests of --sims canaries, shape (sims, requests): side, failed, latency, has feedback, score."""
    shape = (a.sims, a.requests)
    canary = rng.random(shape) < a.traffic_percent / 100
    p_err = np.where(canary, a.error_rate + harm.get("error", 0.0), a.error_rate)
    failed = rng.random(shape) < p_err
    lat = np.exp(rng.normal(math.log(a.latency_ms), a.latency_sigma, shape)) \
        * np.where(canary, harm.get("latency", 1.0), 1.0)
    has_fb = ~failed & (rng.random(shape) < a.feedback_rate)
    score = (rng.random(shape) < np.where(canary, a.thumbs_up - harm.get("feedback", 0.0), a.thumbs_up)) * 1.0
    return {"canary": canary, "failed": failed, "latency": lat, "has_fb": has_fb, "score": score}


def sides_at_looks(d: dict[str, np.ndarray], batch: int) -> list[tuple[seq.Side, seq.Side]]:
    """Cumulative sufficient statistics per look, one entry per canary: (canary side, champion side)."""
    loglat = np.log(d["latency"])
    out_sides = []
    looks = d["canary"].shape[1] // batch

    def cum(x: np.ndarray) -> np.ndarray:  # (sims, requests) -> (sims, looks) cumulative per-batch sums
        return np.cumsum(x.reshape(x.shape[0], looks, batch).sum(axis=2), axis=1)

    per: dict[bool, dict[str, np.ndarray]] = {}
    for is_canary in (True, False):
        on = d["canary"] == is_canary
        ok = on & ~d["failed"]
        fb = on & d["has_fb"]
        per[is_canary] = {"requests": cum(on * 1.0), "errors": cum((on & d["failed"]) * 1.0), "lat_n": cum(ok * 1.0),
                          "lat_sum": cum(np.where(ok, loglat, 0.0)), "lat_sumsq": cum(np.where(ok, loglat ** 2, 0.0)),
                          "fb_n": cum(fb * 1.0), "fb_sum": cum(np.where(fb, d["score"], 0.0)),
                          "fb_sumsq": cum(np.where(fb, d["score"] ** 2, 0.0))}
    for k in range(looks):
        out_sides.append(tuple(seq.Side(**{f: v[:, k] for f, v in per[s].items()}) for s in (True, False)))
    return out_sides


def run_sequential(a: argparse.Namespace, c: CanaryConfig, d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(decision, requests at the decision) per canary."""
    looks = sides_at_looks(d, a.batch)
    decision = np.zeros(a.sims, int)
    at = np.full(a.sims, a.requests)
    margins = seq.Margins.from_config(c)
    for k, (ca, ch) in enumerate(looks):
        r = seq.decide(ca, ch, margins, c.alpha, c.min_requests, k == len(looks) - 1, c.inconclusive)
        new = (decision == seq.CONTINUE) & (r["decision"] != seq.CONTINUE)
        decision[new] = r["decision"][new]
        at[new] = (k + 1) * a.batch
    return decision, at


def rows_of(d: dict[str, np.ndarray], i: int) -> list[dict[str, Any]]:
    return [{"variant": "canary" if c else "champion", "status": "error" if f else "ok", "latency_ms": float(lat),
             "score": float(s) if fb else None, "request_id": str(j), "created": float(j)}
            for j, (c, f, lat, fb, s) in enumerate(zip(d["canary"][i], d["failed"][i], d["latency"][i],
                                                       d["has_fb"][i], d["score"][i]))]


def _fixed_chunk(args: tuple[dict[str, np.ndarray], int, int, dict[str, Any]]) -> tuple[list[int], list[int]]:
    import warnings

    warnings.filterwarnings("ignore")  # scipy on near-constant samples; compare handles the outcome
    d, batch, n_max, cfg_dict = args
    cfg = SimpleNamespace(deploy=SimpleNamespace(canary=CanaryConfig(**cfg_dict)))
    decisions, ats = [], []
    for i in range(d["canary"].shape[0]):
        rows = rows_of(d, i)
        for n in range(batch, n_max + 1, batch):
            verdict = compare(rows[:n], cfg)["decision"]  # type: ignore[arg-type]
            if verdict == "rollback" or n == n_max:
                break
        decisions.append(seq.PROMOTE if verdict == "promote" else seq.ROLLBACK)
        ats.append(n)
    return decisions, ats


def run_fixed(a: argparse.Namespace, c: CanaryConfig, d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    chunks = np.array_split(np.arange(a.sims), max(1, a.workers * 4))
    jobs = [({k: v[idx] for k, v in d.items()}, a.batch, a.requests, c.model_dump()) for idx in chunks if len(idx)]
    if a.workers > 1:
        with ProcessPoolExecutor(a.workers) as pool:
            parts = list(pool.map(_fixed_chunk, jobs))
    else:
        parts = [_fixed_chunk(j) for j in jobs]
    return np.array([x for p in parts for x in p[0]]), np.array([x for p in parts for x in p[1]])


def check_pipeline_path(a: argparse.Namespace, c: CanaryConfig, d: dict[str, np.ndarray], decision: np.ndarray,
                        at: np.ndarray) -> int:
    """Re-decide some canaries with the pipeline's sequential_compare on their rows; return mismatches."""
    cfg = SimpleNamespace(deploy=SimpleNamespace(canary=c))
    bad = 0
    for i in range(min(a.check_sims, a.sims)):
        rows = rows_of(d, i)
        n = int(at[i])
        r = sequential_compare(rows[:n], cfg, n >= a.requests)  # type: ignore[arg-type]
        before = sequential_compare(rows[:n - a.batch], cfg, False)["decision"] if n > a.batch else "continue"
        want = {seq.PROMOTE: "promote", seq.ROLLBACK: "rollback"}[int(decision[i])]
        bad += r["decision"] != want or before != "continue"
    return bad


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    c, careful = canary_config(a), canary_config(a, "rollback")
    t0 = time.perf_counter()
    scenarios = [("A/A", {}, "rollback"), (f"A/B error +{a.harm_error:g}", {"error": a.harm_error}, "promote"),
                 (f"A/B latency x{a.harm_latency:g}", {"latency": a.harm_latency}, "promote"),
                 (f"A/B feedback -{a.harm_feedback:g}", {"feedback": a.harm_feedback}, "promote")]
    print(f"{a.sims} canaries per scenario, seed {a.seed}; window max {a.requests} requests, a look every "
          f"{a.batch} ({a.requests // a.batch} looks), canary share {a.traffic_percent}%, alpha {a.alpha}, "
          f"min_requests {a.min_requests}; margins: error rate +{c.max_error_rate_increase}, latency ratio "
          f"{c.max_p95_latency_ratio}, feedback {c.min_feedback_delta}")
    print(f"champion: error rate {a.error_rate}, median latency {a.latency_ms:g} ms (sigma log {a.latency_sigma}), "
          f"thumbs up {a.thumbs_up}, feedback on {a.feedback_rate:.0%} of answered requests")
    print()
    head = f"{'scenario':<22} {'test':<11} {'wrong':<15} {'rate':>7} {'promote':>8} {'rollback':>9} " \
           f"{'early':>6} {'mean requests':>14}"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(a.seed)
    figures: dict[tuple[str, str], dict[str, float]] = {}
    mismatches = 0
    all_at = []
    for name, harm, wrong in scenarios:
        d = simulate(a, rng, harm)
        results = {"fixed": run_fixed(a, c, d), "sequential": run_sequential(a, c, d),
                   "seq/rollbk": run_sequential(a, careful, d)}
        mismatches += check_pipeline_path(a, c, d, *results["sequential"])
        all_at.append(results["sequential"][1])
        for test, (decision, at) in results.items():
            wrong_code = seq.ROLLBACK if wrong == "rollback" else seq.PROMOTE
            f = {"wrong": float(np.mean(decision == wrong_code)), "promote": float(np.mean(decision == seq.PROMOTE)),
                 "rollback": float(np.mean(decision == seq.ROLLBACK)), "early": float(np.mean(at < a.requests)),
                 "requests": float(np.mean(at))}
            figures[(name, test)] = f
            label = "false rollback" if wrong == "rollback" else "false promotion"
            print(f"{name:<22} {test:<11} {label:<15} {f['wrong']:>7.3f} {f['promote']:>8.3f} {f['rollback']:>9.3f} "
                  f"{f['early']:>6.2f} {f['requests']:>14.0f}")
    print()
    print("fixed: compare() at every look, the first rollback stands. sequential: deploy.canary.inconclusive "
          "promote (the default: at the window's end without a decision, promote unless harm was shown); "
          "seq/rollbk: inconclusive rollback (the champion stays unless the canary was shown within every margin).")
    print(f"wrong: the rate of wrong decisions (A/A: rollback; A/B: promotion); early: share decided before the "
          f"window's maximum; mean requests: both sides, at the decision. Check: the pipeline's sequential_compare "
          f"re-decided {min(a.check_sims, a.sims)} canaries per scenario: {mismatches} mismatches. "
          f"{time.perf_counter() - t0:.0f} s")
    if mismatches:
        raise SystemExit("the pipeline's decision differs from the vectorized one")
    print(f"aa_false_promotion_fixed={figures[('A/A', 'fixed')]['wrong']:.3f} "
          f"aa_false_promotion_sequential={figures[('A/A', 'sequential')]['wrong']:.3f} "
          f"mean_requests_to_decision={float(np.mean(np.concatenate(all_at))):.0f}")


if __name__ == "__main__":
    main()
