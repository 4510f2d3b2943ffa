"""Why production decayed: a diagnosis of a monitor check that flagged something (`tuneloop monitor`).

The production counterpart of evaluate/diagnosis.py (a blocked candidate). diagnose_decay() reads the
check's report (monitor/check.py), the champion's requests of the window and the champion's training
data, and returns a JSON-able dict (decay_markdown() renders it):
    signals       every signal of the check, whether it fired, in numbers; and the serving SLOs
    decayed       per classification slice, each figure that fell: the estimated accuracy below its floor
                  or with its whole interval below the figure at registration, the realized (delayed
                  labels) and audited accuracy with the whole interval below the figure at registration,
                  and the quality SLOs breached or at risk; with the figure at registration (the calibration
                  reference: the version's evaluation records), now, the interval and the change
    wrong         requests answered wrong according to the ground truth that came back (delayed labels,
                  audit, feedback: monitor/realized.py's truths), per slice the counts and the most common
                  mistakes (answer -> true label), and examples with prompt, answer and true label
    composition   the window's answered requests against the champion's training data
                  (evaluate/diagnosis.composition on both): slices, prompt lengths, the label mix the model
                  answers on each classification slice; and of the traffic: users (the HMAC'd user ids)
                  and the top-3 users' share, errors, requests with feedback
    drift         the drift summary the check computed (production prompts vs the training data)
    causes        likely causes in plain words, ranked by a score (higher first), with their evidence

The causes and their rules (relative, no figure tuned to a data set; "decayed" = a slice in `decayed`,
whose causes get 20 more so they rank above those of healthy slices):
    slice share   a slice is >= 2x its share of the champion's training data and the shift is at least a
                  tenth of the traffic (share difference >= 0.1; slices compared among tagged requests and
                  records): 50 + 40 x the difference; a slice the training data did not have at all,
                  with >= 5 requests: 70 + 30 x its share
    label mix     the labels the model answers on a classification slice (or the true labels that came
                  back) against the slice's labels in the training data: total variation >= 0.25, >= 5 on
                  each side (as likely_causes): 40 + 40 x the total variation
    off-label     answers that name no label, >= 5 and >= 2x the share at registration: 40 + 40 x the share
    mistakes      on a decayed slice with >= 5 wrong answers, one confusion (answer -> known true label)
                  is at least half of them: 35 + 20 x its share
    users         >= 5 requests with a user id, the top 3 users sent >= 50% (as likely_causes for
                  feedback): 45 + 20 x the share
    prompt length mean prompt words >= 1.5x or <= 1/1.5x the training data's (as likely_causes for answers),
                  >= 5 on each side, overall and per decayed slice: 25 + 10 x |log2 ratio| (capped at 3)
    errors        the error-rate SLO is breached: 35; the p95 latency SLO: 15
    feedback      the feedback score fell below its SPC lower control limit: 30
    drift         a text descriptor drifted or the embedding drift score >= 0.7 (diagnosis.drift_cause):
                  20 + 5 per drifted descriptor

write_decay_diagnosis() does the reading for monitor.check: the champion's requests of the window (at most
MAX_WINDOW_ROWS, the newest), their ground truth, the training data and the cached calibration reference;
it writes diagnosis.json and diagnosis.md next to monitor.json.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tuneloop.evaluate.diagnosis import composition, cut, drift_cause, drift_line, num, pct, tvd
from tuneloop.evaluate.metrics import normalize_answer

MAX_WINDOW_ROWS = 50_000  # the newest champion requests of the window the diagnosis reads
MAX_WRONG = 10  # wrong answers shown
TOP_CAUSES = 5  # in the report and on the command line
UNTAGGED = "(untagged)"  # requests logged without a slice
NO_LABEL = "(no label)"  # an answer that names none of the slice's labels
MIN_COUNT = 5
DECAYED_BONUS = 20


# -- what decayed ------------------------------------------------------------------------------------------------
def _registration(reference: dict[str, Any] | None, summary: dict[str, Any], sl: str, label: str | None,
                  metric: str) -> dict[str, Any] | None:
    """The figure at registration: from the calibration reference's records (the version's evaluation) when
    given, else the reference summary in the report (accuracy only)."""
    rows = ((reference or {}).get("slices") or {}).get(sl, {}).get("rows")
    if rows:
        if metric == "accuracy":
            part = rows
            k = sum(r["pred"] == r["true"] for r in part)
        elif metric == "precision":
            part = [r for r in rows if r["pred"] == label]
            k = sum(r["true"] == label for r in part)
        elif metric == "recall":
            part = [r for r in rows if r["true"] == label]
            k = sum(r["pred"] == label for r in part)
        else:
            return None
        return {"value": k / len(part), "n": len(part)} if part else None
    s = summary.get(sl) or {}
    if metric == "accuracy" and s.get("accuracy") is not None:
        return {"value": s["accuracy"], "n": s.get("n")}
    return None


def decayed(report: dict[str, Any], reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each quality figure of a classification slice that fell (see the module doc)."""
    q = report.get("quality") or {}
    summary = (q.get("reference") or {}).get("slices") or {}
    out: list[dict[str, Any]] = []

    def add(sl: str, figure: str, now: dict[str, Any], reg: dict[str, Any] | None, verdict: str,
            bound: tuple[str, float] | None = None, label: str | None = None, metric: str = "accuracy") -> None:
        change = now["value"] - reg["value"] if reg and now.get("value") is not None else None
        out.append({"slice": sl, "label": label, "metric": metric, "figure": figure,
                    "now": {k: now.get(k) for k in ("value", "lower", "upper", "n")}, "registration": reg,
                    "change": change, "bound": {"kind": bound[0], "value": bound[1]} if bound else None,
                    "verdict": verdict})

    slo_acc = {s["slice"] for s in q.get("slos") or [] if s["metric"] == "accuracy"
               and s["verdict"] in ("breach", "at_risk")}
    for sl, s in sorted((q.get("slices") or {}).items()):
        reg = _registration(reference, summary, sl, None, "accuracy")
        est = ((s.get("estimate") or {}).get("window") or {}).get("accuracy") or {}
        est = {**est, "n": s.get("with_probabilities")}
        if s.get("estimate_verdict") == "below":
            add(sl, "estimated accuracy (label-free)", est, reg, "below its floor", ("floor", s.get("floor")))
        elif reg and est.get("upper") is not None and est["upper"] < reg["value"]:
            add(sl, "estimated accuracy (label-free)", est, reg, "below the figure at registration")
        real = (s.get("realized") or {}).get("accuracy") or {}
        if reg and sl not in slo_acc and real.get("upper") is not None and real["upper"] < reg["value"]:
            add(sl, "realized accuracy (delayed labels)", real, reg, "below the figure at registration")
        audit = s.get("audit") or {}
        if reg and audit.get("value") is not None and audit.get("upper") is not None and audit["upper"] < reg["value"]:
            add(sl, "audited accuracy (PPI)", {**audit, "n": audit.get("n_rated")}, reg,
                "below the figure at registration")
    for slo in q.get("slos") or []:
        if slo["verdict"] not in ("breach", "at_risk"):
            continue
        what = f"realized {slo['metric']}" + (f" of label {slo['label']}" if slo.get("label") else "")
        add(slo["slice"], what + " (delayed labels)", slo,
            _registration(reference, summary, slo["slice"], slo.get("label"), slo["metric"]),
            "SLO breached" if slo["verdict"] == "breach" else "SLO at risk", ("SLO", slo["min"]),
            slo.get("label"), slo["metric"])
    return out


