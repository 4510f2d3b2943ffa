"""A model card (Markdown) per registered version, from the artifacts of the run that made it.

Sections: intended use, data (with lineage), training configuration, per-slice results against
the champion, safety, the gate decision, and known limitations derived from the figures
(small slices, heuristic safety detector, what the gate did not cover).
"""

from __future__ import annotations

from typing import Any

from tuneloop.config import PREFERENCE_SLICE, SAFETY_SLICE, RunConfig
from tuneloop.evaluate.gates import gate_table
from tuneloop.evaluate.run import slice_rows

SMALL_SLICE = 30


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
        f"- data hash `{tags.get('tuneloop.data_hash', '?')}`, pipeline run `{tags.get('tuneloop.pipeline_run_id', '?')}`, "
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
        f"## Results against the {ref}", "",
        "| slice | n | metric | this version | " + ref + " | base model |", "|---|---|---|---|---|---|"]
    for sl in slices:
        n = metrics["candidate"][sl]["n"]
        lines += [f"| {sl} | {n} | {k} | {c:.4f} | {r:.4f} | {b:.4f} |" for k, c, r, b in slice_rows(metrics, sl)]
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
    lines += ["## Gate", gate_table(gate), "## Known limitations"]
    lines += [f"- {x}" for x in limitations(metrics, slices)]
    return "\n".join(lines) + "\n"


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
