"""Why a candidate was blocked (or a champion decayed): a diagnosis from the files a run leaves behind.

diagnose() reads
    evaluation/   gate.json, metrics.json, predictions.jsonl (evaluate/run.py)
    dataset/      this run's sft.jsonl and report.json (ingest)
    champion's    sft.jsonl (the champion's training data, data/replay.py), optional
    drift.json    validate_data's drift report against the champion's data, optional
and returns a JSON-able dict (to_markdown() renders it):
    regressions   the failed gate rules: slice, metric, candidate vs reference, the change and its interval
    flipped       evaluation records the reference model answered right and the candidate wrong, with both
                  answers (right = the normalised answer equals the reference, as exact_match counts it),
                  per slice counts of right->wrong and wrong->right, and for each regressed slice the
                  records whose answer NLL rose most (a gate on NLL can fail with no answer flipping)
    composition   this run's training data against the champion's: records per slice and source, label mix
                  of label-like slices, prompt and answer lengths, the share that came from user feedback
                  and how many users it came from
    drift         the drift summary, when there is one
    causes        likely causes in plain words, ranked (the score orders them; the evidence is kept)
    attributions  for up to 3 flipped records, which prompt tokens drove the candidate's answer: Captum's
                  LLMAttribution with FeatureAblation on the candidate model (bounded in time; skipped, with
                  a note, when the model cannot be loaded)
    repair        the repair ladder's record, when it ran
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tuneloop.config import EvaluateConfig
from tuneloop.evaluate.metrics import normalize_answer
from tuneloop.jsonl import read_jsonl

log = logging.getLogger("tuneloop.diagnosis")

FEEDBACK_SOURCE = "feedback-store"  # ingest's source name for records made from the feedback store
MAX_FLIPPED = 20
LABEL_LIKE_MAX_WORDS = 3


# -- reading -------------------------------------------------------------------------------------------------
def _read(path: Path | None) -> list[dict[str, Any]]:
    return read_jsonl(path) if path is not None and Path(path).exists() else []


def _json(path: Path | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if path is not None and Path(path).exists() else None


# -- regressions and flipped records --------------------------------------------------------------------------
def regressions(gate: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in gate.get("rules", []):
        if r.get("passed"):
            continue
        cand, champ = r.get("candidate"), r.get("champion")
        change = cand - champ if isinstance(cand, (int, float)) and isinstance(champ, (int, float)) else None
        out.append({"slice": r.get("slice"), "metric": r.get("metric"), "kind": r.get("kind"), "candidate": cand,
                    "reference": champ, "change": change, "ci": r.get("ci"), "verdict": r.get("verdict"),
                    "why": r.get("why")})
    return out


def _right(row: dict[str, Any]) -> bool:
    return normalize_answer(str(row.get("prediction", ""))) == normalize_answer(str(row.get("reference", "")))


def flipped_records(predictions: list[dict[str, Any]], regressed: set[str]) -> dict[str, Any]:
    """Right -> wrong records (reference model right, candidate wrong), counts per slice, and the records
    whose answer NLL rose most on each regressed slice."""
    by_model: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for p in predictions:
        by_model[p.get("model", "candidate")][str(p["id"])] = p
    cand, ref = by_model.get("candidate", {}), by_model.get("champion") or by_model.get("base", {})
    flipped, counts = [], defaultdict(lambda: {"right_to_wrong": 0, "wrong_to_right": 0, "records": 0})
    nll_up: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rid, c in sorted(cand.items()):
        r = ref.get(rid)
        if r is None:
            continue
        sl = str(c.get("slice"))
        counts[sl]["records"] += 1
        before, after = _right(r), _right(c)
        if before and not after:
            counts[sl]["right_to_wrong"] += 1
            flipped.append({"id": rid, "slice": sl, "prompt": c.get("prompt", ""), "reference": c.get("reference"),
                            "before": r.get("prediction"), "after": c.get("prediction")})
        elif after and not before:
            counts[sl]["wrong_to_right"] += 1
        if sl in regressed and c.get("n_tokens") and r.get("n_tokens"):
            nb, na = r["nll_sum"] / r["n_tokens"], c["nll_sum"] / c["n_tokens"]
            nll_up[sl].append({"id": rid, "prompt": c.get("prompt", ""), "reference": c.get("reference"),
                               "nll_before": nb, "nll_after": na, "change": na - nb,
                               "before": r.get("prediction"), "after": c.get("prediction")})
    # regressed slices first, then by id: the records a reader should look at
    flipped.sort(key=lambda f: (f["slice"] not in regressed, f["slice"], f["id"]))
    return {"reference_model": "champion" if "champion" in by_model else "base", "counts": dict(counts),
            "right_to_wrong": flipped[:MAX_FLIPPED], "right_to_wrong_total": len(flipped),
            "nll_increase": {sl: sorted(v, key=lambda x: -x["change"])[:5] for sl, v in nll_up.items()}}


# -- composition of the training data -------------------------------------------------------------------------
def _source_name(s: Any) -> str:
    s = str(s or "")
    return s if s.startswith(("replay:", FEEDBACK_SOURCE)) else (Path(s).name or s)


def _words(text: Any) -> int:
    return len(str(text or "").split())


def _request_id(rid: str) -> str:
    """The feedback store's request id inside a feedback record's id (fb-<request id>-sft / -corr)."""
    core = rid.removeprefix("fb-")
    for suffix in ("-sft", "-corr"):
        core = core.removesuffix(suffix)
    return core


def label_like(records: list[dict[str, Any]], labels: list[str] | None = None) -> bool:
    """A slice whose answers are labels: configured as classification, or every answer is a few words and
    there are few distinct answers."""
    if labels:
        return True
    answers = [normalize_answer(str(r.get("response", ""))) for r in records]
    return bool(answers) and all(_words(a) <= LABEL_LIKE_MAX_WORDS for a in answers) and \
        len(set(answers)) <= max(2, min(12, len(answers) // 4))


def composition(records: list[dict[str, Any]], cfg: EvaluateConfig | None = None,
                feedback_users: dict[str, str] | None = None) -> dict[str, Any]:
    n = len(records)
    per_slice = Counter(str(r.get("slice") or "default") for r in records)
    per_source = Counter(_source_name(r.get("source")) for r in records)
    by_slice: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_slice[str(r.get("slice") or "default")].append(r)
    labels = {}
    for sl, rows in sorted(by_slice.items()):
        configured = cfg.slices.get(sl).labels if cfg is not None and sl in cfg.slices and \
            cfg.slices[sl].task == "classification" else None
        if label_like(rows, configured):
            c = Counter(normalize_answer(str(r.get("response", ""))) for r in rows)
            labels[sl] = {k: v for k, v in c.most_common()}
    pw = [_words(r.get("user_text") or r.get("prompt")) for r in records]
    aw = [_words(r.get("response") or r.get("completion")) for r in records]
    fb = [r for r in records if str(r.get("source", "")) == FEEDBACK_SOURCE or str(r.get("id", "")).startswith("fb-")]
    users: Counter[str] = Counter()
    for r in fb:
        user = r.get("user") or r.get("user_id") or (feedback_users or {}).get(_request_id(str(r.get("id", ""))))
        if user:
            users[str(user)] += 1
    known = sum(users.values())
    top3 = sum(c for _, c in users.most_common(3))
    return {
        "records": n,
        "per_slice": {sl: {"records": c, "share": c / n} for sl, c in per_slice.most_common()},
        "per_source": dict(per_source.most_common()),
        "labels": labels,
        "lengths": {"prompt_words_mean": statistics.fmean(pw) if pw else 0.0,
                    "prompt_words_median": statistics.median(pw) if pw else 0.0,
                    "answer_words_mean": statistics.fmean(aw) if aw else 0.0,
                    "answer_words_median": statistics.median(aw) if aw else 0.0},
        "feedback": {"records": len(fb), "share": len(fb) / n if n else 0.0,
                     "users": len(users) if known else None, "records_with_known_user": known,
                     "top3_users_share": top3 / known if known else None,
                     "top_users": [{"user": u[:12], "records": c} for u, c in users.most_common(3)]},
    }


# -- causes ----------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def tvd(p: dict[str, int], q: dict[str, int]) -> float:
    tp, tq = sum(p.values()) or 1, sum(q.values()) or 1
    return 0.5 * sum(abs(p.get(k, 0) / tp - q.get(k, 0) / tq) for k in set(p) | set(q))


def likely_causes(regressed: list[dict[str, Any]], run: dict[str, Any], champion: dict[str, Any] | None,
                  ingest_report: dict[str, Any] | None, drift: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Candidate explanations with a score (higher first) and their evidence, in plain words."""
    causes: list[dict[str, Any]] = []

    def add(score: float, text: str, **evidence: Any) -> None:
        causes.append({"score": round(score, 3), "cause": text, "evidence": evidence})

    reg_slices = [r["slice"] for r in regressed if str(r.get("kind", "")).startswith("max_regression")]
    run_sl, champ_sl = run["per_slice"], (champion or {}).get("per_slice", {})
    for sl in dict.fromkeys(reg_slices):
        mine = run_sl.get(sl, {"records": 0, "share": 0.0})
        theirs = champ_sl.get(sl)
        size = max((abs(r["change"] or 0.0) for r in regressed if r["slice"] == sl), default=0.0)
        if mine["records"] == 0:
            had = f" (the champion's training data had {theirs['records']}, {pct(theirs['share'])})" if theirs else ""
            add(100 + size, f"slice {sl} had no training records in this run{had}",
                slice=sl, run_records=0, champion_records=theirs["records"] if theirs else None)
        elif theirs and mine["share"] < 0.5 * theirs["share"]:
            add(80 + size, f"slice {sl} fell from {pct(theirs['share'])} of the training data ({theirs['records']} "
                f"records) to {pct(mine['share'])} ({mine['records']})", slice=sl, run_share=mine["share"],
                champion_share=theirs["share"])
    if reg_slices:
        rp = (ingest_report or {}).get("replay") or {}
        if ingest_report is not None and not rp.get("accepted"):
            add(70, "nothing of the champion's training data was replayed into this run: "
                + (rp.get("note") or f"data.replay_share = {rp.get('share', 0)}"), replay=rp)
    for sl, v in run_sl.items():
        before = champ_sl.get(sl, {"share": 0.0})["share"]
        if v["share"] >= 0.6 and before < 0.2 and champion is not None:
            add(50, f"slice {sl} made up {pct(v['share'])} of this run's training data (the champion's: "
                f"{pct(before)}): the candidate specialised in it", slice=sl)
    for sl, mix in run.get("labels", {}).items():
        old = (champion or {}).get("labels", {}).get(sl)
        if not old or sum(mix.values()) < 5 or sum(old.values()) < 5:
            continue
        d = tvd(mix, old)
        if d >= 0.25:
            a, b = max(old, key=old.get), max(mix, key=mix.get)
            sa, sb = old[a] / sum(old.values()), mix[b] / sum(mix.values())
            text = (f"label mix of slice {sl} shifted from {a} ({pct(sa)}) to {b} ({pct(sb)})" if a != b else
                    f"label {a} of slice {sl} went from {pct(sa)} to {pct(mix.get(a, 0) / sum(mix.values()))} of "
                    "its records")
            add(40 + 40 * d, text, slice=sl, total_variation=d, champion=old, run=mix)
    fb = run["feedback"]
    if fb["records"] >= 5 and fb.get("top3_users_share") is not None and fb["top3_users_share"] >= 0.5:
        k = min(3, fb["users"] or 0)
        add(45 + 20 * fb["top3_users_share"], f"{pct(fb['top3_users_share'])} of feedback came from {k} users "
            f"(of {fb['users']})", feedback=fb)
    cfb = (champion or {}).get("feedback", {}).get("share", 0.0)
    if fb["share"] >= 0.3 and fb["share"] >= 2 * cfb:
        add(30 + 20 * fb["share"], f"{pct(fb['share'])} of this run's training data came from user feedback (the "
            f"champion's: {pct(cfb)})", feedback_share=fb["share"], champion_feedback_share=cfb)
    if champion is not None and champion["lengths"]["answer_words_mean"] > 0:
        ratio = run["lengths"]["answer_words_mean"] / champion["lengths"]["answer_words_mean"]
        if ratio >= 1.5 or ratio <= 1 / 1.5:
            add(25, f"answers are {ratio:.1f}x as long as in the champion's training data "
                f"({run['lengths']['answer_words_mean']:.1f} vs {champion['lengths']['answer_words_mean']:.1f} words)",
                ratio=ratio)
    dc = drift_cause(drift, "the new training prompts drifted from the champion's")
    if dc is not None:
        causes.append(dc)
    return sorted(causes, key=lambda c: -c["score"])


