"""The promotion gate and the per-slice metrics, on hand-computed cases."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tuneloop.config import EvaluateConfig, GateRule
from tuneloop.evaluate.gates import apply_gates, gate_table
from tuneloop.evaluate.metrics import macro_f1, normalize_answer, slice_metrics, token_f1

pytestmark = pytest.mark.unit


def rule(metric: str, slice_: str = "s", **bound: float) -> GateRule:
    return GateRule(metric=metric, slice=slice_, **bound)


def one(r: GateRule, cand: float | None, champ: float | None = None) -> dict[str, Any]:
    candidate = {"s": {r.metric: cand}} if cand is not None else {"s": {}}
    champion = {"s": {r.metric: champ}} if champ is not None else {}
    decision = apply_gates([r], candidate, champion, "champion v3")
    assert decision["reference"] == "champion v3"
    (entry,) = decision["rules"]
    assert decision["passed"] == entry["passed"]
    return entry


# -- absolute bounds --
@pytest.mark.parametrize("cand,ok", [(0.9, True), (0.5, True), (0.4999, False), (0.0, False)])
def test_min_on_higher_is_better(cand: float, ok: bool) -> None:
    e = one(rule("accuracy", min=0.5), cand)
    assert e["passed"] is ok
    assert e["kind"] == "min" and e["threshold"] == 0.5 and e["candidate"] == cand
    assert ("floor 0.5" in e["why"]) and ((">=" in e["why"]) is ok)


@pytest.mark.parametrize("cand,ok", [(1.0, True), (2.0, True), (2.0001, False), (7.5, False)])
def test_max_on_lower_is_better(cand: float, ok: bool) -> None:
    e = one(rule("nll", max=2.0), cand)
    assert e["passed"] is ok
    assert e["kind"] == "max" and e["threshold"] == 2.0
    assert "ceiling 2.0" in e["why"] and (("<=" in e["why"]) is ok)


# -- regression against the champion --
@pytest.mark.parametrize("cand,ok", [(0.95, True), (0.8, True), (0.75, True), (0.7499, False), (0.1, False)])
def test_max_regression_higher_is_better(cand: float, ok: bool) -> None:
    e = one(rule("accuracy", max_regression=0.05), cand, champ=0.8)
    assert e["passed"] is ok, e
    assert e["kind"] == "max_regression" and e["threshold"] == pytest.approx(0.75) and e["champion"] == 0.8
    assert "champion v3 0.8000" in e["why"] and "allowed -0.05" in e["why"]
    assert f"change {cand - 0.8:+.4f}" in e["why"]


@pytest.mark.parametrize("cand,ok", [(0.5, True), (1.0, True), (1.5, True), (1.5001, False), (3.0, False)])
def test_max_regression_lower_is_better(cand: float, ok: bool) -> None:
    e = one(rule("nll", max_regression=0.5), cand, champ=1.0)
    assert e["passed"] is ok, e
    assert e["threshold"] == pytest.approx(1.5)
    assert "allowed +0.5" in e["why"]


def test_zero_regression_allows_ties_only() -> None:
    assert one(rule("token_f1", max_regression=0.0), 0.6, champ=0.6)["passed"]
    assert not one(rule("token_f1", max_regression=0.0), 0.5999, champ=0.6)["passed"]
    assert one(rule("perplexity", max_regression=0.0), 3.0, champ=3.0)["passed"]
    assert not one(rule("perplexity", max_regression=0.0), 3.0001, champ=3.0)["passed"]


def test_missing_metric_fails_with_explanation() -> None:
    rules = [rule("accuracy", "s", min=0.5), rule("macro_f1", "gone", min=0.1)]
    d = apply_gates(rules, {"s": {"accuracy": 0.9}}, {"s": {"accuracy": 0.9}}, "base model")
    assert d["passed"] is False
    ok, missing = d["rules"]
    assert ok["passed"] and not missing["passed"]
    assert missing["kind"] == "missing" and missing["candidate"] is None and missing["threshold"] is None
    assert "macro_f1" in missing["why"] and "'gone'" in missing["why"]


def test_all_rules_must_pass_and_table_shows_failures() -> None:
    rules = [rule("accuracy", "tickets", min=0.5), rule("token_f1", "qa", max_regression=0.1),
             rule("nll", "qa", max=2.0)]
    cand = {"tickets": {"accuracy": 0.8}, "qa": {"token_f1": 0.3, "nll": 1.5}}
    champ = {"tickets": {"accuracy": 0.4}, "qa": {"token_f1": 0.6, "nll": 1.4}}
    d = apply_gates(rules, cand, champ, "base model")
    assert [e["passed"] for e in d["rules"]] == [True, False, True]
    assert d["passed"] is False
    table = gate_table(d)
    assert table.startswith("**Gate: FAILED** (reference: base model)")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3
    assert rows[0] == "| tickets | accuracy | 0.8000 | 0.4000 | min 0.5000 | pass | candidate 0.8000 >= floor 0.5 |"
    assert rows[1].startswith("| qa | token_f1 | 0.3000 | 0.6000 | max_regression 0.5000 | **FAIL** | ")
    assert "change -0.3000, allowed -0.1" in rows[1]
    assert "| max 2.0000 | pass |" in rows[2]
    assert table.count("**FAIL**") == 1
    passing = apply_gates(rules[:1], cand, champ, "base model")
    assert passing["passed"] and "**Gate: PASSED**" in gate_table(passing) and "FAIL" not in gate_table(passing)


def test_missing_row_in_table() -> None:
    d = apply_gates([rule("nll", "x", max=1.0)], {}, {}, "base model")
    assert "| x | nll | - | - | missing - | **FAIL** |" in gate_table(d)


# -- text metrics --
@pytest.mark.parametrize("raw,norm", [("The  Cat!", "the cat"), ("  Billing.\n", "billing"),
                                      ("It's 5-6 p.m.", "its 56 pm"), ("", "")])
def test_normalize_answer(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("pred,ref,f1", [
    ("the cat sat", "the cat", 0.8),  # p=2/3, r=1
    ("Paris", "paris.", 1.0),
    ("a a b", "a b b", 2 / 3),  # multiset overlap: one a, one b
    ("dog", "cat", 0.0),
    ("", "", 1.0),
    ("something", "", 0.0),
    ("", "something", 0.0),
    ("The capital is Paris", "Paris", 0.4),  # p=1/4, r=1
])
def test_token_f1(pred: str, ref: str, f1: float) -> None:
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_macro_f1() -> None:
    labels = ["a", "b", "c"]
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn0 -> 2/3; c: tp0 -> 0
    assert macro_f1(["a", "b", "b", "x"], ["a", "a", "b", "c"], labels) == pytest.approx(4 / 9)
    assert macro_f1(["a", "b", "c"], ["a", "b", "c"], labels) == 1.0
    assert macro_f1(["x", "x"], ["a", "b"], labels) == 0.0


# -- slice metrics --
def _rec(slice_: str, pred: str, ref: str, nll_sum: float, n: int) -> dict[str, Any]:
    return {"id": f"{slice_}-{pred}-{ref}", "slice": slice_, "prediction": pred, "reference": ref,
            "nll_sum": nll_sum, "n_tokens": n}


@pytest.fixture()
def metrics() -> dict[str, dict[str, Any]]:
    cfg = EvaluateConfig(slices={"tickets": {"task": "classification", "labels": ["Billing", "Shipping"]},
                                 "qa": {"task": "generation"}},
                         gates=[{"metric": "nll", "slice": "all", "max": 5.0}])
    scored = [
        _rec("tickets", "Billing.", "billing", 2.0, 2),
        _rec("tickets", "shipping", "billing", 4.0, 2),
        _rec("tickets", "I don't know", "shipping", 3.0, 1),
        _rec("tickets", "shipping", "shipping", 1.0, 1),
        _rec("qa", "The capital is Paris", "Paris", 6.0, 3),
    ]
    return slice_metrics(scored, cfg)


def test_slice_metrics_groups(metrics: dict[str, dict[str, Any]]) -> None:
    assert set(metrics) == {"tickets", "qa", "all"}
    assert metrics["tickets"]["n"] == 4 and metrics["qa"]["n"] == 1 and metrics["all"]["n"] == 5


def test_nll_is_averaged_over_tokens(metrics: dict[str, dict[str, Any]]) -> None:
    assert metrics["tickets"]["nll"] == pytest.approx(10 / 6)  # not the mean of per-record means
    assert metrics["qa"]["nll"] == pytest.approx(2.0)
    assert metrics["all"]["nll"] == pytest.approx(16 / 9)
    for m in metrics.values():
        assert m["perplexity"] == pytest.approx(math.exp(m["nll"]))


def test_classification_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    t = metrics["tickets"]
    assert t["accuracy"] == pytest.approx(0.5)
    assert t["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # billing 2/3, shipping 2/4
    assert t["exact_match"] == pytest.approx(0.5)
    assert "per_record_exact_match" not in t  # per-record values stay internal (record_values)
    assert t["token_f1"] == pytest.approx(0.5)


def test_confusion_matrix(metrics: dict[str, dict[str, Any]]) -> None:
    conf = metrics["tickets"]["confusion"]
    assert conf["labels"] == ["billing", "shipping", "(other)"]
    m = conf["matrix"]
    assert len(m) == 3 and all(len(row) == 3 for row in m)  # square
    # rows: reference, columns: prediction
    assert m == [[1, 1, 0],   # billing: once right, once predicted shipping
                 [0, 1, 1],   # shipping: once right, once an answer that is no label
                 [0, 0, 0]]   # no reference is "(other)"
    assert sum(map(sum, m)) == metrics["tickets"]["n"]


def test_generation_slice_has_no_classification_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    qa = metrics["qa"]
    assert "accuracy" not in qa and "confusion" not in qa and "macro_f1" not in qa
    assert qa["exact_match"] == 0.0 and qa["token_f1"] == pytest.approx(0.4)
    assert "accuracy" not in metrics["all"]  # hence the config refuses accuracy gates on `all`
    assert metrics["all"]["exact_match"] == pytest.approx(2 / 5)
    assert metrics["all"]["token_f1"] == pytest.approx((1 + 0 + 0 + 1 + 0.4) / 5)


def test_gates_over_slice_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    rules = [rule("accuracy", "tickets", min=0.5), rule("nll", "all", max=2.0), rule("token_f1", "qa", min=0.5)]
    d = apply_gates(rules, metrics, metrics, "champion")
    assert [e["passed"] for e in d["rules"]] == [True, True, False]


def test_record_values_and_cost_matrix() -> None:
    from tuneloop.config import SliceConfig
    from tuneloop.evaluate.metrics import metric_from_values, record_values

    sl = SliceConfig(task="classification", labels=["positive", "negative"],
                     costs={"negative": {"positive": 5.0}})
    rows = [_rec("s", "positive", "negative", 1.0, 1),  # costly error: 5
            _rec("s", "negative", "positive", 1.0, 1),  # unlisted error: 1
            _rec("s", "maybe", "positive", 1.0, 1),     # not a label: (other), 1
            _rec("s", "negative", "negative", 1.0, 1)]  # correct: 0
    v = record_values(rows, sl)
    assert v["cost"].tolist() == [5.0, 1.0, 1.0, 0.0]
    assert metric_from_values(v, "cost") == pytest.approx(7 / 4)
    assert v["exact_match"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert metric_from_values(v, "rouge_l") == pytest.approx(0.25)


def test_over_refusal_counts_refusals_on_a_generation_slice_only() -> None:
    from tuneloop.config import SliceConfig
    from tuneloop.evaluate.metrics import metric_from_values, record_values

    rows = [_rec("qa", "I'm sorry, but I can't help with that.", "Paris", 1.0, 1),
            _rec("qa", "The capital of France is Paris.", "Paris", 1.0, 1),
            _rec("qa", "I cannot provide that information", "Ottawa", 1.0, 1),
            _rec("qa", "Ottawa", "Ottawa", 1.0, 1)]
    v = record_values(rows, SliceConfig(task="generation"))
    assert v["over_refusal"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert metric_from_values(v, "over_refusal") == pytest.approx(0.5)
    cls = record_values(rows, SliceConfig(task="classification", labels=["Paris", "Ottawa"]))
    assert "over_refusal" not in cls  # a label answer is no refusal question
    e = one(rule("over_refusal", max_regression=0.1), 0.5, 0.25)  # lower is better: +0.25 is a regression
    assert e["passed"] is False and "allowed +0.1" in e["why"]


def test_paired_bootstrap_interval_brackets_the_true_difference() -> None:
    import numpy as np

    from tuneloop.evaluate.metrics import paired_bootstrap

    n = 400
    rng = np.random.default_rng(1)
    base = rng.random(n) < 0.7
    better = base | (rng.random(n) < 0.5)  # strictly better on the same records
    def vals(x):  # noqa: ANN001, ANN202
        return {"nll_sum": np.ones(n), "n_tokens": np.ones(n), "accuracy": x.astype(float)}
    lo, hi = paired_bootstrap(vals(better), vals(base), "accuracy", 1000, 0.95, 0)
    true = better.mean() - base.mean()
    assert lo <= true <= hi and lo > 0
    lo, hi = paired_bootstrap(vals(base), vals(base), "accuracy", 500, 0.95, 0)
    assert lo == hi == 0.0  # identical models: no uncertainty in the paired difference


def _vals(correct) -> dict:  # noqa: ANN001
    import numpy as np

    a = np.array(correct, dtype=float)
    return {"nll_sum": np.ones(len(a)), "n_tokens": np.ones(len(a)), "accuracy": a}


def test_confidence_gate_on_a_tiny_noisy_slice_is_inconclusive_not_lucky() -> None:
    """8 records, the candidate 1 worse: the point estimate (-0.125) breaks a 0.1 tolerance, but the
    interval is wide -> inconclusive, decided by the policy rather than by the noise."""
    champ, cand = [1, 1, 1, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 1, 0, 1]
    m = {"s": {"accuracy": sum(cand) / 8}}, {"s": {"accuracy": sum(champ) / 8}}
    values = {"candidate": {"s": _vals(cand)}, "champion": {"s": _vals(champ)}}
    for policy, expect in (("fail", False), ("pass", True)):
        r = rule("accuracy", "s", max_regression=0.1, confidence=0.95, inconclusive=policy)
        d = apply_gates([r], *m, "champion v1", values, bootstrap_samples=500)
        assert d["rules"][0]["verdict"] == "inconclusive" and d["passed"] is expect
    point = apply_gates([rule("accuracy", "s", max_regression=0.1)], *m, "champion v1")
    assert point["passed"] is False  # without confidence the noise decides


def test_confidence_gate_decides_when_the_data_is_clear() -> None:
    n = 300
    champ = [1] * n
    same = apply_gates([rule("accuracy", "s", max_regression=0.05, confidence=0.95)],
                       {"s": {"accuracy": 1.0}}, {"s": {"accuracy": 1.0}}, "champion",
                       {"candidate": {"s": _vals(champ)}, "champion": {"s": _vals(champ)}}, 300)
    assert same["rules"][0]["verdict"] == "pass"
    forgot = [1 if i % 2 else 0 for i in range(n)]  # drops from 1.0 to 0.5
    bad = apply_gates([rule("accuracy", "s", max_regression=0.05, confidence=0.95, inconclusive="pass")],
                      {"s": {"accuracy": 0.5}}, {"s": {"accuracy": 1.0}}, "champion",
                      {"candidate": {"s": _vals(forgot)}, "champion": {"s": _vals(champ)}}, 300)
    assert bad["rules"][0]["verdict"] == "fail" and bad["passed"] is False
