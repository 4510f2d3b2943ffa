"""Production quality of the champion's classification slices: estimated, realized, audited.

For each classification slice (evaluate.slices with task classification), over the monitor window's
champion requests that were answered:
  estimate   label-free accuracy and macro-F1 with intervals, per window and chunk
             (monitor/estimate.py: NannyML CBPE fitted on the version's calibration reference)
  realized   accuracy, macro-F1, per-label precision and recall from ground truth that arrived
             (monitor/realized.py), per window and chunk, next to the estimate
  audit      live accuracy from the human-rated audit sample combined with the model's own
             probabilities over all traffic by prediction-powered inference (evaluate/ppi.py),
             next to the interval the rated sample gives alone
  slos       monitor.slos checked on the realized figures
Signals: `estimated_quality` when a slice's estimated window accuracy is below its floor
(monitor.min_estimated_accuracy[_per_slice]), `quality_slo` when an SLO is breached.

Label probabilities come from the quality tables (monitor/labels.py): recorded by the gateway, or
computed here with the champion for up to `estimate_max_requests` requests per slice (rated ones
first) from the logged prompt - the last user message, PII-scrubbed, behind the operator's system
prompt, which is how a single-turn classification request was served - and kept for the next run.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.evaluate.calibration import (REFERENCE_TAG, classification_labels, label_of, read_reference,
                                           reference_summary)
from tuneloop.monitor.estimate import estimate, probs_vector
from tuneloop.monitor.labels import QualityStore
from tuneloop.evaluate.intervals import wilson
from tuneloop.monitor.realized import check_slos, realized, truths

log = logging.getLogger("tuneloop.monitor")


def window_requests(store: Any, since: float, now: float | None, version: str, slices: list[str] | None = None,
                    answered_only: bool = True, limit: int | None = None) -> list[dict[str, Any]]:
    """The champion's requests in [since, now] (now None: to the present), oldest first: of these slices (None:
    all), answered ones only unless `answered_only` is false; with `limit`, the newest `limit` of them."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from tuneloop.feedback.store import Request

    store.flush()
    q = select(Request).where(Request.created >= since, Request.variant == "champion", Request.model_version == version)
    if now is not None:
        q = q.where(Request.created <= now)
    if answered_only:
        q = q.where(Request.status == "ok")
    if slices is not None:
        q = q.where(Request.slice.in_(slices))
    q = q.order_by(Request.created.desc()).limit(limit) if limit is not None else q.order_by(Request.created)
    with Session(store.engine) as s:
        rows = [{"request_id": r.request_id, "created": r.created, "slice": r.slice, "prompt": r.prompt,
                 "output": r.output, "model_version": r.model_version, "user_id": r.user_id, "status": r.status,
                 "latency_ms": r.latency_ms} for r in s.scalars(q)]
    return rows[::-1] if limit is not None else rows


