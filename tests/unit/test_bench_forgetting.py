"""The pure helpers of bench/forgetting_repair.py: the balanced sample, the change cells, the tables."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import forgetting_repair as fr  # noqa: E402


def test_balanced_split_is_disjoint_balanced_deduplicated_and_seeded() -> None:
    texts = [f"spam {i}" for i in range(30)] + [f"ham {i}" for i in range(200)] + ["HAM  0", "x" * 300]
    labels = ["spam"] * 30 + ["ham"] * 200 + ["ham", "ham"]
    train, evals = fr.balanced_split(texts, labels, n_train=40, n_eval=20, seed=3, max_chars=200)
    assert Counter(y for _, y in evals) == {"spam": 10, "ham": 10}
    assert Counter(y for _, y in train) == {"spam": 20, "ham": 20}
    assert not {t for t, _ in train} & {t for t, _ in evals}
    assert "HAM  0" not in {t for t, _ in train + evals}  # a duplicate of "ham 0" once case and spaces are ignored
    assert all(len(t) <= 200 for t, _ in train + evals)
    assert fr.balanced_split(texts, labels, 40, 20, seed=3) == (train, evals)
    assert fr.balanced_split(texts, labels, 40, 20, seed=4) != (train, evals)
    # a label that runs out: evaluation is served first, training gets what is left
    train, evals = fr.balanced_split(texts, labels, n_train=100, n_eval=20, seed=0)
    assert Counter(y for _, y in train) == {"spam": 20, "ham": 50}


def test_change_cell_and_spread() -> None:
    rule = {"slice": "a", "metric": "nll", "candidate": 5.5, "champion": 5.0, "ci": [0.4, 0.6], "verdict": "fail",
            "passed": False}
    assert fr.change_cell(rule) == "+0.500 [+0.400, +0.600] fail"
    assert fr.change_cell({**rule, "ci": None, "verdict": None, "passed": True}) == "+0.500 pass"
    assert fr.change_cell(None) == "-"
    assert fr.spread([]) == "-" and fr.spread([0.25]) == "+0.250"
    assert fr.spread([0.3, -0.1, 0.2]) == "+0.200 [-0.100..+0.300]"


def test_gates_rule_per_slice_and_metric() -> None:
    gates = fr._gates(["new", "old"], accuracy=("old",))
    assert [(g["slice"], g["metric"]) for g in gates] == [("new", "nll"), ("old", "nll"), ("old", "accuracy")]
    assert all(g["max_regression"] == fr.TOLERANCE and g["confidence"] == fr.CONFIDENCE for g in gates)


def _result() -> dict:
    def rules(old_nll: float, ok: bool) -> list[dict]:
        return [{"slice": "new", "metric": "nll", "candidate": 4.0, "champion": 6.0, "ci": [-2.1, -1.9],
                 "verdict": "pass", "passed": True},
                {"slice": "old", "metric": "nll", "candidate": old_nll, "champion": 5.0, "ci": [0.0, 0.05],
                 "verdict": "pass" if ok else "fail", "passed": ok},
                {"slice": "old", "metric": "accuracy", "candidate": 0.8, "champion": 0.9, "ci": [-0.2, 0.0],
                 "verdict": "inconclusive", "passed": False}]

    per = {"old": {"nll": 5.0, "accuracy": 0.9}, "new": {"nll": 6.0, "accuracy": 0.3}}
    return {
        "name": "x", "seed": 1, "mitigations": fr.MITIGATIONS, "old": "old", "new": "new", "champion_version": "1",
        "registered": "2",
        "walls": {"champion": 10.0, "blocked": 20.0}, "repair_stage_wall_s": 31.0,
        "counts": {"run1": {"old": 5}, "run2": {"new": 5}, "eval": {"old": 2, "new": 2}},
        "gates": fr._gates(["new", "old"], accuracy=("old",)), "classification": ["old", "new"],
        "ev2": {"passed": False, "gate": {"rules": rules(6.0, False)},
                "metrics": {"base": per, "champion": per, "candidate": per}},
        "ladder": {"ran": True, "winner": "replay", "stopped_by": "passed", "wall_s": 30.0,
                   "skipped": {"lower_lr": "why not"},
                   "attempts": [{"mitigation": "merge", "wall_s": 5.0}, {"mitigation": "replay", "wall_s": 25.0}]},
        "rows": {"merge": {"mitigation": "merge", "how": "ladder", "passed": False, "wall_s": 5.0, "error": None,
                           "slices": rules(5.5, False), "metrics": per,
                           "params": {"merge.method": "ties", "merge.weights": "[0.5, 0.5]", "dataset": "/nope"}},
                 "replay": {"mitigation": "replay", "how": "ladder", "passed": True, "wall_s": 25.0, "error": None,
                            "slices": rules(5.02, True), "metrics": per,
                            "params": {"data.replay_share": 0.5, "dataset": "/nope"}},
                 "ewc": {"mitigation": "ewc", "how": "alone", "passed": False, "wall_s": 40.0,
                         "error": "RuntimeError: boom", "slices": [], "metrics": {}, "params": {}}},
    }


def test_table_rows_columns_and_summary() -> None:
    r = _result()
    text = fr.describe(r)
    lines = text.splitlines()
    header = next(x for x in lines if x.startswith("| row"))
    assert "old nll" in header and "old acc" in header and "new acc (not gated)" in header
    blocked = next(x for x in lines if x.startswith("| blocked candidate"))
    assert "+1.000 [+0.000, +0.050] fail" in blocked and "-0.100 [-0.200, +0.000] inconclusive" in blocked
    cells = {c[0]: c for c in ([y.strip() for y in x.strip("|").split("|")] for x in lines if x.startswith("|"))}
    assert cells["replay (ladder)"][1] == "PASS" and cells["merge (ladder)"][1] == "FAIL"
    assert cells["ewc (alone)"][1] == "error: RuntimeError: boom" and cells["lower_lr"][1] == "skipped: why not"
    assert "repaired by replay" in text and "merge: merge.method=ties" in text and "Run alone" in text
    assert len({len(x) for x in lines if x.startswith("|")}) == 1  # aligned
    s = fr.summary_line(r)
    assert s["blocked"] == "true" and s["repaired_by"] == "replay" and s["rungs_passed"] == "replay"
    assert s["old_nll_change_blocked"] == "+1.000" and s["old_nll_change_repaired"] == "+0.020"
    seeds = fr.seeds_table([r, {**r, "ev2": {**r["ev2"], "gate": {"rules": r["rows"]["merge"]["slices"]}}}])
    assert "old acc change" in seeds and "+0.750 [+0.500..+1.000]" in seeds and "| replay            | 2/2 " in seeds
