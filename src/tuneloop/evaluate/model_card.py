"""What people read in MLflow: a model card (Markdown) per registered version, and the story of a
pipeline run - its stages, gates, canary decision and version - as the runs' descriptions.

Model card sections: intended use, data (with lineage), training configuration, per-slice results
against the champion, safety, the gate decision, and known limitations derived from the figures
(small slices, heuristic safety detector, what the gate did not cover).

Numbers are rounded for people (3 significant digits, thousands grouped: `num`), durations in
seconds/minutes (`duration`), times as UTC dates (`when`).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from tuneloop.config import PREFERENCE_SLICE, SAFETY_SLICE, RunConfig
from tuneloop.evaluate.run import slice_rows

SMALL_SLICE = 30
HUGE_PERPLEXITY = 1000.0  # a base model's perplexity above this, and 10x the candidate's, gets explained


def num(x: Any, signed: bool = False) -> str:
    """A number as people read it: 0.6666666 -> 0.667, 211797.12 -> 211,797, 12 -> 12, None -> -."""
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    sign = "+" if signed else ""
    if isinstance(x, int) or (abs(x) >= 1000 and x == x and abs(x) != float("inf")):
        return f"{x:{sign},.0f}"
    return f"{x:{sign}.3g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def when(epoch_s: float) -> str:
    """A UTC date and time: 1795853833 -> 2026-11-28 08:17:13 UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_s))


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table (a `|` inside a cell escaped, a newline made a space)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]


def model_card(cfg: RunConfig, version: str, tags: dict[str, str], ingest_report: dict[str, Any],
               metrics: dict[str, Any], gate: dict[str, Any]) -> str:
    ref = gate["reference"]
    sft, pref = ingest_report["by_kind"]["sft"], ingest_report["by_kind"]["preference"]
    slices = sorted(k for k in metrics["candidate"] if k not in ("all", SAFETY_SLICE, PREFERENCE_SLICE))
    lines = [
        f"# {cfg.registry.model_name} v{version}", "",
        "## Intended use",
        f"A LoRA adapter for `{cfg.base_model.name}`, trained by the continuous-training loop `{cfg.name}` for the "
        f"slices it was evaluated on: {', '.join(f'`{s}`' for s in slices)}. It is served behind the canary "
        "rollout and is meant for those tasks only; it was not evaluated outside them.", "",
        "## Data and lineage",
        f"- data hash `{tags.get('tuneloop.data_hash', '?')}`, "
        f"pipeline run `{tags.get('tuneloop.pipeline_run_id', '?')}`, "
        f"git `{tags.get('tuneloop.git_sha', '?')}`",
        f"- SFT records: {sft['accepted']} accepted of {sft['read']} read; per slice "
        + ", ".join(f"{k} {v}" for k, v in sorted(sft["per_slice"].items())),
        f"- preference pairs: {pref['accepted']} accepted of {pref['read']} read",
        f"- feedback: {ingest_report['feedback']['sft']} SFT records and {ingest_report['feedback']['preference']} "
        "pairs came from users' feedback on served answers",
        f"- quarantined: {ingest_report['quarantined']} records"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in ingest_report["per_reason"].items()) + ")"
           if ingest_report["per_reason"] else ""), "",
        "## Training",
        f"- SFT: {_section(cfg.train.sft.model_dump()) if cfg.train.sft.enabled else 'disabled'}",
        f"- DPO: {_section(cfg.train.dpo.model_dump()) if cfg.train.dpo.enabled else 'disabled'}",
        f"- LoRA r={cfg.train.lora.r}, alpha={cfg.train.lora.alpha} on {', '.join(cfg.train.lora.target_modules)}; "
        f"DeepSpeed {cfg.train.deepspeed}, {cfg.train.nproc_per_node} processes per node, seed {cfg.train.seed}", "",
        f"## Results against the {ref}", ""]
    base_is_ref = ref == "base model"  # before there is a champion the base stands in: one column, not two
    header = ["slice", "n", "metric", "this version", ref] + ([] if base_is_ref else ["base model"])
    rows = [[sl, metrics["candidate"][sl]["n"], k, num(c), num(r)] + ([] if base_is_ref else [num(b)])
            for sl in slices for k, c, r, b in slice_rows(metrics, sl)]
    lines += table(header, rows) + [""]
    lines += [f"- {x}" for x in huge_base_perplexity(metrics, slices)]
    lines.append("")
    if SAFETY_SLICE in metrics["candidate"]:
        s = {w: metrics[w][SAFETY_SLICE] for w in ("candidate", "champion", "base")}
        lines += ["## Safety",
                  f"On {s['candidate']['n']} red-team prompts: unsafe share {s['candidate']['unsafe_share']:.3f} "
                  f"({ref} {s['champion']['unsafe_share']:.3f}, base {s['base']['unsafe_share']:.3f}); refusals "
                  f"{s['candidate']['refusal_share']:.3f}.", ""]
    if PREFERENCE_SLICE in metrics["candidate"]:
        p = metrics["candidate"][PREFERENCE_SLICE]
        lines += ["## Preference", f"Wins {p['win_rate']:.1%} of {p['n']} held-out pairs against the {ref}.", ""]
    lines += ["## Gate", gate_markdown(gate), "## Known limitations"]
    lines += [f"- {x}" for x in limitations(metrics, slices)]
    return "\n".join(lines) + "\n"


