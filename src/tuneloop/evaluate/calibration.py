"""The calibration reference stored with a registered version: what label-free estimation needs.

Per classification slice, the evaluation records of the candidate: the probability the model gave
each label (`label_probs`, evaluate/label_probs.py), its answer and the true label. It is
written as `quality_reference.json` next to the evaluation's predictions when the version is
registered, and the monitor estimates production accuracy and F1 from it (monitor/estimate.py).

Why the reference itself and not a fitted calibrator: confidence-based performance estimation
(NannyML's CBPE) calibrates the label probabilities on a reference set with ground truth - per
label, isotonic, only where cross-validation shows it helps - and takes from the same set the
spread of each metric that its sampling error (the interval) is built on. The evaluation set *is*
that reference: held out, labelled, scored by exactly the version that is served. A stored
isotonic map or temperature would give CBPE the calibration but not the sampling error, and tie
the estimate to one calibration method; the rows (a few floats per record) keep both and let the
method change without registering again. The summary (accuracy, macro-F1, expected calibration
error of the raw probabilities) is what the model card shows.

A row's prediction is the label the model answered; an answer that is no label (`pred` null) is
wrong whatever the truth, so the estimate handles those rows apart (see monitor/estimate.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.config import EvaluateConfig
from tuneloop.evaluate.metrics import normalize_answer
from tuneloop.jsonl import read_jsonl

REFERENCE_FILE = "quality_reference.json"
REFERENCE_TAG = "tuneloop.quality_reference"  # version tag: runs:/<run id>/<artifact path> of the reference
FORMAT = 1
MIN_REFERENCE_ROWS = 50  # below this the reference note says the calibration is rough


def classification_labels(cfg: EvaluateConfig) -> dict[str, list[str]]:
    """{slice: labels} of the classification slices (what score_records' `labels` takes)."""
    return {name: list(s.labels) for name, s in cfg.slices.items() if s.task == "classification"}


def label_of(answer: str | None, labels: list[str]) -> str | None:
    """The label an answer names (compared as metrics.py compares: normalised text), or None."""
    if answer is None:
        return None
    norm = normalize_answer(answer)
    return next((lab for lab in labels if normalize_answer(lab) == norm), None)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float | None:
    """ECE of a confidence (the probability of the predicted label) against correctness: the mean
    |accuracy - confidence| over equal-width bins, weighted by the bin's share."""
    if len(confidence) == 0:
        return None
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(err)


def build_reference(scored: list[dict[str, Any]], cfg: EvaluateConfig, version: str | None = None) -> dict[str, Any]:
    """The reference from scored evaluation rows (one model's), for every classification slice whose
    rows carry `label_probs`; slices without are left out."""
    from sklearn.metrics import f1_score

    slices: dict[str, Any] = {}
    for name, labels in classification_labels(cfg).items():
        rows = []
        for r in scored:
            if r.get("slice") != name or not r.get("label_probs"):
                continue
            true = label_of(r["reference"], labels)
            if true is None:  # a reference that is no label: not a classification record
                continue
            rows.append({"id": r["id"], "probs": [float(r["label_probs"].get(lab, 0.0)) for lab in labels],
                         "pred": label_of(r["prediction"], labels), "true": true})
        if not rows:
            continue
        on = [x for x in rows if x["pred"] is not None]
        conf = np.array([x["probs"][labels.index(x["pred"])] for x in on])
        correct = np.array([x["pred"] == x["true"] for x in on], dtype=float)
        preds = [x["pred"] or "(other)" for x in rows]
        slices[name] = {
            "labels": labels, "n": len(rows),
            "accuracy": float(np.mean([x["pred"] == x["true"] for x in rows])),
            "macro_f1": float(f1_score([x["true"] for x in rows], preds, labels=labels, average="macro",
                                       zero_division=0)),
            "off_label_share": 1 - len(on) / len(rows),
            "ece_raw": expected_calibration_error(conf, correct),
            "note": None if len(rows) >= MIN_REFERENCE_ROWS else
            f"{len(rows)} reference records: calibration and intervals are rough below {MIN_REFERENCE_ROWS}",
            "rows": rows}
    return {"format": FORMAT, "version": version, "slices": slices}


def write_reference(predictions: Path, cfg: EvaluateConfig, out: Path, model: str = "candidate",
                    version: str | None = None) -> dict[str, Any] | None:
    """predictions.jsonl (evaluate's) -> `out` (quality_reference.json); None (nothing written) when no
    classification row carries label probabilities."""
    scored = [r for r in read_jsonl(predictions) if r.get("model", model) == model] if predictions.exists() else []
    ref = build_reference(scored, cfg, version)
    if not ref["slices"]:
        return None
    out.write_text(json.dumps(ref))
    return ref


def read_reference(path: Path) -> dict[str, Any]:
    ref = json.loads(path.read_text())
    if ref.get("format") != FORMAT:
        raise ValueError(f"{path}: quality reference format {ref.get('format')!r}, expected {FORMAT}")
    return ref


def reference_summary(ref: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per slice: n, accuracy, macro-F1, off-label share, ECE (no rows) - for the model card."""
    return {sl: {k: v for k, v in s.items() if k != "rows"} for sl, s in ref["slices"].items()}
