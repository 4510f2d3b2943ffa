"""The human audit sample: production requests of a classification slice for raters to label.

Drawn uniformly at random from the champion's answered requests of the slice in the monitor window
- the condition under which prediction-powered inference may combine the ratings with the model's
own probabilities over all the window's traffic (monitor/quality.py). Export it from the same window
the monitor checks; the ratings come back with `tuneloop labels import FILE --source audit`.
Formats: a CSV (one row per request and rater; fill `label`) or Label Studio tasks with the
labeling config next to them (`FILE.xml`), whose JSON export is imported as it is.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

from tuneloop.evaluate.label_studio import choices_config, write_tasks
from tuneloop.monitor.quality import window_requests

COLUMNS = ("request_id", "slice", "rater", "prompt", "answer", "label")


def audit_sample(store: Any, version: str, slice_: str, since: float, now: float, n: int,
                 seed: int) -> list[dict[str, Any]]:
    rows = window_requests(store, since, now, version, [slice_])
    pick = random.Random(seed).sample(rows, min(n, len(rows)))
    return [{"request_id": r["request_id"], "slice": slice_, "prompt": r["prompt"], "answer": r["output"]}
            for r in sorted(pick, key=lambda r: r["created"])]


def write_audit(rows: list[dict[str, Any]], labels: list[str], out: Path, fmt: str, raters: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "label-studio":
        write_tasks(rows, out)
        out.with_suffix(".xml").write_text(choices_config(labels))
        return
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            for rater in raters:
                w.writerow({**r, "rater": rater, "label": ""})
