"""Label-free estimate of a classification slice's accuracy and macro-F1 on production traffic.

NannyML's CBPE (confidence-based performance estimation), multiclass: fitted on the version's
calibration reference (evaluate/calibration.py: the evaluation records' label probabilities with
their true labels), it calibrates the probabilities per label (isotonic, where cross-validation
shows it helps) and estimates each metric from the calibrated probabilities of production
requests - the expected accuracy is the mean calibrated probability of the answered label. Its
sampling error (the metric's spread on the reference, shrunk by sqrt(n)) gives the interval:
value +/- z * sampling_error at `confidence` (NannyML's own band is 3 sampling errors). Rows are
chunked by time: equal chunks of `chunk_hours` ending at `now`, plus the whole window.

What CBPE cannot do here, done around it (small, tested):
  - two labels: its multiclass mode fails on them, so binary CBPE runs per label (see `estimates`);
  - a time chunker aligned to the monitor's window (its PeriodBasedChunker aligns to the calendar);
  - answers that are no label: CBPE needs a predicted class. Such an answer is wrong whatever the
    truth, so the estimate runs on the labelled answers and the window's accuracy is scaled by their
    share (exact: off-label answers contribute 0 correct); macro-F1 is over the labelled answers.
CBPE assumes covariate shift only: P(truth | probabilities) stays as on the reference. Under label
shift or a change of concept it is biased; realized quality (delayed labels) and the human audit
(PPI) are the checks on it.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np

METRICS = {"accuracy": "accuracy", "f1": "macro_f1"}  # NannyML's name -> ours


def _nannyml() -> Any:
    # NannyML sends usage events to a third party unless this is set (before it logs anything)
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    os.environ.setdefault("NML_DISABLE_USER_ANALYTICS", "1")
    import nannyml

    return nannyml


def _window_chunker(start: float, length_s: float, count: int) -> Any:
    from nannyml.chunk import Chunk, Chunker

    class WindowChunker(Chunker):
        """`count` chunks of `length_s` seconds from `start` (timestamps in epoch seconds); empty ones left out."""

        def _split(self, data: Any) -> list[Any]:
            t = data["timestamp"].to_numpy(dtype=float)
            k = np.clip(((t - start) // length_s).astype(int), 0, count - 1)
            out = []
            for i in range(count):
                part = data[k == i]
                if len(part):
                    out.append(Chunk(key=str(i), data=part, start_datetime=None, end_datetime=None))
            return out

    return WindowChunker(timestamp_column_name="timestamp")


def _frame(rows: list[dict[str, Any]], labels: list[str], with_truth: bool, positive: int | None = None) -> Any:
    """CBPE's input: multiclass, a probability column per label and labels as classes; binary (`positive`
    is the index of the positive label), that label's probability and 0/1 classes."""
    import pandas as pd

    if positive is None:
        df = pd.DataFrame({f"p{i}": [r["probs"][i] for r in rows] for i in range(len(labels))})
        df["y_pred"] = [r["pred"] for r in rows]
        if with_truth:
            df["y_true"] = [r["true"] for r in rows]
    else:
        df = pd.DataFrame({"p": [r["probs"][positive] for r in rows]})
        df["y_pred"] = [int(r["pred"] == labels[positive]) for r in rows]
        if with_truth:
            df["y_true"] = [int(r["true"] == labels[positive]) for r in rows]
    df["timestamp"] = [float(r.get("created", 0.0)) for r in rows]
    return df


def probs_vector(probs: dict[str, float], labels: list[str]) -> list[float]:
    """{label: p} as a list in the slice's label order, renormalised (a missing label counts 0)."""
    v = np.array([float(probs.get(lab, 0.0)) for lab in labels])
    s = v.sum()
    return (v / s).tolist() if s > 0 else [1 / len(labels)] * len(labels)