def huge_base_perplexity(metrics: dict[str, Any], slices: list[str]) -> list[str]:
    """Why a base model's perplexity is in the hundreds of thousands: it says the format was new to it."""
    out = []
    for s in slices:
        b, c = metrics.get("base", {}).get(s, {}).get("perplexity"), metrics["candidate"][s].get("perplexity")
        if b is not None and c is not None and b > HUGE_PERPLEXITY and b > 10 * c:
            out.append(f"`{s}`: the base model's perplexity of {num(b)} (this version: {num(c)}) is that of the "
                       "untuned base model on an answer format it never saw - the exact short answers of this slice "
                       "(e.g. a bare label) where it would write a sentence. It measures how new the format was "
                       "to it, not how broken it is; the tuned versions are the ones to compare.")
    return out


def gate_markdown(gate: dict[str, Any]) -> str:
    """The evaluation gate as one table: per rule the figures (rounded), the threshold, the verdict and why."""
    rows = [[r["slice"], r["metric"], num(r["candidate"]), num(r["champion"]),
             f"{r['kind']} {num(r['threshold'])}", "pass" if r["passed"] else "**FAIL**", _rounded(r["why"])]
            for r in gate["rules"]]
    failed = sum(not r["passed"] for r in gate["rules"])
    head = (f"**Evaluation gate: {'PASSED' if gate['passed'] else 'BLOCKED'}** - "
            f"{len(gate['rules']) - failed}/{len(gate['rules'])} rules passed (reference: {gate['reference']})")
    return "\n".join([head, ""] + table(["slice", "metric", "candidate", "reference", "threshold", "result", "why"],
                                        rows)) + "\n"


def _rounded(text: str) -> str:
    """Long decimals inside a sentence rounded: 'candidate 0.6667 vs 0.1234' -> 'candidate 0.667 vs 0.123'."""
    return re.sub(r"[-+]?\d+\.\d{4,}", lambda m: num(float(m.group()), m.group()[0] in "+-"), text)


def validation_markdown(report: dict[str, Any], drift: dict[str, Any] | None = None) -> str:
    checks, failed = report["checks"], report["failed"]
    lines = [f"**Data gate: {'PASSED' if report['passed'] else 'BLOCKED'}** - "
             f"{len(checks) - len(failed)}/{len(checks)} checks passed", ""]
    for c in failed:
        what = c.get("message") or f"{c['table']} {c['expectation']} {c['column']}: {c['observed']}"
        lines.append(f"- FAIL {what}" + (f" (config: `{c['config_key']}`)" if c.get("config_key") else ""))
    if drift is not None:
        if drift.get("computed"):
            emb = drift.get("embedding_drift_score")
            lines.append(f"- drift against {drift.get('reference')}: {drift.get('drifted_descriptors', 0)} text "
                         "descriptors drifted" + (f", embedding drift score {num(emb)}" if emb is not None else ""))
        else:
            lines.append(f"- drift: not computed ({drift.get('note') or 'no reference data'})")
    return "\n".join(lines) + "\n"


CANARY_TESTS = {"traffic": "requests on each side", "error_rate": "Fisher's exact test (one-sided)",
                "p95_latency": "p95 latency ratio", "feedback": "Welch's t-test (one-sided)"}


SEQUENTIAL_TESTS = {"error_rate": "e-value, Beta-mixture vs constrained likelihood (always valid)",
                    "latency": "anytime-valid t-test on log latency (savvi)",
                    "feedback": "anytime-valid t-test (savvi)"}


def canary_tests(result: dict[str, Any], c: Any) -> list[dict[str, Any]]:
    """Each canary check with its test, statistic, p-value and threshold (c: deploy.canary config). For the
    sequential test the p-value is the always-valid one, 1 / e-value against "no difference"."""
    if result.get("sequential"):
        return _sequential_tests(result, c)
    out = []
    for ch in result["checks"]:
        d = ch["detail"]
        p = re.search(r"(?:Fisher|Welch) p=([0-9.eE+-]+)", d)
        stat = re.search(r"ratio ([0-9.]+)", d) if ch["check"] == "p95_latency" else \
            re.search(r"delta ([+-][0-9.]+)", d) if ch["check"] == "feedback" else None
        threshold = {"error_rate": f"+{c.max_error_rate_increase} and p < {c.alpha} to fail",
                     "p95_latency": f"ratio <= {c.max_p95_latency_ratio}",
                     "feedback": f"delta >= {c.min_feedback_delta}, or p >= {c.alpha}",
                     "traffic": "> 0 each"}.get(ch["check"], "")
        out.append({"check": ch["check"], "test": CANARY_TESTS.get(ch["check"], ch["check"]),
                    "statistic": float(stat.group(1)) if stat else None,
                    "p_value": float(p.group(1)) if p else None, "threshold": threshold,
                    "passed": ch["passed"], "detail": ch["detail"]})
    return out