# -- wrong answers -----------------------------------------------------------------------------------------------
def wrong_answers(rows: list[dict[str, Any]], decayed_slices: set[str], labels_at_stake: set[tuple[str, str]],
                  limit: int = MAX_WRONG) -> dict[str, Any]:
    """Requests answered wrong by the ground truth that came back (rows carry `correct`, `truth`, `pred`)."""
    known = [r for r in rows if r.get("correct") is not None]
    wrong = [r for r in known if not r["correct"]]
    per_slice: dict[str, dict[str, Any]] = {}
    for sl in sorted({r["slice"] for r in known}):
        mine = [r for r in wrong if r["slice"] == sl]
        confusions = Counter((r.get("pred") or NO_LABEL, r.get("truth") or "?") for r in mine)
        per_slice[sl] = {"labelled": sum(r["slice"] == sl for r in known), "wrong": len(mine),
                         "mistakes": [{"answer": a, "truth": t, "count": c} for (a, t), c in confusions.most_common(5)]}

    def priority(r: dict[str, Any]) -> tuple[Any, ...]:
        at_stake = (r["slice"], r.get("pred")) in labels_at_stake or (r["slice"], r.get("truth")) in labels_at_stake
        return (r["slice"] not in decayed_slices, not at_stake, r.get("truth") is None, -r.get("created", 0.0))

    examples = [{"request_id": r["request_id"], "slice": r["slice"], "prompt": r.get("prompt"),
                 "answer": r.get("output"), "answered_label": r.get("pred"), "true_label": r.get("truth"),
                 "source": r.get("truth_source")} for r in sorted(wrong, key=priority)[:limit]]
    return {"labelled": len(known), "wrong": len(wrong), "per_slice": per_slice, "examples": examples}


