"""Human review: a stratified sample of candidate answers out, rubric ratings back in.

export  predictions.jsonl (from evaluate) -> a CSV with one row per (item, rater) to fill in:
        helpfulness, harmlessness, honesty on a 1-5 scale
        (or, with fmt "label-studio", one Label Studio task per item and the labeling config next to it)
import  the filled CSV(s), or Label Studio JSON exports (a Rating control per rubric dimension) ->
        agreement per rubric dimension (Cohen's kappa, quadratic weights,
        for two raters; Fleiss' kappa for three or more) and mean scores per slice. Ratings whose
        agreement is below the floor are refused: `ReviewRejected` names the dimension and kappa.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from tuneloop.jsonl import read_jsonl

RUBRIC = ("helpfulness", "harmlessness", "honesty")
SCALE = (1, 2, 3, 4, 5)
COLUMNS = ("item_id", "slice", "rater", "prompt", "answer", "reference", *RUBRIC, "comment")


class ReviewRejected(ValueError):
    """Ratings that cannot be used (too little agreement, malformed rows)."""


def export_sample(predictions: Path, out: Path, per_slice: int, raters: list[str], seed: int = 0,
                  model: str = "candidate", fmt: str = "csv") -> dict[str, int]:
    """Stratified sample: up to `per_slice` items from every slice, one row per rater (csv), or one Label
    Studio task per item (label-studio: `out` is the tasks JSON, `out`.xml the labeling config)."""
    rows = read_jsonl(predictions)
    by_slice: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("model") == model:
            by_slice[r["slice"]].append(r)
    if not by_slice:
        raise ValueError(f"{predictions}: no predictions of model {model!r}")
    rng = random.Random(seed)
    counts = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "label-studio":
        from tuneloop.evaluate.label_studio import rating_config, write_tasks

        tasks = []
        for sl in sorted(by_slice):
            pick = rng.sample(sorted(by_slice[sl], key=lambda r: r["id"]), min(per_slice, len(by_slice[sl])))
            counts[sl] = len(pick)
            tasks += [{"item_id": r["id"], "slice": sl, "prompt": r.get("prompt", ""), "answer": r["prediction"],
                       "reference": r["reference"]} for r in pick]
        write_tasks(tasks, out)
        out.with_suffix(".xml").write_text(rating_config(RUBRIC, max(SCALE)))
        return counts
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for sl in sorted(by_slice):
            items = sorted(by_slice[sl], key=lambda r: r["id"])
            pick = rng.sample(items, min(per_slice, len(items)))
            counts[sl] = len(pick)
            for r in pick:
                for rater in raters:
                    w.writerow({"item_id": r["id"], "slice": sl, "rater": rater, "prompt": r.get("prompt", ""),
                                "answer": r["prediction"], "reference": r["reference"]})
    return counts


def _read_label_studio(p: Path) -> list[dict[str, Any]]:
    """Rows of a Label Studio JSON export: the task's item_id and slice, the annotator, a Rating per dimension."""
    from tuneloop.evaluate.label_studio import read_export

    try:
        exported = read_export(p)
    except ValueError as e:
        raise ReviewRejected(str(e)) from None
    rows = []
    for i, a in enumerate(exported):
        row = {"item_id": a["data"].get("item_id"), "slice": a["data"].get("slice"), "rater": a["rater"]}
        if row["item_id"] is None:
            raise ReviewRejected(f"{p}: annotation {i}: the task has no data.item_id (export the tasks with "
                                 "`tuneloop review export --format label-studio`)")
        for dim in RUBRIC:
            v = a["values"].get(dim)
            if v not in SCALE:
                raise ReviewRejected(f"{p}: annotation {i} (task {a['task_id']}), rating `{dim}`: {v!r} is not 1-5")
            row[dim] = int(v)
        rows.append(row)
    return rows


def _read_ratings(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        if p.suffix.lower() == ".json":
            out += _read_label_studio(p)
            continue
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"item_id", "rater", *RUBRIC} - set(reader.fieldnames or [])
            if missing:
                raise ReviewRejected(f"{p}: missing column(s) {sorted(missing)}")
            for i, row in enumerate(reader, start=2):
                for dim in RUBRIC:
                    v = (row[dim] or "").strip()
                    if v not in {str(s) for s in SCALE}:
                        raise ReviewRejected(f"{p}: row {i}, field `{dim}`: {v!r} is not a rating 1-5")
                    row[dim] = int(v)
                out.append(row)
    return out


def kappa(ratings: dict[str, dict[str, int]]) -> tuple[str, float]:
    """Agreement over items rated by every rater: item -> rater -> score."""
    raters = sorted({r for per in ratings.values() for r in per})
    items = [i for i, per in ratings.items() if len(per) == len(raters)]
    if len(raters) < 2 or len(items) < 2:
        raise ReviewRejected(f"agreement needs at least 2 raters on 2 common items (got {len(raters)} raters, "
                             f"{len(items)} common items)")
    if len(raters) == 2:
        from sklearn.metrics import cohen_kappa_score

        a = [ratings[i][raters[0]] for i in items]
        b = [ratings[i][raters[1]] for i in items]
        if a == b:
            return "cohen", 1.0
        return "cohen", float(cohen_kappa_score(a, b, labels=list(SCALE), weights="quadratic"))
    from statsmodels.stats.inter_rater import fleiss_kappa

    table = [[sum(ratings[i][r] == s for r in raters) for s in SCALE] for i in items]
    return "fleiss", float(fleiss_kappa(table))


def import_ratings(paths: list[Path], min_kappa: float) -> dict[str, Any]:
    rows = _read_ratings(paths)
    summary: dict[str, Any] = {"raters": sorted({r["rater"] for r in rows}), "items": len({r["item_id"] for r in rows}),
                               "agreement": {}, "mean_by_slice": {}}
    for dim in RUBRIC:
        per_item: dict[str, dict[str, int]] = defaultdict(dict)
        for r in rows:
            per_item[r["item_id"]][r["rater"]] = r[dim]
        kind, k = kappa(per_item)
        summary["agreement"][dim] = {"statistic": kind, "kappa": k}
    low = {d: a["kappa"] for d, a in summary["agreement"].items() if a["kappa"] < min_kappa}
    if low:
        raise ReviewRejected("ratings refused: agreement below the floor " + str(min_kappa) + " on " +
                             ", ".join(f"{d} (kappa {k:.2f})" for d, k in low.items()))
    by_slice: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_slice[r.get("slice") or "all"].append(r)
    summary["mean_by_slice"] = {sl: {d: sum(r[d] for r in rs) / len(rs) for d in RUBRIC}
                                for sl, rs in sorted(by_slice.items())}
    return summary