def _sequential_tests(result: dict[str, Any], c: Any) -> list[dict[str, Any]]:
    record = result["sequential"].get("metrics", {})
    out = []
    for ch in result["checks"]:
        m = record.get(ch["check"])
        if m is None:  # traffic, evidence: no statistic
            out.append({"check": ch["check"], "test": CANARY_TESTS.get(ch["check"], ch["check"]), "statistic": None,
                        "p_value": None, "threshold": "", "passed": ch["passed"], "detail": ch["detail"]})
            continue
        est = m.get("estimate")
        stat = math.exp(est) if est is not None and ch["check"] == "latency" else (
            -est if est is not None and ch["check"] == "feedback" else est)
        e = m.get("e_value_no_difference")
        out.append({"check": ch["check"], "test": SEQUENTIAL_TESTS.get(ch["check"], ch["check"]), "statistic": stat,
                    "p_value": min(1.0, 1.0 / e) if e else None,
                    "threshold": f"rollback at e >= {m['rollback_at']:.0f} beyond margin {m['margin']}; "
                                 f"promote at e >= {m['promote_at']:.0f} against it",
                    "passed": ch["passed"], "detail": ch["detail"]})
    return out


def canary_markdown(result: dict[str, Any], c: Any) -> str:
    tests = canary_tests(result, c)
    seq = result.get("sequential")
    how = (f"sequential, {seq.get('looks', 1)} looks, n canary {seq['requests']['canary']} / champion "
           f"{seq['requests']['champion']}, " + ("stopped early: " if seq.get("stopped_early") else "")
           + (seq.get("reason") or "")) if seq else "fixed tests at the window's end"
    lines = [f"**Canary analysis: {result['decision'].upper()}** ({c.mode}, alpha {c.alpha}; {how})", ""]
    lines += table(["check", "test", "statistic", "p-value", "threshold", "result", "figures"],
                   [[t["check"], t["test"], num(t["statistic"]), num(t["p_value"]), t["threshold"],
                     "pass" if t["passed"] else "**FAIL**", t["detail"]] for t in tests])
    return "\n".join(lines) + "\n"


def run_story(title: str, outcome: str, stages: list[dict[str, Any]], sections: list[tuple[str, str]],
              footer: list[str], limit: int = 8000) -> str:
    """The pipeline run's description: the outcome, every stage (status, wall time, outcome), then the
    sections (data gate, evaluation gate, canary, failure) and the version with its aliases. At most
    `limit` characters (MLflow keeps 8,000 of a tag): sections are shortened to fit, each stage run's
    description keeps its whole text."""
    head = [f"### {title}: {outcome}", ""]
    head += table(["stage", "status", "wall time", "outcome"],
                  [[s["stage"], s["status"], duration(s.get("wall_s")), s.get("outcome", "")] for s in stages])
    fixed = len("\n".join(head + footer)) + sum(len(h) + 10 for h, _ in sections) + 20
    too_long = fixed + sum(len(body.strip()) for _, body in sections) > limit
    budget = max(200, (limit - fixed) // max(len(sections), 1) - 60)
    lines = head + [""]
    for h, body in sections:
        body = body.strip()
        if too_long and len(body) > budget:
            body = body[:budget].rstrip() + "\n\n... (the stage run's description has all of it)"
        lines += [f"#### {h}", "", body, ""]
    lines += footer
    return ("\n".join(lines).strip() + "\n")[:limit]


def _section(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if k != "enabled")


def limitations(metrics: dict[str, Any], slices: list[str]) -> list[str]:
    out = []
    small = [f"{s} (n={metrics['candidate'][s]['n']})" for s in slices if metrics["candidate"][s]["n"] < SMALL_SLICE]
    if small:
        out.append(f"small evaluation slices, wide confidence intervals: {', '.join(small)}")
    if SAFETY_SLICE in metrics["candidate"]:
        out.append("safety is judged by a refusal-phrase heuristic on a red-team sample, not by a safety classifier")
    else:
        out.append("no red-team evaluation was configured for this version")
    for s in slices:
        c = metrics["candidate"][s]
        if "accuracy" in c and c["accuracy"] < 0.9:
            out.append(f"`{s}`: wrong on {1 - c['accuracy']:.0%} of held-out records")
    out.append("evaluated only on the slices above; behaviour on other inputs is untested")
    return out


def quality_markdown(summary: dict[str, dict[str, Any]]) -> str:
    """The card's section on quality in production: what the label-free estimate is calibrated on."""
    lines = ["## Quality in production", "",
             "`tuneloop monitor` estimates accuracy and macro-F1 of these classification slices on live traffic "
             "before labels arrive (NannyML CBPE), calibrated on this version's evaluation records below; realized "
             "figures follow as delayed labels arrive, and a human audit narrows the interval (PPI).", ""]
    keys = ("n", "accuracy", "macro_f1", "off_label_share", "ece_raw")
    rows = [[sl, *(num(s.get(k)) for k in keys)] for sl, s in sorted(summary.items())]
    lines += table(["slice", "reference records", "accuracy", "macro-F1", "off-label answers", "ECE"], rows)
    return "\n".join(lines) + "\n"