def drift_cause(drift: dict[str, Any] | None, subject: str) -> dict[str, Any] | None:
    """A drift summary (data/drift.py) as a cause when a descriptor drifted or the embedding drift score is
    at least 0.7: score 20 + 5 per drifted descriptor."""
    if not drift or not drift.get("computed"):
        return None
    drifted = [k for k, v in (drift.get("descriptors") or {}).items() if v.get("drifted")]
    emb = drift.get("embedding_drift_score")
    if not drifted and (emb is None or emb < 0.7):
        return None
    return {"score": round(20 + 5 * len(drifted), 3),
            "cause": f"{subject}: {len(drifted)} of {len(drift.get('descriptors') or {})} text descriptors "
                     f"({', '.join(drifted) or '-'})"
                     + (f", embedding drift score {emb:.2f}" if emb is not None else ""),
            "evidence": {"drifted": drifted, "embedding": emb}}


# -- token attributions (Captum) ---------------------------------------------------------------------------------
def _pretty(tok: Any, token: str) -> str:
    try:
        return tok.convert_tokens_to_string([token])
    except Exception:  # noqa: BLE001 - a display nicety
        return token


def token_attributions(base_dir: Path, candidate: Path | None, records: list[dict[str, Any]],
                       system_prompt: str | None = None, max_records: int = 3, max_seconds: float = 60.0,
                       max_prompt_tokens: int = 256, top: int = 8) -> dict[str, Any]:
    """Which prompt tokens drove the candidate's (wrong) answer, for up to `max_records` flipped records:
    Captum's LLMAttribution over FeatureAblation (each prompt token replaced by the pad token in turn; the
    change of the answer's log-probability is its attribution). Stops when `max_seconds` is spent."""
    started = time.perf_counter()
    if not records:
        return {"records": [], "note": "no flipped records to attribute"}
    try:
        from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

        from tuneloop.data.formatting import ChatFormatter
        from tuneloop.models import load_causal_lm

        model, tok = load_causal_lm(base_dir, candidate)
    except Exception as e:  # noqa: BLE001 - the diagnosis stands without them
        return {"records": [], "note": f"token attributions skipped: the candidate model could not be loaded "
                                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"}
    fmt = ChatFormatter(tok, system_prompt)
    attr = LLMAttribution(FeatureAblation(model), tok)
    out, notes = [], []
    for rec in records[:max_records]:
        if time.perf_counter() - started > max_seconds:
            notes.append(f"stopped after {max_seconds:.0f} s")
            break
        prompt = fmt.user_prompt(str(rec.get("prompt", "")))
        target = str(rec.get("after") or "").strip() or str(rec.get("reference") or "")
        if not target:
            continue
        n_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
        if n_tokens > max_prompt_tokens:
            notes.append(f"{rec['id']}: prompt of {n_tokens} tokens is over {max_prompt_tokens}; skipped")
            continue
        t0 = time.perf_counter()
        inp = TextTokenInput(prompt, tok, baselines=tok.pad_token_id or 0)
        res = attr.attribute(inp, target=target, forward_in_tokens=False)
        scores = [(float(s), _pretty(tok, t)) for s, t in zip(res.seq_attr.tolist(), res.input_tokens, strict=True)]
        scores = [(s, t) for s, t in scores if t.strip() and not (t.startswith("<|") and t.endswith("|>"))]
        out.append({"id": rec["id"], "slice": rec.get("slice"), "target": target, "explains": "candidate answer"
                    if rec.get("after") else "reference", "seconds": time.perf_counter() - t0,
                    "top_tokens": [{"token": t, "attribution": s}
                                   for s, t in sorted(scores, key=lambda x: -abs(x[0]))[:top]]})
    del model
    return {"records": out, "method": "captum LLMAttribution(FeatureAblation), target log-probability",
            "note": "; ".join(notes), "seconds": time.perf_counter() - started}


# -- the whole diagnosis -------------------------------------------------------------------------------------------
def diagnose(evaluation: Path, dataset: Path | None = None, champion_data: Path | None = None,
             drift: Path | dict[str, Any] | None = None, cfg: EvaluateConfig | None = None,
             feedback_users: dict[str, str] | None = None, base_dir: Path | None = None,
             candidate: Path | None = None, system_prompt: str | None = None, attributions: int = 3,
             attribution_seconds: float = 60.0, repair: dict[str, Any] | None = None) -> dict[str, Any]:
    """The diagnosis of one evaluation (see the module docstring). Paths that do not exist are left out,
    with a note; `base_dir` + `candidate` enable the token attributions."""
    evaluation = Path(evaluation)
    gate = _json(evaluation / "gate.json") or {"passed": None, "rules": []}
    notes: list[str] = []
    regressed = regressions(gate)
    reg_slices = {r["slice"] for r in regressed}
    preds = _read(evaluation / "predictions.jsonl")
    if not preds:
        notes.append(f"{evaluation / 'predictions.jsonl'}: missing; no flipped records")
    flips = flipped_records(preds, reg_slices)
    run_records = _read(Path(dataset) / "sft.jsonl") if dataset else []
    if not run_records:
        notes.append("this run's training data (sft.jsonl) was not found")
    champ_records = _read(champion_data)
    if champion_data is None or not champ_records:
        notes.append("the champion's training data was not found (no champion yet, or not recorded): no "
                     "comparison of compositions")
    run_comp = composition(run_records, cfg, feedback_users)
    champ_comp = composition(champ_records, cfg, feedback_users) if champ_records else None
    ingest_report = _json(Path(dataset) / "report.json") if dataset else None
    drift_summary = drift if isinstance(drift, dict) else ((_json(drift) or {}).get("summary") if drift else None)
    causes = likely_causes(regressed, run_comp, champ_comp, ingest_report, drift_summary)
    if attributions > 0 and base_dir is not None:
        attr = token_attributions(Path(base_dir), Path(candidate) if candidate else None,
                                  flips["right_to_wrong"], system_prompt, attributions, attribution_seconds)
    else:
        attr = {"records": [], "note": "token attributions not requested (no model given)"}
    return {"passed": gate.get("passed"), "reference": gate.get("reference"), "regressions": regressed,
            "flipped": flips, "composition": {"run": run_comp, "champion": champ_comp}, "drift": drift_summary,
            "causes": causes, "attributions": attr, "repair": repair, "notes": notes}


def num(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def cut(s: Any, n: int = 80) -> str:
    if s is None or not str(s).strip():
        return "(empty)"
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= n else s[:n - 1] + "…"


def drift_line(dr: dict[str, Any]) -> str:
    """A drift summary in one line: the descriptors that drifted and the embedding drift score, or why none."""
    if not dr.get("computed"):
        return str(dr.get("note", "not computed"))
    drifted = [k for k, v in (dr.get("descriptors") or {}).items() if v.get("drifted")]
    return (f"{len(drifted)} of {len(dr.get('descriptors') or {})} descriptors drifted ({', '.join(drifted) or '-'}); "
            f"embedding drift score {num(dr.get('embedding_drift_score'), '.3f')}")


def to_markdown(d: dict[str, Any]) -> str:
    """The diagnosis as Markdown: what regressed, the likely causes first, then the evidence."""
    verdict = "blocked" if d.get("passed") is False else "passed" if d.get("passed") else "unknown"
    lines = [f"# Diagnosis: candidate {verdict} (reference: {d.get('reference') or '-'})", ""]
    if d["regressions"]:
        lines += ["## What regressed", "", "| slice | metric | candidate | reference | change | CI of the change | "
                  "verdict |", "|---|---|---|---|---|---|---|"]
        for r in d["regressions"]:
            ci = f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]" if r.get("ci") else "-"
            lines.append(f"| {r['slice']} | {r['metric']} | {num(r['candidate'])} | {num(r['reference'])} | "
                         f"{num(r['change'], '+.4f')} | {ci} | {r.get('verdict') or r.get('kind')} |")
        lines.append("")
    else:
        lines += ["No gate rule failed.", ""]
    lines += ["## Likely causes (most likely first)", ""]
    lines += [f"{i}. {c['cause']}" for i, c in enumerate(d["causes"], 1)] or ["- none found in the data composition"]
    lines.append("")
    fl = d["flipped"]
    lines += [f"## Records that flipped from right to wrong ({fl['right_to_wrong_total']}; reference model: "
              f"{fl['reference_model']})", "", "| slice | records | right -> wrong | wrong -> right |",
              "|---|---|---|---|"]
    lines += [f"| {sl} | {c['records']} | {c['right_to_wrong']} | {c['wrong_to_right']} |"
              for sl, c in sorted(fl["counts"].items())]
    if fl["right_to_wrong"]:
        lines += ["", "| id | slice | prompt | reference | before | after |", "|---|---|---|---|---|---|"]
        lines += [f"| {f['id']} | {f['slice']} | {cut(f['prompt'])} | {cut(f['reference'], 30)} | "
                  f"{cut(f['before'], 30)} | {cut(f['after'], 30)} |" for f in fl["right_to_wrong"]]
    for sl, rows in fl.get("nll_increase", {}).items():
        lines += ["", f"Largest answer-NLL increases on `{sl}` (per token):", "",
                  "| id | prompt | reference | NLL before | NLL after | before | after |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['id']} | {cut(x['prompt'], 60)} | {cut(x['reference'], 30)} | {x['nll_before']:.3f} | "
                  f"{x['nll_after']:.3f} | {cut(x['before'], 25)} | {cut(x['after'], 25)} |" for x in rows]
    lines.append("")
    comp = d["composition"]
    run, champ = comp["run"], comp.get("champion")
    lines += ["## Training data: this run vs the champion's", "", "| | this run | champion |", "|---|---|---|",
              f"| records | {run['records']} | {champ['records'] if champ else '-'} |"]
    slices = list(dict.fromkeys([*run["per_slice"], *((champ or {}).get("per_slice") or {})]))
    for sl in slices:
        a = run["per_slice"].get(sl)
        b = (champ or {}).get("per_slice", {}).get(sl)
        lines.append(f"| slice {sl} | {a['records'] if a else 0} ({pct(a['share']) if a else '0%'}) | "
                     + (f"{b['records']} ({pct(b['share'])})" if b else ("0" if champ else "-")) + " |")
    for k in ("prompt_words_mean", "answer_words_mean"):
        lines.append(f"| {k.replace('_', ' ')} | {run['lengths'][k]:.1f} | "
                     f"{num(champ['lengths'][k], '.1f') if champ else '-'} |")
    fb, cfb = run["feedback"], (champ or {}).get("feedback")
    lines.append(f"| from feedback | {fb['records']} ({pct(fb['share'])}), users: {num(fb['users'], 'd')} | "
                 + (f"{cfb['records']} ({pct(cfb['share'])})" if cfb else "-") + " |")
    lines.append(f"| sources | {', '.join(f'{k} {v}' for k, v in run['per_source'].items()) or '-'} | "
                 + (", ".join(f"{k} {v}" for k, v in champ["per_source"].items()) if champ else "-") + " |")
    for sl in sorted(set(run["labels"]) | set((champ or {}).get("labels", {}))):
        a, b = run["labels"].get(sl, {}), (champ or {}).get("labels", {}).get(sl, {})
        lines.append(f"| labels {sl} | {', '.join(f'{k} {v}' for k, v in a.items()) or '-'} | "
                     f"{', '.join(f'{k} {v}' for k, v in b.items()) or '-'} |")
    lines.append("")
    dr = d.get("drift")
    if dr:
        lines += ["## Drift against the champion's training data", "", drift_line(dr), ""]
    at = d["attributions"]
    lines += ["## Token attributions of flipped answers", ""]
    for rec in at.get("records", []):
        toks = ", ".join(f"`{cut(t['token'], 20).strip()}` {t['attribution']:+.3f}" for t in rec["top_tokens"])
        lines.append(f"- {rec['id']} ({rec['slice']}), {rec['explains']} `{cut(rec['target'], 30)}`: {toks}")
    if at.get("note"):
        lines.append(f"- {at['note']}")
    lines.append("")
    rp = d.get("repair")
    if rp:
        lines += ["## Repair ladder", "", f"{'ran' if rp.get('ran') else 'not run'}: {rp.get('reason', '')}"]
        for i, a in enumerate(rp.get("attempts", []), 1):
            lines.append(f"{i}. {a['mitigation']}: {'PASS' if a['passed'] else 'fail'}"
                         + (f" ({a['error']})" if a.get("error") else "") + f", {a['wall_s']:.0f} s")
        lines.append("")
    if d.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in d["notes"]] + [""]
    return "\n".join(lines)


def write_diagnosis(d: dict[str, Any], out: Path) -> Path:
    """out/diagnosis.json and out/diagnosis.md; returns the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(d, indent=2, default=str))
    (out / "diagnosis.md").write_text(to_markdown(d))
    return out / "diagnosis.md"


def write_blocked_report(d: dict[str, Any], evaluation: Path) -> Path:
    """For the evaluate stage of a blocked candidate: diagnosis.json and diagnosis.md next to gate.json, and the
    diagnosis appended to report.md (the evaluate task's KFP Markdown output and the MLflow artifact)."""
    md = write_diagnosis(d, evaluation)
    report = evaluation / "report.md"
    before = report.read_text() if report.exists() else ""
    report.write_text(before.rstrip("\n") + "\n\n" + md.read_text())
    return md
