"""Sequential canary analysis: the always-valid statistics against known values and savvi, their error
rates under continuous peeking, the decision rule, analyze_canary's loops (local replay in batches,
KServe polling within the task's timeout) and the config that selects them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_config

from tuneloop.config import ConfigError, RunConfig, load_config
from tuneloop.config.deploy import CanaryConfig
from tuneloop.deploy import canary
from tuneloop.evaluate import sequential as seq

pytestmark = pytest.mark.unit


@pytest.fixture()
def cfg(tmp_path: Path) -> RunConfig:
    return load_config(tiny_config(tmp_path, Path("/nonexistent-model"), deploy__canary__max_p95_latency_ratio=2.0,
                                   deploy__canary__requests=2000, deploy__canary__batch_requests=100,
                                   deploy__canary__min_requests=50))


def request(variant: str, i: int, rng: np.random.Generator, *, p_err: float = 0.02, latency: float = 900.0,
            thumbs_up: float = 0.72) -> dict[str, Any]:
    failed = bool(rng.random() < p_err)
    score = float(rng.random() < thumbs_up) if not failed and rng.random() < 0.5 else None
    return {"request_id": f"{variant}-{i}", "variant": variant, "model_version": "7" if variant == "canary" else "6",
            "status": "error" if failed else "ok", "latency_ms": float(latency * math.exp(rng.normal(0, 0.5))),
            "score": score, "created": float(i)}


# -- the statistics --
def test_bernoulli_e_value_against_hand_computed_values() -> None:
    # KT marginal of two successes: 1/2 * 3/4 = 3/8 per side, so the mixture is 9/64
    assert float(np.exp(seq._kt_log_mixture(np.array(2.0), np.array(2.0)))) == pytest.approx(3 / 8)
    # delta 0: the likelihood on p_a = p_b of (2 of 2, 0 of 2) peaks at p = 1/2: 1/16 -> E = (9/64) / (1/16)
    assert float(np.exp(seq.bernoulli_log_e(2, 2, 0, 2, 0.0))) == pytest.approx(9 / 4)
    # delta 0.5: (u + 0.5)^2 (1 - u)^2 peaks at u = 1/4: (3/4)^4 -> E = (9/64) / (81/256) = 4/9
    assert float(np.exp(seq.bernoulli_log_e(2, 2, 0, 2, 0.5))) == pytest.approx(4 / 9)
    # vectorised over canaries and margins alike
    le = seq.bernoulli_log_e(np.array([2, 2]), 2, 0, 2, np.array([0.0, 0.5]))
    assert np.exp(le) == pytest.approx([9 / 4, 4 / 9])
    # no data: no evidence; a margin of 1 cannot be crossed
    assert float(seq.bernoulli_log_e(0, 0, 0, 0, 0.0)) == pytest.approx(0.0)
    assert float(seq.bernoulli_log_e(50, 50, 0, 50, 1.0)) == 0.0


def test_bernoulli_confidence_sequence_inverts_the_e_value() -> None:
    (lo, hi), = seq.bernoulli_cs(30, 100, 10, 100, (0.05,))
    assert lo < 0.2 < hi  # contains the estimate
    for d, inside in ((lo + 0.002, True), (hi - 0.002, True), (lo - 0.002, False), (hi + 0.002, False)):
        assert (float(seq.bernoulli_log_e(30, 100, 10, 100, d)) < math.log(20)) is inside, d


def test_mean_tests_are_savvis_linear_regression() -> None:
    from savvi.linear_regression import LinearRegression

    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.4, 1.0, 50)
    lm = LinearRegression(0.05, 2)
    for y in a:
        lm.update(np.array([y, 1.0, 1.0]))  # y, intercept, canary
    for y in b:
        lm.update(np.array([y, 1.0, 0.0]))
    stats = (30, a.sum(), (a * a).sum(), 50, b.sum(), (b * b).sum())
    lo, hi = seq.mean_cs(*stats, 0.05, 1.0)
    assert (float(lo), float(hi)) == pytest.approx(tuple(lm.calculate_conf_int()[1]), rel=1e-5)
    est, le = seq.mean_log_e(*stats, 0.0, 1.0)
    assert float(est) == pytest.approx(lm.beta[1], rel=1e-5)
    assert math.exp(-float(le)) == pytest.approx(lm.calculate_p_value()[1], rel=1e-5)  # savvi's p = 1/BF


def test_constant_samples_are_no_evidence() -> None:
    # the t-test is undefined without spread: no verdict either way, however many ratings
    est, le = seq.mean_log_e(40, 40.0, 40.0, 40, 0.0, 0.0, 0.1, 25.0)
    assert np.isnan(est) and float(le) == 0.0


def test_side_from_rows_matches_the_sums() -> None:
    rows = [{"status": "ok", "latency_ms": 100.0, "score": 1.0}, {"status": "error", "latency_ms": 5.0, "score": None},
            {"status": "ok", "latency_ms": 400.0, "score": 0.0}]
    s = seq.Side.from_rows(rows).arrays()
    assert (s["requests"], s["errors"], s["lat_n"], s["fb_n"], s["fb_sum"]) == (3, 1, 2, 2, 1.0)
    assert s["lat_sum"] == pytest.approx(math.log(100) + math.log(400))
    assert s["lat_sumsq"] == pytest.approx(math.log(100) ** 2 + math.log(400) ** 2)


# -- error rates under continuous peeking --
def _cumulative(rng: np.random.Generator, runs: int, looks: int, batch: int, p_ca: float, p_ch: float,
                share: float = 0.5) -> list[tuple[seq.Side, seq.Side]]:
    """Counts after each look of `runs` simulated canaries (error rate, latency and thumbs alike apart
    from the error rates)."""
    n = looks * batch
    on = rng.random((runs, n)) < share
    failed = rng.random((runs, n)) < np.where(on, p_ca, p_ch)
    loglat = rng.normal(6.8, 0.5, (runs, n))
    fb = ~failed & (rng.random((runs, n)) < 0.5)
    score = (rng.random((runs, n)) < 0.72) * 1.0

    def cum(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x.reshape(runs, looks, batch).sum(axis=2), axis=1)

    sides = []
    for mask in (on, ~on):
        ok, f = mask & ~failed, mask & fb
        sides.append({"requests": cum(mask * 1.0), "errors": cum((mask & failed) * 1.0), "lat_n": cum(ok * 1.0),
                      "lat_sum": cum(np.where(ok, loglat, 0)), "lat_sumsq": cum(np.where(ok, loglat ** 2, 0)),
                      "fb_n": cum(f * 1.0), "fb_sum": cum(np.where(f, score, 0)),
                      "fb_sumsq": cum(np.where(f, score ** 2, 0))})
    return [tuple(seq.Side(**{k: v[:, j] for k, v in s.items()}) for s in sides) for j in range(looks)]


def _peek(looks: list[tuple[seq.Side, seq.Side]], margins: seq.Margins, alpha: float,
          min_requests: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """First decision per run when every look may stop it, and the look it came at."""
    decision = np.zeros(len(looks[0][0].requests), int)
    at = np.full(decision.shape, len(looks))
    for j, (ca, ch) in enumerate(looks):
        r = seq.decide(ca, ch, margins, alpha, min_requests, j == len(looks) - 1)
        new = (decision == seq.CONTINUE) & (r["decision"] != seq.CONTINUE)
        decision[new], at[new] = r["decision"][new], j + 1
    return decision, at


def test_aa_canaries_peeked_after_every_batch_are_rarely_rolled_back() -> None:
    margins = seq.Margins(error_rate=0.05, latency=math.log(2.0), feedback=0.1)
    alpha = 0.05
    aa = _cumulative(np.random.default_rng(18), runs=200, looks=20, batch=50, p_ca=0.05, p_ch=0.05)
    decision, _ = _peek(aa, margins, alpha)
    assert np.mean(decision == seq.ROLLBACK) <= 2 * alpha
    # the same peeking with a naive z-test of the error rates at every look does roll back too often:
    # the simulation is one where peeking matters
    naive = np.zeros(200, bool)
    for ca, ch in aa:
        p_pool = (ca.errors + ch.errors) / (ca.requests + ch.requests)
        se = np.sqrt(p_pool * (1 - p_pool) * (1 / ca.requests + 1 / ch.requests))
        naive |= (ca.errors / ca.requests - ch.errors / ch.requests) / np.where(se > 0, se, np.inf) > 1.645
    assert naive.mean() > 2 * alpha
    # and not by never rolling back: the same runs with the canary failing 15 points more are caught, early
    harm = _cumulative(np.random.default_rng(18), runs=200, looks=20, batch=50, p_ca=0.20, p_ch=0.05)
    decision, at = _peek(harm, margins, alpha)
    assert np.mean(decision == seq.ROLLBACK) >= 0.95 and np.median(at) <= 10  # of 20 looks


def test_the_e_process_at_its_null_boundary_holds_alpha_under_peeking() -> None:
    # one metric, no Bonferroni slack: the error rate difference sits exactly on the margin; the
    # share of runs whose e-value ever reaches 1/alpha is the false-promotion rate (at most alpha)
    alpha = 0.1
    looks = _cumulative(np.random.default_rng(7), runs=400, looks=25, batch=40, p_ca=0.10, p_ch=0.05)
    ever = np.zeros(400, bool)
    for ca, ch in looks:
        ever |= seq.bernoulli_log_e(ca.errors, ca.requests, ch.errors, ch.requests, 0.05) >= math.log(1 / alpha)
    assert ever.mean() <= alpha * 1.5
    # the e-value is not inert: 20 points above the champion it passes 1/alpha against the margin in most runs
    looks = _cumulative(np.random.default_rng(7), runs=400, looks=25, batch=40, p_ca=0.25, p_ch=0.05)
    ca, ch = looks[-1]
    assert np.mean(seq.bernoulli_log_e(ca.errors, ca.requests, ch.errors, ch.requests, 0.05)
                   >= math.log(1 / alpha)) > 0.8


def test_savvi_t_test_on_thumbs_holds_alpha_under_peeking() -> None:
    # feedback is 0/1, not the normal the t-test assumes: A/A, 40 looks, the share of runs whose Bayes
    # factor against "no difference" ever reaches 1/alpha stays under alpha, where a t-test at every look
    # (|t| > 1.645) exceeds twice alpha
    alpha = 0.1
    looks = _cumulative(np.random.default_rng(11), runs=400, looks=40, batch=50, p_ca=0.05, p_ch=0.05)
    ever, naive = np.zeros(400, bool), np.zeros(400, bool)
    for ca, ch in looks:
        stats = (ca.fb_n, ca.fb_sum, ca.fb_sumsq, ch.fb_n, ch.fb_sum, ch.fb_sumsq)
        est, le = seq.mean_log_e(*stats, 0.0, seq.phi_for(0.1))
        ever |= le >= math.log(1 / alpha)
        _, se, _, _ = seq._two_group(*stats)
        naive |= np.abs(est / se) > 1.645
    assert 0 < ever.mean() <= alpha  # not inert either: some A/A runs come close enough to cross
    assert naive.mean() > 2 * alpha


# -- the decision rule --
def _sides(n: int, *, p_err: float = 0.02, latency: float = 900.0, thumbs_up: float = 0.72, seed: int = 0,
           canary_kw: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = [request("champion", i, rng, p_err=p_err, latency=latency, thumbs_up=thumbs_up) for i in range(n)]
    kw = {"p_err": p_err, "latency": latency, "thumbs_up": thumbs_up, **(canary_kw or {})}
    return rows + [request("canary", i, rng, **kw) for i in range(n)]


def test_harm_rolls_back_with_the_statistic_on_record(cfg: RunConfig) -> None:
    r = canary.sequential_compare(_sides(100, canary_kw={"p_err": 0.5}), cfg, final=False)
    assert r["decision"] == "rollback"
    failed = {c["check"] for c in r["checks"] if not c["passed"]}
    assert failed == {"error_rate"}
    m = r["sequential"]["metrics"]["error_rate"]
    assert m["state"] == "harm" and m["e_value_no_difference"] >= m["rollback_at"] == 60
    assert m["confidence_sequence"]["rollback"]["low"] > 0 and m["n"] == {"canary": 100, "champion": 100}
    assert r["sequential"]["reason"] == "harm shown"


def test_harm_within_the_margin_is_not_rolled_back(cfg: RunConfig) -> None:
    # the canary errs 3 points more, significantly, but the margin allows 5: no rollback
    rows = _sides(3000, p_err=0.01, canary_kw={"p_err": 0.04})
    r = canary.sequential_compare(rows, cfg, final=False)
    m = r["sequential"]["metrics"]["error_rate"]
    assert m["confidence_sequence"]["rollback"]["low"] > 0  # shown worse than the champion ...
    assert m["state"] != "harm" and r["decision"] != "rollback"  # ... but within its margin


def test_fine_canary_is_promoted_before_the_window_ends(cfg: RunConfig) -> None:
    r = canary.sequential_compare(_sides(3000, seed=3), cfg, final=False)
    assert r["decision"] == "promote" and all(c["passed"] for c in r["checks"])
    assert {m["state"] for m in r["sequential"]["metrics"].values()} == {"within margin"}
    cs = r["sequential"]["metrics"]["error_rate"]["confidence_sequence"]["promote"]
    assert cs["high"] < cfg.deploy.canary.max_error_rate_increase


def test_no_decision_before_min_requests(cfg: RunConfig) -> None:
    rows = _sides(30, canary_kw={"p_err": 1.0})  # 30 of 30 failed: clear, but before min_requests (50)
    assert canary.sequential_compare(rows, cfg, final=False)["decision"] == "continue"
    assert canary.sequential_compare(rows, cfg, final=True)["decision"] == "rollback"  # the window's end decides


def test_window_end_without_a_decision_follows_inconclusive(tmp_path: Path) -> None:
    rows = _sides(60, seed=5)
    for policy, decision in (("promote", "promote"), ("rollback", "rollback")):
        c = load_config(tiny_config(tmp_path, Path("/nonexistent-model"), deploy__canary__inconclusive=policy))
        r = canary.sequential_compare(rows, c, final=True)
        assert r["decision"] == decision, policy
        assert r["sequential"]["reason"] == f"window maximum without a decision (inconclusive: {policy})"
        assert (decision == "promote") == all(ch["passed"] for ch in r["checks"])
    assert [ch for ch in r["checks"] if not ch["passed"]][0]["check"] == "evidence"


def test_no_traffic_on_a_side_rolls_back_at_the_end(cfg: RunConfig) -> None:
    rows = [row for row in _sides(40) if row["variant"] == "champion"]
    assert canary.sequential_compare(rows, cfg, final=False)["decision"] == "continue"
    r = canary.sequential_compare(rows, cfg, final=True)
    assert r["decision"] == "rollback"
    assert r["checks"][0] == {"check": "traffic", "passed": False, "detail": "the canary received no requests"}


# -- analyze_canary --
class FakeTraffic:
    """The local gateway and the feedback store in one: replaying request i appends row(i)."""

    def __init__(self, row: Any) -> None:
        self.row, self.rows, self.calls = row, [], []

    def replay(self, cfg: RunConfig, since: float, start: int = 0, count: int | None = None) -> int:
        stop = cfg.deploy.canary.requests if count is None else min(cfg.deploy.canary.requests, start + count)
        self.calls.append((start, stop))
        self.rows += [self.row(i) for i in range(start, stop)]
        return stop - start

    def requests(self, since: float = 0.0) -> list[dict[str, Any]]:
        return list(self.rows)


def _install(monkeypatch: pytest.MonkeyPatch, fake: FakeTraffic) -> None:
    monkeypatch.setattr(canary, "replay_traffic", fake.replay)
    monkeypatch.setattr("tuneloop.feedback.store.FeedbackStore", lambda db: fake)


def _row(p_err_canary: float, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    return lambda i: request("canary" if i % 2 else "champion", i, rng,
                             p_err=p_err_canary if i % 2 else 0.02)


def test_local_analysis_stops_early_on_harm(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTraffic(_row(0.25))
    _install(monkeypatch, fake)
    r = canary.analyze_canary(cfg, 0.0)
    s = r["sequential"]
    assert r["decision"] == "rollback" and r["test"] == "sequential" and s["stopped_early"] is True
    assert 1 < s["looks"] < 20
    assert fake.calls == [(100 * j, 100 * (j + 1)) for j in range(s["looks"])]  # batch by batch, users continue
    assert r["replayed_requests"] == len(fake.rows) == 100 * s["looks"] < cfg.deploy.canary.requests
    assert len(s["history"]) == s["looks"] and s["history"][-1]["decision"] == "rollback"
    assert set(r) >= {"decision", "checks", "figures", "replayed_requests", "test", "sequential"}
    assert r["figures"]["canary"]["requests"] == s["requests"]["canary"]
    json.dumps(r, allow_nan=False)  # canary.json: plain JSON, unbounded ends as null


def test_local_analysis_runs_to_the_window_maximum_without_a_decision(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_config(tiny_config(tmp_path, Path("/nonexistent-model"), deploy__canary__requests=40,
                                deploy__canary__batch_requests=10))
    fake = FakeTraffic(_row(0.02))
    _install(monkeypatch, fake)
    r = canary.analyze_canary(c, 0.0)
    assert r["decision"] == "promote" and r["sequential"]["stopped_early"] is False
    assert r["sequential"]["looks"] == 4 and r["replayed_requests"] == 40


def _with_looks(fake: FakeTraffic, tmp_path: Path) -> Any:
    """The fake store with a real database under it: the analysis writes its looks there."""
    from tuneloop.feedback.canary_looks import CanaryLooks
    from tuneloop.feedback.store import FeedbackStore

    fake.engine = FeedbackStore(tmp_path / "looks.db").engine
    return CanaryLooks(fake.engine)


def test_every_look_is_recorded_for_metrics(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeTraffic(_row(0.25))
    looks = _with_looks(fake, tmp_path)
    _install(monkeypatch, fake)
    r = canary.analyze_canary(cfg, 5.0)
    s = r["sequential"]
    rows = looks.looks(5.0)
    assert [lk["look"] for lk in rows] == list(range(1, s["looks"] + 1))
    assert [lk["decision"] for lk in rows] == [h["decision"] for h in s["history"]]
    assert rows[-1]["decision"] == r["decision"] == "rollback" and looks.latest() == rows[-1]
    for lk, h in zip(rows, s["history"]):
        assert lk["requests"] == {"canary": h["canary"], "champion": h["champion"]}
        assert lk["test"] == "sequential" and (lk["canary_version"], lk["champion_version"]) == ("7", "6")
        for m in seq.METRICS:
            assert lk["metrics"][m]["no_difference"]["e_value"] == pytest.approx(h[f"{m}.e_value_no_difference"])
    last = rows[-1]["metrics"]
    for m in seq.METRICS:
        rec = s["metrics"][m]
        assert last[m] == {"no_difference": {"e_value": pytest.approx(rec["e_value_no_difference"]),
                                             "threshold": rec["rollback_at"]},
                           "margin": {"e_value": pytest.approx(rec["e_value_margin"]), "threshold": rec["promote_at"]}}
    assert last["error_rate"]["no_difference"]["e_value"] >= last["error_rate"]["no_difference"]["threshold"] == 60


def test_the_fixed_test_records_its_one_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_config(tiny_config(tmp_path, Path("/nonexistent-model"), deploy__canary__test="fixed",
                                deploy__canary__requests=40))
    fake = FakeTraffic(_row(0.02))
    looks = _with_looks(fake, tmp_path)
    _install(monkeypatch, fake)
    r = canary.analyze_canary(c, 5.0)
    (look,) = looks.looks(5.0)
    assert look["look"] == 1 and look["test"] == "fixed" and look["decision"] == r["decision"]
    assert look["requests"] == {v: r["figures"][v]["requests"] for v in ("canary", "champion")}
    assert look["metrics"] == {}


def test_a_failed_look_write_costs_the_analysis_nothing(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tuneloop.feedback.canary_looks import CanaryLooks

    fake = FakeTraffic(_row(0.25))
    _with_looks(fake, tmp_path)
    _install(monkeypatch, fake)

    def refuse(self: Any, **kw: Any) -> None:
        raise RuntimeError("database refused the look")

    monkeypatch.setattr(CanaryLooks, "add", refuse)
    with caplog.at_level(logging.WARNING, logger="tuneloop.canary"):
        r = canary.analyze_canary(cfg, 5.0)
    assert r["decision"] == "rollback" and "not recorded: database refused the look" in caplog.text


def _kserve(cfg: RunConfig, **canary_kw: Any) -> RunConfig:
    dep = cfg.deploy.model_copy(update={"backend": "kserve",
                                        "canary": cfg.deploy.canary.model_copy(update=canary_kw)})
    return cfg.model_copy(update={"deploy": dep})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_kserve_polls_until_a_decision(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(canary.time, "time", clock.time)
    monkeypatch.setattr(canary.time, "sleep", clock.sleep)
    row = _row(0.6)
    fake = FakeTraffic(row)
    fake.requests = lambda since=0.0: [row(i) for i in range(int((clock.now - 1000.0) * 2))]  # 2 requests/s
    monkeypatch.setattr("tuneloop.feedback.store.FeedbackStore", lambda db: fake)
    r = canary.analyze_canary(_kserve(cfg), 1000.0)
    assert r["decision"] == "rollback" and r["sequential"]["stopped_early"] is True
    assert clock.now - 1000.0 < 10 * 60 < cfg.deploy.canary.window_minutes * 60  # well before the window's end
    assert r["replayed_requests"] == 0


def test_kserve_window_is_cut_to_the_task_timeout(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    monkeypatch.setattr(canary.time, "time", clock.time)
    monkeypatch.setattr(canary.time, "sleep", clock.sleep)
    fake = FakeTraffic(_row(0.02))
    fake.requests = lambda since=0.0: []  # no traffic at all: only the deadline ends it
    monkeypatch.setattr("tuneloop.feedback.store.FeedbackStore", lambda db: fake)
    timeout_s = cfg.platform.task_timeout_minutes * 60
    for test in ("sequential", "fixed"):
        clock.now = 1000.0
        with caplog.at_level(logging.WARNING, logger="tuneloop.canary"):
            r = canary.analyze_canary(_kserve(cfg, window_minutes=600.0, test=test), 1000.0)
        assert r["decision"] == "rollback"  # nothing to compare
        waited = clock.now - 1000.0
        assert timeout_s - 300 <= waited <= timeout_s - 290, (test, waited)  # reserve: min(5 min, 20%)
        assert "platform.task_timeout_minutes" in caplog.text and "window_minutes" in caplog.text
    # a window within the budget is waited in full and not cut
    caplog.clear()
    clock.now = 1000.0
    with caplog.at_level(logging.WARNING, logger="tuneloop.canary"):
        canary.analyze_canary(_kserve(cfg, window_minutes=5.0, test="fixed"), 1000.0)
    assert clock.now == pytest.approx(1300.0) and "timeout" not in caplog.text


# -- config --
def test_config_defaults_and_refusals(tmp_path: Path) -> None:
    c = CanaryConfig()
    assert (c.test, c.batch_requests, c.min_requests, c.inconclusive) == ("sequential", 10, 20, "promote")
    assert CanaryConfig(requests=5).batch_requests == 10  # a default larger than a small window: one look
    for kw, needle in (({"deploy__canary__batch_requests": 500}, "batch_requests: 500 exceeds `requests` (12)"),
                       ({"deploy__canary__test": "fixed", "deploy__canary__inconclusive": "rollback"},
                        "inconclusive: `rollback` applies to the sequential test"),
                       ({"deploy__canary__test": "bayesian"}, "deploy.canary.test"),
                       ({"deploy__canary__min_requests": 0}, "deploy.canary.min_requests"),
                       ({"deploy__canary__batch_requests": 0}, "deploy.canary.batch_requests")):
        with pytest.raises(ConfigError, match="deploy.canary") as e:
            load_config(tiny_config(tmp_path, Path("/nonexistent-model"), **kw))
        assert needle in str(e.value), (kw, str(e.value))


def test_a_kserve_window_longer_than_the_analyze_task_is_refused_at_load(tmp_path, tiny_model_dir) -> None:
    import yaml
    from conftest import tiny_config

    from tuneloop.config import ConfigError, load_config

    raw = yaml.safe_load(tiny_config(tmp_path, tiny_model_dir).read_text())
    raw["deploy"] = {"backend": "kserve", "kserve": {"base_model_uri": "pvc://models/base"},
                     "canary": {"window_minutes": 60}}
    raw["kubernetes"] = {"state_pvc": "tl-state"}
    raw["state_dir"] = str(tmp_path)
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"deploy.canary.window_minutes: 60 minutes do not fit .* at most 55"):
        load_config(path)
    raw["deploy"]["canary"]["window_minutes"] = 55
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).deploy.canary.window_minutes == 55