def _fit(ref_rows: list[dict[str, Any]], labels: list[str], metrics: list[str], chunker: Any,
         positive: int | None) -> Any:
    nml = _nannyml()
    if positive is None:
        est = nml.CBPE(metrics=metrics, y_pred_proba={lab: f"p{i}" for i, lab in enumerate(labels)}, y_pred="y_pred",
                       y_true="y_true", problem_type="classification_multiclass", chunker=chunker)
    else:
        est = nml.CBPE(metrics=metrics, y_pred_proba="p", y_pred="y_pred", y_true="y_true",
                       problem_type="classification_binary", chunker=chunker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(_frame(ref_rows, labels, True, positive))


def _run(est: Any, rows: list[dict[str, Any]], labels: list[str], positive: int | None) -> dict[str, Any]:
    """{chunk key: {metric: (value, sampling error)}} of a fitted estimator on production rows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = est.estimate(_frame(rows, labels, False, positive)).filter(period="analysis").to_df()
    out: dict[str, Any] = {}
    for _, row in df.iterrows():
        out[str(row[("chunk", "key")])] = {m.name: (float(row[(m.name, "value")]),
                                                    float(row[(m.name, "sampling_error")])) for m in est.metrics}
    return out


def estimates(reference: dict[str, Any], rows: list[dict[str, Any]], start: float, length_s: float,
              count: int) -> dict[str, dict[str, tuple[float, float]]]:
    """{chunk key: {accuracy | macro_f1: (value, sampling error)}} of rows whose answer is a label.

    Multiclass: one CBPE (its f1 is macro-averaged). Two labels: NannyML's multiclass CBPE cannot take
    them (it one-hot encodes the truth with sklearn's label_binarize, which gives one column for two
    classes), so binary CBPE runs once per label as the positive class: accuracy and that label's F1;
    macro-F1 is the mean of the two, its sampling error the mean of theirs (as if fully correlated:
    the wider bound)."""
    labels = reference["labels"]
    ref_rows = [{**r, "created": start} for r in reference["rows"] if r["pred"] is not None]
    if len({r["true"] for r in ref_rows}) < 2:
        raise ValueError("the reference needs at least two distinct true labels among its labelled answers")
    chunker = _window_chunker(start, length_s, count)
    if len(labels) > 2:
        got = _run(_fit(ref_rows, labels, list(METRICS), chunker, None), rows, labels, None)
        return {k: {METRICS[m]: v for m, v in per.items()} for k, per in got.items()}
    one = _run(_fit(ref_rows, labels, ["accuracy", "f1"], chunker, 1), rows, labels, 1)
    zero = _run(_fit(ref_rows, labels, ["f1"], chunker, 0), rows, labels, 0)
    out = {}
    for k, per in one.items():
        (f1a, sea), (f1b, seb) = per["f1"], zero[k]["f1"]
        out[k] = {"accuracy": per["accuracy"], "macro_f1": ((f1a + f1b) / 2, (sea + seb) / 2)}
    return out


def _interval(value: float, se: float, z: float, scale: float = 1.0) -> dict[str, Any]:
    if value is None or math.isnan(value):
        return {"value": None, "sampling_error": None, "lower": None, "upper": None}
    v, s = value * scale, se * scale
    return {"value": v, "sampling_error": s, "lower": max(0.0, v - z * s), "upper": min(1.0, v + z * s)}


def estimate(reference: dict[str, Any], rows: list[dict[str, Any]], since: float, now: float, chunk_hours: float,
             confidence: float) -> dict[str, Any]:
    """Estimated accuracy and macro-F1 of one slice over the window and per chunk.

    `rows`: production requests with `probs` (list in the reference's label order), `pred` (the
    label answered, or None) and `created`. Returns {n, labelled_answers, window: {accuracy,
    macro_f1}, chunks: [{start, end, n, accuracy, macro_f1}]}; each metric {value, sampling_error,
    lower, upper}.
    """
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    length = chunk_hours * 3600
    count = max(1, math.ceil((now - since) / length - 1e-9))
    start = now - count * length  # chunks end at `now`; the first may begin before the window
    out: dict[str, Any] = {"n": len(rows), "labelled_answers": sum(r["pred"] is not None for r in rows),
                           "window": None, "chunks": []}
    if not rows:
        return out
    on = [r for r in rows if r["pred"] is not None]
    results = {"window": {}, "chunks": {}}
    if on:
        results = {"window": estimates(reference, on, since, now - since + 1e-6, 1),
                   "chunks": estimates(reference, on, start, length, count)}
    times = np.array([float(r.get("created", 0.0)) for r in rows])
    on_mask = np.array([r["pred"] is not None for r in rows])

    def chunk_record(got: dict[str, tuple[float, float]], lo: float, hi: float,
                     in_chunk: np.ndarray) -> dict[str, Any]:
        n, n_on = int(in_chunk.sum()), int((in_chunk & on_mask).sum())
        share = n_on / n if n else 0.0
        rec: dict[str, Any] = {"start": lo, "end": hi, "n": n, "labelled_answers": n_on}
        for metric in METRICS.values():
            v, se = got.get(metric, (float("nan"), float("nan")))
            rec[metric] = _interval(v, se, z, share if metric == "accuracy" else 1.0)
        return rec

    out["window"] = chunk_record(results["window"].get("0", {}), since, now, np.ones(len(rows), bool))
    k = np.clip(((times - start) // length).astype(int), 0, count - 1)
    for i in range(count):
        in_chunk = k == i
        if in_chunk.any():
            out["chunks"].append(chunk_record(results["chunks"].get(str(i), {}), max(since, start + i * length),
                                              start + (i + 1) * length, in_chunk))
    return out