# -- composition of the window ------------------------------------------------------------------------------------
def _answer_mix(rows: list[dict[str, Any]], sl: str) -> dict[str, int]:
    c = Counter(normalize_answer(r["pred"]) if r.get("pred") else NO_LABEL
                for r in rows if r["slice"] == sl and r.get("status", "ok") == "ok")
    return dict(c.most_common())


def traffic(rows: list[dict[str, Any]], total: int | None = None) -> dict[str, Any]:
    """Users, errors and feedback of the window's requests (rows: the champion's, any status)."""
    n = len(rows)
    users = Counter(r["user_id"] for r in rows if r.get("user_id"))
    known = sum(users.values())
    top3 = sum(c for _, c in users.most_common(3))
    errors = sum(r.get("status", "ok") != "ok" for r in rows)
    scores = [r["score"] for r in rows if r.get("score") is not None]
    return {"requests": total if total is not None else n, "read": n,
            "untagged_share": sum(r["slice"] == UNTAGGED for r in rows) / n if n else 0.0,
            "users": len(users), "requests_with_user": known, "top3_users_share": top3 / known if known else None,
            "top_users": [{"user": u[:12], "requests": c} for u, c in users.most_common(3)],
            "errors": errors, "error_share": errors / n if n else 0.0,
            "with_feedback": len(scores), "feedback_share": len(scores) / n if n else 0.0,
            "mean_score": sum(scores) / len(scores) if scores else None}


def _tagged_shares(per_slice: dict[str, Any], drop: tuple[str, ...]) -> dict[str, tuple[int, float]]:
    kept = {sl: v["records"] for sl, v in per_slice.items() if sl not in drop}
    n = sum(kept.values())
    return {sl: (c, c / n) for sl, c in kept.items()} if n else {}


