"""Realized quality from ground truth that arrived late, and the precision/recall SLOs checked on it.

The truth about a request, strongest source first:
  audit     a human rater's label from the audit sample (`tuneloop review audit-export`, then
            `tuneloop labels import --source audit`); several raters: the majority, a tie is unknown
  import    a label from a file keyed by request id (`tuneloop labels import`)
  feedback  a trusted correction that names one of the slice's labels; else a feedback score:
            >= 0.5 says the answer was right (truth = the answer), < 0.5 that it was wrong (truth
            unknown, except in a two-label slice: the other label)
So a request may have a known correctness without a known true label (a thumbs-down in a
four-label slice): it counts for accuracy and for the precision of the answered label, not for
recall. Feedback is not a random sample (people rate what surprised them), so realized figures are
reported with their source counts; the audit sample is the unbiased one (monitor/audit.py).

Per slice over the window (the requests the window served, whenever their label came): accuracy,
macro-F1 over requests with a known true label, and per label precision and recall, each with a
Wilson interval at `confidence`. An SLO (monitor.slos) is breached when the whole interval lies
below its floor, at risk when only the value does, insufficient with fewer than `min_labeled`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tuneloop.evaluate.calibration import label_of
from tuneloop.evaluate.intervals import wilson

SOURCE_RANK = {"audit": 0, "import": 1, "feedback": 2}


def _proportion(k: int, n: int, confidence: float) -> dict[str, Any]:
    lo, hi = wilson(k, n, confidence)
    return {"value": k / n if n else None, "n": n, "lower": lo, "upper": hi}


def truths(requests: list[dict[str, Any]], labels: list[str], stored: list[dict[str, Any]],
           feedback: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """request id -> {label (or None), correct (or None), source} for the slice's requests that have any
    ground truth. `requests` carry request_id and pred (the label answered, None for no label);
    `stored`: QualityStore.labels(); `feedback`: FeedbackStore.rows() items."""
    by_id = {r["request_id"]: r for r in requests}
    votes: dict[str, dict[str, Counter]] = {}
    for s in stored:
        if s["request_id"] in by_id and s["label"] in labels:
            votes.setdefault(s["request_id"], {}).setdefault(s["source"], Counter())[s["label"]] += 1
    out: dict[str, dict[str, Any]] = {}
    for rid, per_source in votes.items():
        for source in sorted(per_source, key=SOURCE_RANK.__getitem__):
            top = per_source[source].most_common(2)
            if len(top) == 1 or top[0][1] > top[1][1]:
                label = top[0][0]
                out[rid] = {"label": label, "correct": by_id[rid]["pred"] == label, "source": source}
                break
    for f in feedback:
        rid = f["request_id"]
        if rid not in by_id or rid in out:
            continue
        pred = by_id[rid]["pred"]
        corrected = label_of(f.get("correction"), labels) if f.get("trusted") else None
        if corrected is not None:
            out[rid] = {"label": corrected, "correct": pred == corrected, "source": "feedback"}
        elif f.get("score") is not None:
            right = f["score"] >= 0.5
            label = pred if right else None
            if not right and pred is not None and len(labels) == 2:
                label = next(lab for lab in labels if lab != pred)
            out[rid] = {"label": label, "correct": right and pred is not None, "source": "feedback"}
    return out


def realized(requests: list[dict[str, Any]], labels: list[str], truth: dict[str, dict[str, Any]],
             confidence: float) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-label precision/recall of the slice's requests that have ground truth."""
    known = [(r["pred"], truth[r["request_id"]]) for r in requests if r["request_id"] in truth]
    with_label = [(p, t["label"]) for p, t in known if t["label"] is not None]
    out: dict[str, Any] = {
        "requests": len(requests), "labelled": len(known),
        "sources": dict(Counter(t["source"] for _, t in known)),
        "accuracy": _proportion(sum(t["correct"] for _, t in known), len(known), confidence),
        "macro_f1": None, "per_label": {}}
    f1s = []
    for lab in labels:
        predicted = [t for p, t in known if p == lab]
        tp = sum(t["correct"] for t in predicted)
        actual = [p for p, t in with_label if t == lab]
        found = sum(p == lab for p in actual)
        prec = _proportion(tp, len(predicted), confidence)
        rec = _proportion(found, len(actual), confidence)
        out["per_label"][lab] = {"precision": prec, "recall": rec}
        tp_l = sum(p == lab and t == lab for p, t in with_label)
        fp_l = sum(p == lab and t != lab for p, t in with_label)
        fn_l = sum(p != lab and t == lab for p, t in with_label)
        f1s.append(0.0 if tp_l == 0 else 2 * tp_l / (2 * tp_l + fp_l + fn_l))
    if with_label:
        out["macro_f1"] = sum(f1s) / len(f1s)
    return out


def check_slos(slos: list[Any], by_slice: dict[str, dict[str, Any]], min_labeled: int) -> list[dict[str, Any]]:
    """Each configured SLO against the slice's realized figures: verdict ok | at_risk | breach | insufficient."""
    out = []
    for slo in slos:
        r = by_slice.get(slo.slice, {}).get("realized")
        fig = None
        if r is not None:
            fig = r["accuracy"] if slo.metric == "accuracy" else r["per_label"].get(slo.label, {}).get(slo.metric)
        row = {"slice": slo.slice, "label": slo.label, "metric": slo.metric, "min": slo.min,
               "value": None, "lower": None, "upper": None, "n": 0}
        if fig is not None:
            row.update({k: fig[k] for k in ("value", "lower", "upper", "n")})
        if row["n"] < min_labeled:
            row["verdict"] = "insufficient"
        elif row["upper"] < slo.min:
            row["verdict"] = "breach"
        elif row["value"] < slo.min:
            row["verdict"] = "at_risk"
        else:
            row["verdict"] = "ok"
        out.append(row)
    return out
