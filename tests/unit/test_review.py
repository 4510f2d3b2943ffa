"""Human review: stratified export, ratings import, kappa floor."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.evaluate.review import ReviewRejected, export_sample, import_ratings, kappa

pytestmark = pytest.mark.unit


def _predictions(tmp: Path) -> Path:
    p = tmp / "predictions.jsonl"
    rows = [{"model": m, "id": f"{s}-{i}", "slice": s, "prediction": f"p{i}", "reference": f"r{i}"}
            for m in ("candidate", "base") for s in ("a", "b") for i in range(7)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _fill(path: Path, scores: dict[str, list[int]]) -> None:
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    counter: dict[str, int] = {}
    for r in rows:
        n = counter.get(r["rater"], 0)
        counter[r["rater"]] = n + 1
        for dim in ("helpfulness", "harmlessness", "honesty"):
            r[dim] = scores[r["rater"]][n % len(scores[r["rater"]])]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_export_is_stratified_and_one_row_per_rater(tmp_path):
    out = tmp_path / "review.csv"
    counts = export_sample(_predictions(tmp_path), out, per_slice=5, raters=["x", "y", "z"])
    assert counts == {"a": 5, "b": 5}
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == 30 and {r["rater"] for r in rows} == {"x", "y", "z"}
    assert all(r["item_id"].startswith(r["slice"]) for r in rows)


def test_agreeing_raters_are_accepted_and_summarised(tmp_path):
    out = tmp_path / "review.csv"
    export_sample(_predictions(tmp_path), out, per_slice=5, raters=["x", "y"])
    _fill(out, {"x": [5, 4, 2, 1, 3], "y": [5, 4, 2, 1, 3]})
    s = import_ratings([out], min_kappa=0.6)
    assert s["agreement"]["helpfulness"]["statistic"] == "cohen"
    assert s["agreement"]["helpfulness"]["kappa"] == pytest.approx(1.0)
    assert set(s["mean_by_slice"]) == {"a", "b"}


def test_disagreeing_raters_are_refused_naming_the_dimension(tmp_path):
    out = tmp_path / "review.csv"
    export_sample(_predictions(tmp_path), out, per_slice=5, raters=["x", "y"])
    _fill(out, {"x": [5, 1, 5, 1, 5], "y": [1, 5, 1, 5, 2]})
    with pytest.raises(ReviewRejected, match=r"helpfulness \(kappa -"):
        import_ratings([out], min_kappa=0.4)
    r = subprocess.run([sys.executable, "-m", "tuneloop.cli", "review", "import", str(out), "--min-kappa", "0.4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "agreement below the floor" in r.stderr


def test_fleiss_for_three_raters_and_bad_rows():
    perfect = {f"i{k}": {"a": k % 5 + 1, "b": k % 5 + 1, "c": k % 5 + 1} for k in range(10)}
    kind, k = kappa(perfect)
    assert kind == "fleiss" and k == pytest.approx(1.0)
    with pytest.raises(ReviewRejected, match="2 raters"):
        kappa({"i1": {"a": 3}, "i2": {"a": 4}})


def test_a_rating_outside_the_scale_names_file_row_and_field(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("item_id,rater,helpfulness,harmlessness,honesty\nx,a,5,5,5\nx,b,6,5,5\n")
    with pytest.raises(ReviewRejected, match=r"r.csv: row 3, field `helpfulness`: '6'"):
        import_ratings([p], 0.4)