# -- causes --------------------------------------------------------------------------------------------------------
def decay_causes(d: dict[str, Any], report: dict[str, Any], rows: list[dict[str, Any]],
                 champion_records: list[dict[str, Any]], reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Likely causes with a score (higher first) and their evidence, by the rules of the module doc."""
    causes: list[dict[str, Any]] = []
    bad = {e["slice"] for e in d["decayed"]}

    def add(score: float, text: str, sl: str | None = None, **evidence: Any) -> None:
        bonus = DECAYED_BONUS if sl is not None and sl in bad else 0
        causes.append({"score": round(score + bonus, 3), "cause": text, "slice": sl, "evidence": evidence})

    win, champ = d["composition"]["window"], d["composition"]["champion"]
    if champ is not None:
        mine = _tagged_shares(win["per_slice"], (UNTAGGED,))
        theirs = _tagged_shares(champ["per_slice"], ("default",))  # composition's name for records without one
        for sl, (k, s) in mine.items():
            before = theirs.get(sl)
            if before is None:
                if k >= MIN_COUNT:
                    add(70 + 30 * s, f"slice {sl} is {pct(s)} of production traffic ({k} requests) but has no records "
                        "in the champion's training data", sl, window_share=s, champion_share=0.0)
            elif s >= 2 * before[1] and s - before[1] >= 0.1:
                add(50 + 40 * (s - before[1]), f"slice {sl} is {pct(s)} of production traffic but {pct(before[1])} of "
                    f"the champion's training data ({before[0]} records)", sl, window_share=s,
                    champion_share=before[1])
        for sl, mix in win["labels"].items():
            old = champ["labels"].get(sl)
            if not old or sum(mix.values()) < MIN_COUNT or sum(old.values()) < MIN_COUNT:
                continue
            t = tvd(mix, old)
            if t >= 0.25:
                a, b = max(old, key=old.get), max(mix, key=mix.get)
                sa, sb = old[a] / sum(old.values()), mix[b] / sum(mix.values())
                text = (f"the label mix the model answers on slice {sl} shifted from {a} ({pct(sa)} of the "
                        f"champion's training labels) to {b} ({pct(sb)} of its answers in the window)" if a != b else
                        f"the model answers {a} on {pct(sb)} of slice {sl}'s requests; {a} was {pct(sa)} of the "
                        "champion's training labels")
                add(40 + 40 * t, text, sl, total_variation=t, champion=old, window=mix)
        truth_mix: dict[str, Counter[str]] = defaultdict(Counter)
        for r in rows:
            if r.get("truth"):
                truth_mix[r["slice"]][normalize_answer(r["truth"])] += 1
        for sl, mix in truth_mix.items():
            old = champ["labels"].get(sl)
            if not old or sum(mix.values()) < MIN_COUNT or sum(old.values()) < MIN_COUNT:
                continue
            t = tvd(dict(mix), old)
            if t >= 0.25:
                a, b = max(old, key=old.get), max(mix, key=mix.get)
                sa, sb = old[a] / sum(old.values()), mix[b] / sum(mix.values())
                n = sum(mix.values())
                text = (f"the true labels of slice {sl} in production are mostly {b} ({pct(sb)} of {n} that came "
                        f"back); the champion's training data was mostly {a} ({pct(sa)})" if a != b else
                        f"{a} is {pct(sb)} of slice {sl}'s true labels in production ({n} came back) but "
                        f"{pct(sa)} of the champion's training labels")
                add(40 + 40 * t, text, sl, total_variation=t, champion=old, window=dict(mix))
        pairs = [("", win["lengths"], champ["lengths"], win["records"], champ["records"])]
        for sl in sorted(bad):
            a = [r for r in rows if r["slice"] == sl and r.get("status", "ok") == "ok"]
            b = [r for r in champion_records if str(r.get("slice") or "default") == sl]
            if a and b:
                pairs.append((sl, composition(_as_records(a))["lengths"], composition(b)["lengths"], len(a), len(b)))
        for sl, la, lb, na, nb in pairs:
            if na < MIN_COUNT or nb < MIN_COUNT or not lb["prompt_words_mean"] or not la["prompt_words_mean"]:
                continue
            ratio = la["prompt_words_mean"] / lb["prompt_words_mean"]
            if ratio >= 1.5 or ratio <= 1 / 1.5:
                add(25 + 10 * min(abs(math.log2(ratio)), 3),
                    f"prompts{' of slice ' + sl if sl else ''} are {ratio:.1f}x as long as in the champion's training "
                    f"data ({la['prompt_words_mean']:.1f} vs {lb['prompt_words_mean']:.1f} words on average)",
                    sl or None, ratio=ratio)
    summary = ((report.get("quality") or {}).get("reference") or {}).get("slices") or {}
    ref_slices = (reference or {}).get("slices") or {}
    for sl, s in sorted(((report.get("quality") or {}).get("slices") or {}).items()):
        off, n = s.get("off_label_answers") or 0, s.get("requests") or 0
        before = (ref_slices.get(sl) or summary.get(sl) or {}).get("off_label_share")
        if off >= MIN_COUNT and n and before is not None and off / n >= 2 * before:
            add(40 + 40 * off / n, f"the model answered with no label on {pct(off / n)} of slice {sl}'s requests "
                f"({off} of {n}; at registration: {pct(before)})", sl, share=off / n, registration_share=before)
    for sl, w in d["wrong"]["per_slice"].items():
        known = [m for m in w["mistakes"] if m["truth"] != "?"]
        if sl not in bad or w["wrong"] < MIN_COUNT or not known:
            continue
        top = known[0]
        share = top["count"] / w["wrong"]
        if share >= 0.5:
            add(35 + 20 * share, f"on slice {sl} the model answered {top['answer']} where the true label was "
                f"{top['truth']} in {top['count']} of its {w['wrong']} wrong answers", sl, mistake=top)
    t = d["traffic"]
    if t["requests_with_user"] >= MIN_COUNT and t["top3_users_share"] is not None and t["top3_users_share"] >= 0.5:
        k = min(3, t["users"])
        add(45 + 20 * t["top3_users_share"], f"{pct(t['top3_users_share'])} of the window's requests came from "
            f"{k} user{'s' if k != 1 else ''} (of {t['users']})", None, users=t["users"],
            top3_share=t["top3_users_share"])
    slo = report.get("slo") or {}
    if slo and not slo.get("error_rate_ok", True):
        add(35, f"{pct(slo['error_rate'])} of the window's requests ended in an error (over the error-rate SLO"
            + (f" of {pct(d['slo_limits']['error_rate'])}" if d.get("slo_limits") else "") + ")", None,
            error_rate=slo["error_rate"])
    if slo and not slo.get("latency_ok", True):
        add(15, f"p95 latency {num(slo.get('p95_latency_ms'), '.0f')} ms is over its SLO"
            + (f" of {d['slo_limits']['p95_latency_ms']:.0f} ms" if d.get("slo_limits") else ""), None,
            p95_latency_ms=slo.get("p95_latency_ms"))
    ft = report.get("feedback_trend") or {}
    if ft.get("verdict") == "below":
        add(30, f"the feedback score fell below its SPC limit: window mean {ft['window_mean']:.2f} "
            f"(n={ft['window_n']}) < lower control limit {ft['lcl']:.2f} (baseline mean {ft['baseline_mean']:.2f}, "
            f"n={ft['baseline_n']})",
            None, **{k: ft.get(k) for k in ("window_mean", "lcl", "baseline_mean")})
    dc = drift_cause(report.get("drift"), "production prompts drifted from the champion's training data")
    if dc is not None:
        causes.append({**dc, "slice": None})
    return sorted(causes, key=lambda c: -c["score"])


# -- the whole diagnosis ------------------------------------------------------------------------------------------
def _as_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests as the records composition() reads (source `production`)."""
    return [{"id": r["request_id"], "slice": r["slice"], "user_text": r.get("prompt"), "response": r.get("output"),
             "source": "production"} for r in rows]


def _signals(report: dict[str, Any]) -> list[dict[str, Any]]:
    sig, reasons = report.get("signals") or {}, set(report.get("reasons") or [])
    q, ft, fv = report.get("quality") or {}, report.get("feedback_trend") or {}, report.get("feedback_volume") or {}
    detail = {
        "drift": drift_line(report["drift"]) if report.get("drift") else "-",
        "feedback_trend": f"{ft.get('verdict')}: window mean {num(ft.get('window_mean'), '.3f')} of "
                          f"{ft.get('window_n')} scored requests, lower control limit {num(ft.get('lcl'), '.3f')} "
                          f"(baseline mean {num(ft.get('baseline_mean'), '.3f')} of {ft.get('baseline_n')})",
        "feedback_volume": f"{fv.get('since_champion')} feedback items since the champion was registered "
                           f"(threshold {fv.get('threshold')})",
        "estimated_quality": "below the floor: " + (", ".join(q.get("below_floor") or []) or "none"),
        "quality_slo": "breached: " + (", ".join(q.get("slo_breaches") or []) or "none"),
    }
    return [{"signal": s, "fired": bool(v), "retrain_on": s in reasons, "detail": detail.get(s, "")}
            for s, v in sig.items()]


def diagnose_decay(report: dict[str, Any], window_rows: list[dict[str, Any]],
                   champion_records: list[dict[str, Any]], reference: dict[str, Any] | None = None, *,
                   cfg: Any | None = None, total_requests: int | None = None) -> dict[str, Any]:
    """The diagnosis of one monitor check (see the module doc).

    report            monitor.check's report (signals, quality, drift, slo, feedback_trend)
    window_rows       the champion's requests of the window: request_id, created, user_id, slice, prompt,
                      output, status, optional score (mean feedback); on classification slices pred (the
                      label answered), and where ground truth came back truth, correct, truth_source
    champion_records  the champion's training data (sft.jsonl records); empty: no comparison
    reference         the version's calibration reference (evaluate/calibration.py), for the figures at
                      registration; default: the summary in report["quality"]["reference"]
    cfg               the RunConfig (classification labels, SLO limits, the window); optional
    """
    notes: list[str] = []
    rows = [{**r, "slice": r.get("slice") or UNTAGGED} for r in window_rows]
    if total_requests is not None and total_requests > len(rows):
        notes.append(f"the diagnosis read the newest {len(rows)} of the window's {total_requests} requests")
    answered = [r for r in rows if r.get("status", "ok") == "ok"]
    ev = cfg.evaluate if cfg is not None else None
    win = composition(_as_records(answered), ev)
    champ = composition(champion_records, ev) if champion_records else None
    classification = sorted({r["slice"] for r in rows if "pred" in r})
    # label mixes of the classification slices (the labels the model answered, an answer naming none as one
    # bucket) and of the slices whose training answers are labels; not of free text that happens to be short
    win["labels"] = {sl: mix for sl, mix in win["labels"].items() if sl in (champ or {}).get("labels", {})}
    for sl in classification:
        win["labels"][sl] = _answer_mix(rows, sl)
    if champ is None:
        notes.append("the champion's training data was not found (the base model serves, or its data was not "
                     "recorded): no comparison with the training data")
    untagged = sum(r["slice"] == UNTAGGED for r in answered)
    if untagged:
        notes.append(f"{untagged} of the window's {len(answered)} answered requests carry no slice: slice shares in "
                     "the causes are among the requests that do")
    dec = decayed(report, reference)
    at_stake = {(e["slice"], e["label"]) for e in dec if e.get("label")}
    wrong = wrong_answers(rows, {e["slice"] for e in dec}, at_stake)
    m = cfg.monitor if cfg is not None else None
    d: dict[str, Any] = {
        "champion": report.get("champion"), "time": report.get("time"),
        "window_hours": m.window_hours if m is not None else None,
        "retrain": report.get("retrain"), "reasons": report.get("reasons") or [],
        "signals": _signals(report), "slo": report.get("slo"),
        "slo_limits": {"error_rate": m.slo_error_rate, "p95_latency_ms": m.slo_p95_latency_ms} if m else None,
        "decayed": dec, "wrong": wrong, "traffic": traffic(rows, total_requests),
        "composition": {"window": win, "champion": champ}, "drift": report.get("drift"), "notes": notes}
    d["causes"] = decay_causes(d, report, rows, champion_records, reference)
    return d


# -- Markdown ------------------------------------------------------------------------------------------------------
def _iv(x: dict[str, Any] | None) -> str:
    if not x or x.get("value") is None:
        return "-"
    lo, up = x.get("lower"), x.get("upper")
    return f"{x['value']:.3f}" + (f" [{lo:.3f}, {up:.3f}]" if lo is not None and up is not None else "")


def _n(x: Any) -> str:
    return str(x) if isinstance(x, int) else "-"


def _mix(m: dict[str, int], top: int = 6) -> str:
    if not m:
        return "-"
    n = sum(m.values())
    items = sorted(m.items(), key=lambda kv: -kv[1])
    s = ", ".join(f"{cut(k, 24)} {v} ({pct(v / n)})" for k, v in items[:top])
    return s + (f", {len(items) - top} more" if len(items) > top else "")


def decay_markdown(d: dict[str, Any]) -> str:
    """The diagnosis as Markdown: what fired and what decayed, the likely causes first, then the evidence."""
    who = "the base model" if d.get("champion") in (None, "base") else f"champion v{d['champion']}"
    window = f"last {d['window_hours']:g} h, " if d.get("window_hours") else ""
    t = d["traffic"]
    lines = [f"# Diagnosis: production decay of {who} ({window}{t['requests']} requests)", ""]
    fired = [s for s in d["signals"] if s["fired"]]
    lines.append("Signals that fired: " + ("; ".join(f"**{s['signal']}** ({s['detail']})" for s in fired) or "none")
                 + ". Retraining " + (f"due ({', '.join(d['reasons'])})." if d.get("retrain") else "not due."))
    slo = d.get("slo") or {}
    if slo and not (slo.get("error_rate_ok", True) and slo.get("latency_ok", True)):
        lines.append("")
        lines.append(f"Serving SLO breached: error rate {slo['error_rate']:.3f}, p95 latency "
                     f"{num(slo.get('p95_latency_ms'), '.0f')} ms.")
    lines += ["", "## What decayed", ""]
    if d["decayed"]:
        lines += ["| slice | figure | at registration | now [interval] | n | change | floor / SLO | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in d["decayed"]:
            reg = e["registration"]
            b = e.get("bound")
            lines.append(f"| {e['slice']} | {e['figure']} | "
                         + (f"{reg['value']:.3f} (n={_n(reg.get('n'))})" if reg else "-")
                         + f" | {_iv(e['now'])} | {_n(e['now'].get('n'))} | {num(e['change'], '+.3f')} | "
                         + (f"{b['kind']} {num(b['value'], '.3f')}" if b else "-") + f" | {e['verdict']} |")
    else:
        lines.append("No classification slice's quality figure fell (no floor, SLO or figure at registration "
                     "crossed by a whole interval).")
    lines += ["", "## Likely causes (most likely first)", ""]
    lines += [f"{i}. {c['cause']}" for i, c in enumerate(d["causes"], 1)] or ["- none found in the traffic, the "
                                                                              "data or the signals"]
    w = d["wrong"]
    lines += ["", f"## Wrong answers by the ground truth that came back ({w['wrong']} of {w['labelled']} labelled)", ""]
    if not w["labelled"]:
        lines.append("No ground truth (imported labels, audit ratings, feedback) came back for the window's requests "
                     "of a classification slice: no wrong answers to show.")
    if w["per_slice"]:
        lines += ["| slice | labelled | wrong | most common mistakes (answer -> true label) |", "|---|---|---|---|"]
        for sl, s in w["per_slice"].items():
            mist = ", ".join(f"{m['answer']} -> {m['truth']}: {m['count']}" for m in s["mistakes"]) or "-"
            lines.append(f"| {sl} | {s['labelled']} | {s['wrong']} | {mist} |")
    if w["examples"]:
        lines += ["", "| request | slice | prompt | answer | true label | source |", "|---|---|---|---|---|---|"]
        lines += [f"| {cut(x['request_id'], 20)} | {x['slice']} | {cut(x['prompt'], 70)} | {cut(x['answer'], 30)} | "
                  f"{x['true_label'] or '(unknown: marked wrong)'} | {x['source']} |" for x in w["examples"]]
    lines.append("")
    win, champ = d["composition"]["window"], d["composition"]["champion"]
    lines += ["## Production traffic vs the champion's training data", "",
              "| | window (answered requests) | champion's training data |", "|---|---|---|",
              f"| records | {win['records']} of {t['requests']} requests | {champ['records'] if champ else '-'} |"]
    for sl in dict.fromkeys([*win["per_slice"], *((champ or {}).get("per_slice") or {})]):
        a, b = win["per_slice"].get(sl), (champ or {}).get("per_slice", {}).get(sl)
        lines.append(f"| slice {sl} | {a['records'] if a else 0} ({pct(a['share']) if a else '0%'}) | "
                     + (f"{b['records']} ({pct(b['share'])})" if b else ("0" if champ else "-")) + " |")
    for k in ("prompt_words_mean", "prompt_words_median"):
        lines.append(f"| {k.replace('_', ' ')} | {win['lengths'][k]:.1f} | "
                     f"{num(champ['lengths'][k], '.1f') if champ else '-'} |")
    cfb = (champ or {}).get("feedback")
    lines.append(f"| users | {t['users']}" + (f", top 3: {pct(t['top3_users_share'])} of requests"
                                               if t["top3_users_share"] is not None else "")
                 + " | " + (f"{num(cfb['users'], 'd')} among feedback records" if cfb and cfb.get("users") else "-")
                 + " |")
    lines.append(f"| errors | {t['errors']} ({pct(t['error_share'])}) | - |")
    lines.append(f"| with feedback | {t['with_feedback']} ({pct(t['feedback_share'])}), mean score "
                 f"{num(t['mean_score'], '.2f')} | " + (f"{cfb['records']} ({pct(cfb['share'])})" if cfb else "-")
                 + " |")
    lines.append("| sources | production | "
                 + (", ".join(f"{k} {v}" for k, v in champ["per_source"].items()) if champ else "-") + " |")
    for sl in sorted(set(win["labels"]) | set((champ or {}).get("labels", {}))):
        lines.append(f"| labels {sl} | {_mix(win['labels'].get(sl, {}))} | "
                     f"{_mix((champ or {}).get('labels', {}).get(sl, {}))} |")
    lines.append("")
    if d.get("drift"):
        lines += ["## Drift of production prompts against the champion's training data", "", drift_line(d["drift"]), ""]
    lines += ["## Signals", ""]
    lines += [f"- {s['signal']}: {'FIRED' if s['fired'] else 'quiet'}"
              + (" (a retraining signal)" if s["retrain_on"] else "") + f"; {s['detail']}" for s in d["signals"]]
    lines.append("")
    if d.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in d["notes"]] + [""]
    return "\n".join(lines)


# -- reading, for monitor.check -----------------------------------------------------------------------------------
def window_rows(store: Any, since: float, version: str, limit: int = MAX_WINDOW_ROWS) -> list[dict[str, Any]]:
    """The champion's requests since `since` (any status; at most `limit`, the newest), oldest first."""
    from tuneloop.monitor.quality import window_requests

    return window_requests(store, since, None, version, answered_only=False, limit=limit)


def attach_truth(store: Any, rows: list[dict[str, Any]], labels: dict[str, list[str]], since: float) -> None:
    """pred on the answered requests of classification slices; truth, correct and truth_source where ground
    truth came back (monitor/realized.py's truths: audit, import, feedback)."""
    from tuneloop.evaluate.calibration import label_of
    from tuneloop.monitor.labels import QualityStore
    from tuneloop.monitor.realized import truths

    part = [r for r in rows if r["slice"] in labels and r["status"] == "ok"]
    if not part:
        return
    for r in part:
        r["pred"] = label_of(r["output"], labels[r["slice"]])
    ids = {r["request_id"] for r in part}
    stored = QualityStore(store.engine).labels(list(ids))
    feedback = [f for f in store.rows(since=since) if f["request_id"] in ids]
    for sl, labs in labels.items():
        mine = [r for r in part if r["slice"] == sl]
        truth = truths(mine, labs, stored, feedback)
        for r in mine:
            t = truth.get(r["request_id"])
            if t is not None:
                r.update(truth=t["label"], correct=bool(t["correct"]), truth_source=t["source"])


def write_decay_diagnosis(cfg: Any, store: Any, version: str, since: float, report: dict[str, Any],
                          scores: dict[str, float | None], champion_sft: Path | None, out: Path) -> dict[str, Any]:
    """Read what the diagnosis needs, write out/diagnosis.json and out/diagnosis.md; returns the report's
    `diagnosis` section: the top causes and the file names."""
    from tuneloop.evaluate.calibration import classification_labels, read_reference
    from tuneloop.jsonl import read_jsonl

    rows = window_rows(store, since, version)
    for r in rows:
        r["score"] = scores.get(r["request_id"])
    attach_truth(store, rows, classification_labels(cfg.evaluate), since)
    champ = read_jsonl(champion_sft) if champion_sft is not None and Path(champion_sft).exists() else []
    ref_path = cfg.state_path / "quality" / f"reference-{version}.json"
    reference = read_reference(ref_path) if ref_path.exists() else None
    d = diagnose_decay(report, rows, champ, reference, cfg=cfg, total_requests=report.get("window_requests"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(d, indent=2, default=str))
    (out / "diagnosis.md").write_text(decay_markdown(d))
    return {"causes": [{"score": c["score"], "cause": c["cause"]} for c in d["causes"][:TOP_CAUSES]],
            "markdown": "diagnosis.md", "json": "diagnosis.json"}
