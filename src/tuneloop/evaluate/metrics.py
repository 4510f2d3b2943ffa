"""Per-slice metrics of one model on the held-out eval set.

For every record: the negative log-likelihood of the reference answer (one batched forward
pass, no generation) and a greedy answer (batched generation). Per slice:
  nll, perplexity                 every slice
  exact_match, token_f1, rouge_l  every slice (normalised text)
  accuracy, macro_f1, cost,       classification slices (the answer must be one of the labels;
  confusion                       cost from the slice's cost matrix)
  over_refusal                    generation slices: the share of answers that are refusals
                                  (evaluate/safety.py's detector); these are benign requests
Every metric is computed from per-record arrays, so gates can bootstrap it (paired_bootstrap).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from tuneloop.config import EvaluateConfig, SliceConfig
from tuneloop.evaluate.safety import is_refusal

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower().translate(_PUNCT)).strip()


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def macro_f1(preds: list[str], refs: list[str], labels: list[str]) -> float:
    """Macro-F1 over the given labels (an answer that is no label counts against recall)."""
    from sklearn.metrics import f1_score

    return float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0))


_ROUGE = None


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (Google's rouge-score implementation)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"])
    return float(_ROUGE.score(ref, pred)["rougeL"].fmeasure)


# means of per-record values
MEAN_METRICS = ("exact_match", "token_f1", "rouge_l", "accuracy", "cost", "over_refusal")


def record_values(rows: list[dict[str, Any]], sl: SliceConfig | None) -> dict[str, np.ndarray]:
    """Per-record arrays every slice metric is computed from (and bootstrapped over)."""
    v = {
        "nll_sum": np.array([r["nll_sum"] for r in rows], dtype=float),
        "n_tokens": np.array([r["n_tokens"] for r in rows], dtype=float),
        "exact_match": np.array([normalize_answer(r["prediction"]) == normalize_answer(r["reference"])
                                 for r in rows], dtype=float),
        "token_f1": np.array([token_f1(r["prediction"], r["reference"]) for r in rows], dtype=float),
        "rouge_l": np.array([rouge_l(r["prediction"], r["reference"]) for r in rows], dtype=float),
    }
    if sl is not None and sl.task == "generation":
        v["over_refusal"] = np.array([is_refusal(r["prediction"]) for r in rows], dtype=float)
    if sl is not None and sl.task == "classification":
        labels = [normalize_answer(lab) for lab in sl.labels]
        preds = [normalize_answer(r["prediction"]) for r in rows]
        refs = [normalize_answer(r["reference"]) for r in rows]
        pred_cat = [p if p in labels else "(other)" for p in preds]
        costs = {normalize_answer(t): {("(other)" if q == "(other)" else normalize_answer(q)): c
                                       for q, c in row.items()} for t, row in sl.costs.items()}
        v["accuracy"] = np.array([p == r for p, r in zip(pred_cat, refs, strict=True)], dtype=float)
        v["cost"] = np.array([0.0 if p == r else costs.get(r, {}).get(p, 1.0)
                              for p, r in zip(pred_cat, refs, strict=True)], dtype=float)
        cats = [*labels, "(other)"]
        index = {c: i for i, c in enumerate(cats)}
        v["_pred_idx"] = np.array([index[p] for p in pred_cat])
        v["_ref_idx"] = np.array([index.get(r, len(cats) - 1) for r in refs])
        v["_labels"] = np.array(labels, dtype=object)
    return v


def _macro_f1_idx(pred: np.ndarray, ref: np.ndarray, n_labels: int) -> float:
    f1 = []
    for k in range(n_labels):
        tp = np.sum((pred == k) & (ref == k))
        fp = np.sum((pred == k) & (ref != k))
        fn = np.sum((pred != k) & (ref == k))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def metric_from_values(v: dict[str, np.ndarray], metric: str, idx: np.ndarray | None = None) -> float | None:
    """One metric of one slice from its per-record arrays (optionally a resample `idx`)."""
    def take(k: str) -> np.ndarray:
        return v[k] if idx is None else v[k][idx]

    if metric in ("nll", "perplexity"):
        nll = float(take("nll_sum").sum() / max(take("n_tokens").sum(), 1.0))
        return nll if metric == "nll" else math.exp(min(nll, 50.0))
    if metric == "macro_f1":
        return _macro_f1_idx(take("_pred_idx"), take("_ref_idx"), len(v["_labels"])) if "_labels" in v else None
    if metric in v:
        return float(take(metric).mean())
    return None


def paired_bootstrap(cand: dict[str, np.ndarray], champ: dict[str, np.ndarray], metric: str, samples: int,
                     confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of (candidate - champion) over the same resampled records."""
    n = len(cand["nll_sum"])
    rng = np.random.default_rng(seed)
    deltas = np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, n)
        deltas[b] = metric_from_values(cand, metric, idx) - metric_from_values(champ, metric, idx)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    return float(lo), float(hi)


def group_by_slice(scored: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in sorted(scored, key=lambda r: r["id"]):  # one order for every model: pairs records up
        groups[s["slice"]].append(s)
        groups["all"].append(s)
    return groups


def slice_values(scored: list[dict[str, Any]], cfg: EvaluateConfig) -> dict[str, dict[str, np.ndarray]]:
    return {name: record_values(rows, cfg.slice_config(name)) for name, rows in group_by_slice(scored).items()}


def slice_metrics(scored: list[dict[str, Any]], cfg: EvaluateConfig) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for name, v in slice_values(scored, cfg).items():
        m: dict[str, Any] = {"n": len(v["nll_sum"])}
        for metric in ("nll", "perplexity", *MEAN_METRICS, "macro_f1"):
            val = metric_from_values(v, metric)
            if val is not None:
                m[metric] = val
        if "_labels" in v:
            cats = [*v["_labels"].tolist(), "(other)"]
            k = len(cats)
            mat = np.zeros((k, k), dtype=int)
            np.add.at(mat, (v["_ref_idx"], v["_pred_idx"]), 1)
            m["confusion"] = {"labels": cats, "matrix": mat.tolist()}  # rows: reference, cols: prediction
        result[name] = m
    return result
