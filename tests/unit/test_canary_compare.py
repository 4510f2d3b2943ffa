"""Canary analysis (`compare`), the sticky traffic split and feedback score conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from tuneloop.config import RunConfig, load_config
from tuneloop.deploy.canary import compare
from tuneloop.deploy.gateway import in_canary
from tuneloop.feedback.service import feedback_score

pytestmark = pytest.mark.unit


@pytest.fixture()
def cfg(tmp_path: Path) -> RunConfig:
    # thresholds set here (the documented defaults), not inherited from the shared tiny config
    return load_config(tiny_config(tmp_path, Path("/nonexistent-model"), deploy__canary__max_p95_latency_ratio=2.0,
                                   deploy__canary__max_error_rate_increase=0.05,
                                   deploy__canary__min_feedback_delta=-0.1, deploy__canary__alpha=0.05))


def side(variant: str, n: int, *, errors: int = 0, latency: float = 100.0,
         scores: list[float | None] | None = None) -> list[dict[str, Any]]:
    """n requests of one variant; the first `errors` fail; latency jitters by a few ms."""
    scores = scores if scores is not None else [None] * n
    assert len(scores) == n
    return [{"request_id": f"{variant}-{i}", "variant": variant, "model_version": "7" if variant == "canary" else "6",
             "status": "error" if i < errors else "ok", "latency_ms": latency + (i % 5), "score": scores[i],
             "created": float(i)} for i in range(n)]


def checks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in result["checks"]}


def mixed(n: int, good: int) -> list[float | None]:
    return [1.0] * good + [0.0] * (n - good)


def test_equal_healthy_sides_promote(cfg: RunConfig) -> None:
    rows = side("champion", 40, errors=1, scores=mixed(40, 30)) + side("canary", 40, errors=1, scores=mixed(40, 29))
    r = compare(rows, cfg)
    assert r["decision"] == "promote", r
    c = checks(r)
    assert set(c) == {"error_rate", "p95_latency", "feedback"}
    assert all(x["passed"] for x in c.values())
    f = r["figures"]
    assert f["canary"]["requests"] == 40 and f["canary"]["errors"] == 1
    assert f["canary"]["error_rate"] == pytest.approx(1 / 40)
    assert f["champion"]["feedback_n"] == 40 and f["champion"]["feedback_mean"] == pytest.approx(0.75)
    assert f["canary"]["p95_latency_ms"] == 104.0
    assert "_scores" not in f["canary"]  # internal lists are not part of the result


def test_many_canary_errors_roll_back(cfg: RunConfig) -> None:
    rows = side("champion", 40) + side("canary", 40, errors=12)
    r = compare(rows, cfg)
    assert r["decision"] == "rollback"
    c = checks(r)
    assert c["error_rate"]["passed"] is False
    assert "canary 0.300 vs champion 0.000" in c["error_rate"]["detail"]
    assert c["p95_latency"]["passed"] and c["feedback"]["passed"]
    assert r["figures"]["canary"]["p95_latency_ms"] == 104.0  # errors do not count towards latency


def test_one_unlucky_error_is_not_significant(cfg: RunConfig) -> None:
    # 1 of 10 is above the +0.05 margin, but Fisher's test cannot tell it from chance
    r = compare(side("champion", 10) + side("canary", 10, errors=1), cfg)
    assert checks(r)["error_rate"]["passed"] and r["decision"] == "promote"


def test_error_increase_within_margin_passes(cfg: RunConfig) -> None:
    r = compare(side("champion", 200, errors=20) + side("canary", 200, errors=28), cfg)
    assert checks(r)["error_rate"]["passed"]  # +0.04 <= +0.05


def test_slow_canary_rolls_back(cfg: RunConfig) -> None:
    r = compare(side("champion", 40, latency=100) + side("canary", 40, latency=450), cfg)
    assert r["decision"] == "rollback"
    c = checks(r)
    assert c["p95_latency"]["passed"] is False and "limit 2.0" in c["p95_latency"]["detail"]
    assert c["error_rate"]["passed"]


def test_latency_ratio_at_the_limit_passes(cfg: RunConfig) -> None:
    r = compare(side("champion", 20, latency=100) + side("canary", 20, latency=204), cfg)
    assert r["figures"]["canary"]["p95_latency_ms"] / r["figures"]["champion"]["p95_latency_ms"] == 2.0
    assert checks(r)["p95_latency"]["passed"]


def test_worse_feedback_rolls_back(cfg: RunConfig) -> None:
    rows = side("champion", 40, scores=mixed(40, 30)) + side("canary", 40, scores=mixed(40, 10))
    r = compare(rows, cfg)
    assert r["decision"] == "rollback"
    c = checks(r)
    assert c["feedback"]["passed"] is False
    assert "delta -0.500" in c["feedback"]["detail"]
    assert c["error_rate"]["passed"] and c["p95_latency"]["passed"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy: constant samples
def test_constant_but_worse_feedback_rolls_back(cfg: RunConfig) -> None:
    # Welch's test is undefined for two constant samples; a clear drop still counts
    rows = side("champion", 5, scores=[1.0] * 5) + side("canary", 5, scores=[0.0] * 5)
    assert not checks(compare(rows, cfg))["feedback"]["passed"]


def test_slightly_worse_or_noisy_feedback_passes(cfg: RunConfig) -> None:
    # -0.05 is above the -0.1 floor
    r = compare(side("champion", 40, scores=mixed(40, 30)) + side("canary", 40, scores=mixed(40, 28)), cfg)
    assert checks(r)["feedback"]["passed"]
    # -0.33 but on three ratings each: not significant
    r = compare(side("champion", 3, scores=[1.0, 1.0, 0.0]) + side("canary", 3, scores=[1.0, 0.0, 0.0]), cfg)
    assert checks(r)["feedback"]["passed"]


def test_too_little_feedback_is_not_tested(cfg: RunConfig) -> None:
    rows = side("champion", 20, scores=[1.0, 1.0] + [None] * 18) + side("canary", 20, scores=[0.0] * 2 + [None] * 18)
    c = checks(compare(rows, cfg))
    assert c["feedback"]["passed"] and "not enough feedback" in c["feedback"]["detail"]
    assert compare(rows, cfg)["figures"]["canary"]["feedback_n"] == 2


def test_no_canary_traffic_rolls_back(cfg: RunConfig) -> None:
    r = compare(side("champion", 40, scores=mixed(40, 40)), cfg)
    assert r["decision"] == "rollback"
    c = checks(r)
    assert c["traffic"]["passed"] is False and "canary received no requests" in c["traffic"]["detail"]
    assert compare([], cfg)["decision"] == "rollback"


def test_no_champion_traffic_is_no_evidence(cfg: RunConfig) -> None:
    # a canary that failed every request must not be promoted because there was nothing to compare with
    r = compare(side("canary", 40, errors=40), cfg)
    assert r["decision"] == "rollback"
    c = checks(r)
    assert c["traffic"]["passed"] is False and "champion received no requests" in c["traffic"]["detail"]


def test_thresholds_come_from_the_config(tmp_path: Path) -> None:
    loose = load_config(tiny_config(tmp_path, Path("/nonexistent-model"),
                                    deploy__canary__max_p95_latency_ratio=10.0))
    rows = side("champion", 40, latency=100) + side("canary", 40, latency=450)
    assert compare(rows, loose)["decision"] == "promote"


# -- the sticky split --
def test_in_canary_is_sticky_and_proportional() -> None:
    users = [f"user-{i}" for i in range(10_000)]
    for percent in (5, 20, 50, 80):
        first = [in_canary(u, percent) for u in users]
        assert first == [in_canary(u, percent) for u in users]  # sticky
        share = sum(first) / len(users)
        assert abs(share - percent / 100) < 0.02, (percent, share)
    # a user in the canary at 20% stays in it when the share grows
    assert all(in_canary(u, 50) for u in users if in_canary(u, 20))
    assert not any(in_canary(u, 0) for u in users)
    assert all(in_canary(u, 100) for u in users)


# -- feedback scores --
@pytest.mark.parametrize("body,score", [
    ({"thumbs": "up"}, 1.0), ({"thumbs": "down"}, 0.0),
    ({"rating": 1}, 0.0), ({"rating": 3}, 0.5), ({"rating": 5}, 1.0), ({"rating": 4.5}, 0.875),
    ({"score": 0}, 0.0), ({"score": 0.3}, 0.3), ({"score": 1}, 1.0),
    ({"correction": "better"}, None), ({}, None),
    ({"thumbs": "up", "rating": 1}, 1.0),  # thumbs first
])
def test_feedback_score_conversions(body: dict[str, Any], score: float | None) -> None:
    assert feedback_score(body) == score


@pytest.mark.parametrize("body,needle", [
    ({"thumbs": "sideways"}, "`thumbs`"), ({"thumbs": None}, "`thumbs`"),
    ({"rating": 0}, "`rating`"), ({"rating": 6}, "`rating`"), ({"rating": "5"}, "`rating`"),
    ({"score": 1.01}, "`score`"), ({"score": -0.1}, "`score`"), ({"score": "high"}, "`score`"),
])
def test_feedback_score_refusals(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        feedback_score(body)


def test_latency_is_not_judged_on_a_handful_of_requests(tmp_path):
    cfg = load_config(tiny_config(tmp_path, Path("/nonexistent-model"), deploy__canary__max_p95_latency_ratio=2.0))
    few = side("champion", 6, latency=5.0) + side("canary", 6, latency=5.0)
    few[-1]["latency_ms"] = 400.0  # one stall on the canary side
    c = checks(compare(few, cfg))
    assert c["p95_latency"]["passed"] and "not enough answered requests" in c["p95_latency"]["detail"]
    many = side("champion", 40, latency=5.0) + side("canary", 40, latency=50.0)
    assert checks(compare(many, cfg))["p95_latency"]["passed"] is False


# -- `deploy.canary.test: fixed` is this comparison, once, over the whole window --
def test_fixed_test_is_compare_over_the_whole_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.deploy import canary

    cfg = load_config(tiny_config(tmp_path, Path("/nonexistent-model"), deploy__canary__test="fixed",
                                  deploy__canary__requests=80, deploy__canary__max_p95_latency_ratio=2.0))
    rows = side("champion", 40, errors=1, scores=mixed(40, 30)) + side("canary", 40, errors=12, scores=mixed(40, 20))
    replays: list[tuple[int, int | None]] = []

    class Store:
        def __init__(self, db: Any) -> None:
            pass

        def requests(self, since: float = 0.0) -> list[dict[str, Any]]:
            return rows

    def replay(cfg_: RunConfig, since: float, start: int = 0, count: int | None = None) -> int:
        replays.append((start, count))
        return cfg_.deploy.canary.requests

    monkeypatch.setattr(canary, "replay_traffic", replay)
    monkeypatch.setattr("tuneloop.feedback.store.FeedbackStore", Store)
    result = canary.analyze_canary(cfg, 0.0)
    assert replays == [(0, None)]  # one pass over the window, no batches
    assert result == {**compare(rows, cfg), "replayed_requests": 80, "test": "fixed"}
    assert result["decision"] == "rollback" and "sequential" not in result