def champion_reference(reg: Any, champ: Any, version: str, cache: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The served version's calibration reference (cached in `cache` once fetched), or (None, why)."""
    path = cache / f"reference-{version}.json"
    if not path.exists():
        uri = champ.tags.get(REFERENCE_TAG) if champ is not None else None
        if not uri or not uri.startswith("runs:/"):
            return None, f"version {version} has no calibration reference (version tag {REFERENCE_TAG})"
        run_id, _, artifact = uri.removeprefix("runs:/").partition("/")
        with tempfile.TemporaryDirectory() as tmp:
            got = reg.download_run_artifact(run_id, artifact, Path(tmp))
            cache.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(got, path)
    return read_reference(path), None


def score_requests(cfg: Any, reg: Any, champ: Any, rows: list[dict[str, Any]],
                   labels: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Label probabilities of logged requests computed with the champion (the base model before one)."""
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.evaluate.label_probs import label_probability_batch
    from tuneloop.models import load_causal_lm, materialize_base_model

    base_dir = materialize_base_model(cfg.base_model, cfg.state_path)
    adapter = reg.download_adapter(champ, cfg.state_path / "serving") if champ is not None else None
    model, tok = load_causal_lm(base_dir, adapter)
    fmt = ChatFormatter(tok, cfg.data.system_prompt)
    out = []
    for sl, labs in labels.items():
        part = [r for r in rows if r["slice"] == sl]
        probs = label_probability_batch(model, tok, [fmt.user_prompt(r["prompt"]) for r in part], labs,
                                        cfg.evaluate.batch_size)
        out += [{"request_id": r["request_id"], "model_version": r["model_version"], "slice": sl, "probs": p,
                 "created": r["created"]} for r, p in zip(part, probs, strict=True)]
    return out


def _attach_probs(cfg: Any, reg: Any, champ: Any, rows: list[dict[str, Any]], labels: dict[str, list[str]],
                  qs: QualityStore, rated: set[str], seed: int) -> int:
    """Put `probs` on the rows that have (or now get) label probabilities; returns how many were computed."""
    have = qs.probs([r["request_id"] for r in rows])
    for r in rows:
        h = have.get(r["request_id"])
        if h is not None and h["model_version"] == r["model_version"]:
            r["probs"] = probs_vector(h["probs"], labels[r["slice"]])
    budget = cfg.monitor.estimate_max_requests
    todo: list[dict[str, Any]] = []
    rng = random.Random(seed)
    for sl in labels:
        part = [r for r in rows if r["slice"] == sl]
        missing = [r for r in part if "probs" not in r]
        room = max(0, budget - (len(part) - len(missing)))
        first = [r for r in missing if r["request_id"] in rated]
        rest = [r for r in missing if r["request_id"] not in rated]
        todo += first + rng.sample(rest, min(len(rest), max(0, room - len(first))))
    if not todo or budget == 0:
        return 0
    scored = score_requests(cfg, reg, champ, todo, labels)
    qs.record_probs(scored)
    for r, s in zip(todo, scored, strict=True):
        r["probs"] = probs_vector(s["probs"], labels[r["slice"]])
    return len(scored)


def _audit(rows: list[dict[str, Any]], truth: dict[str, dict[str, Any]], labels: list[str], minimum: int,
           confidence: float) -> dict[str, Any]:
    """PPI on the audit-rated requests against the model's probability of being right on all others."""
    from tuneloop.evaluate.ppi import ppi_mean

    def p_right(r: dict[str, Any]) -> float:
        return r["probs"][labels.index(r["pred"])] if r["pred"] is not None else 0.0

    scored = [r for r in rows if "probs" in r]
    rated = [r for r in scored if truth.get(r["request_id"], {}).get("source") == "audit"]
    unrated = [r for r in scored if truth.get(r["request_id"], {}).get("source") != "audit"]
    if len(rated) < minimum or not unrated:
        return {"n_rated": len(rated), "n_unrated": len(unrated), "value": None,
                "note": f"{len(rated)} audit-rated requests with probabilities in the window; PPI needs "
                        f"{minimum} (monitor.min_quality_requests) and unrated traffic"}
    y = np.array([truth[r["request_id"]]["correct"] for r in rated], dtype=float)
    return ppi_mean(y, np.array([p_right(r) for r in rated]), np.array([p_right(r) for r in unrated]), confidence)


def _realized_chunks(rows: list[dict[str, Any]], truth: dict[str, dict[str, Any]], since: float, now: float,
                     chunk_hours: float, confidence: float) -> list[dict[str, Any]]:
    length = chunk_hours * 3600
    count = max(1, int(np.ceil((now - since) / length - 1e-9)))
    start = now - count * length
    out = []
    for i in range(count):
        lo, hi = start + i * length, start + (i + 1) * length
        last = i == count - 1
        part = [truth[r["request_id"]] for r in rows if r["request_id"] in truth
                and (lo <= r["created"] < hi or (last and r["created"] == hi))]
        if not part:
            continue
        k = sum(t["correct"] for t in part)
        low, up = wilson(k, len(part), confidence)
        out.append({"start": max(lo, since), "end": hi, "labelled": len(part),
                    "accuracy": {"value": k / len(part), "lower": low, "upper": up}})
    return out


def quality_report(cfg: Any, store: Any, reg: Any, champ: Any, version: str, since: float,
                   now: float) -> dict[str, Any]:
    """The report's `quality` section (see the module doc)."""
    m = cfg.monitor
    labels = classification_labels(cfg.evaluate)
    report: dict[str, Any] = {"slices": {}, "slos": [], "below_floor": [], "slo_breaches": [], "reference": None}
    if not labels:
        report["note"] = "no classification slices in evaluate.slices"
        return report
    rows = window_requests(store, since, now, version, list(labels))
    for r in rows:
        r["pred"] = label_of(r["output"], labels[r["slice"]])
    qs = QualityStore(store.engine)
    ids = [r["request_id"] for r in rows]
    stored = qs.labels(ids)
    feedback = [f for f in store.rows(since=since) if f["request_id"] in set(ids)]
    ref, why = champion_reference(reg, champ, version, cfg.state_path / "quality")
    report["reference"] = {"version": version, "note": why} if ref is None else {
        "version": version, "slices": reference_summary(ref)}
    report["probabilities_computed"] = 0 if ref is None else _attach_probs(
        cfg, reg, champ, rows, labels, qs, {s["request_id"] for s in stored}, int(since))
    conf = m.quality_confidence
    for sl, labs in labels.items():
        part = [r for r in rows if r["slice"] == sl]
        truth = truths(part, labs, stored, feedback)
        with_probs = [r for r in part if "probs" in r]
        floor = m.min_estimated_accuracy_per_slice.get(sl, m.min_estimated_accuracy)
        est = None
        if ref is not None and sl in ref["slices"] and with_probs:
            est = estimate(ref["slices"][sl], with_probs, since, now, m.estimate_chunk_hours, conf)
        value = est["window"]["accuracy"]["value"] if est and est["window"] else None
        verdict = ("no_estimate" if value is None else "insufficient" if len(with_probs) < m.min_quality_requests
                   else "no_floor" if floor is None else "below" if value < floor else "ok")
        real = realized(part, labs, truth, conf)
        real["chunks"] = _realized_chunks(part, truth, since, now, m.estimate_chunk_hours, conf)
        report["slices"][sl] = {
            "requests": len(part), "with_probabilities": len(with_probs),
            "off_label_answers": sum(r["pred"] is None for r in part),
            "estimate": est, "floor": floor, "estimate_verdict": verdict, "realized": real,
            "audit": _audit(part, truth, labs, m.min_quality_requests, conf)}
        if verdict == "below":
            report["below_floor"].append(sl)
    report["slos"] = check_slos(m.slos, report["slices"], m.min_quality_requests)
    report["slo_breaches"] = [f"{s['slice']}/{s['label'] or '*'}/{s['metric']}" for s in report["slos"]
                              if s["verdict"] == "breach"]
    return report
