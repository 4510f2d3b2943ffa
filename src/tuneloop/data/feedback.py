"""Feedback store rows -> training records (SFT from corrections, preference pairs from corrections
and from differently-scored answers to the same prompt), and audited requests -> evaluation records,
in ingest's raw schemas."""

from __future__ import annotations

from typing import Any

from tuneloop.config.base import AUDIT_SUFFIX


def audit_to_eval(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Audited production requests ({request_id, slice, prompt, label}) -> eval records of slice
    `<slice>-audit`: the prompt the user sent, the label the raters agreed on as the reference."""
    return [{"id": f"audit-{e['request_id']}", "prompt": e["prompt"], "response": e["label"],
             "slice": f"{e['slice']}{AUDIT_SUFFIX}"} for e in examples]


def feedback_to_training(rows: list[dict[str, Any]], stats: dict[str, int] | None = None,
                         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Feedback rows -> (sft records, preference pairs) in ingest's raw schemas.

    A trusted correction makes an SFT record and, against the model's answer, a preference pair.
    A correction whose row says `trusted: False` (sent with a key that is not trusted, or not yet
    reviewed, under `deploy.auth.trust_corrections`) makes neither: it stays in the store for
    review. Rows without the flag (records built by hand, not read from the store) count as
    trusted. Of two answers to the same prompt, the higher-scored one is `chosen`. An empty model
    answer makes no pair (there is no text to prefer against; the correction's SFT record still
    teaches the answer).

    `stats` gets: `no_pair_empty_output`; `corrections_trusted` and `corrections_untrusted` (rows
    with a non-empty correction, by flag; the untrusted ones are left out).
    """
    stats = stats if stats is not None else {}
    for k in ("no_pair_empty_output", "corrections_trusted", "corrections_untrusted"):
        stats.setdefault(k, 0)
    sft: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for r in rows:
        meta = {"slice": r["slice"] or "feedback", "model_version": r["model_version"]}
        corr = (r.get("correction") or "").strip()
        if not corr:
            continue
        if not r.get("trusted", True):
            stats["corrections_untrusted"] += 1
            continue
        stats["corrections_trusted"] += 1
        sft.append({"id": f"fb-{r['request_id']}-sft", "prompt": r["prompt"], "response": corr, **meta})
        if not r["output"].strip():
            stats["no_pair_empty_output"] += 1
        elif corr != r["output"].strip():
            pairs.append({"id": f"fb-{r['request_id']}-corr", "prompt": r["prompt"], "chosen": corr,
                          "rejected": r["output"], **meta})
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("score") is not None:
            by_prompt.setdefault(r["prompt"], []).append(r)
    for prompt, rs in by_prompt.items():
        rs = sorted(rs, key=lambda r: r["score"], reverse=True)
        best, worst = rs[0], rs[-1]
        if best["score"] <= worst["score"] or best["output"].strip() == worst["output"].strip():
            continue
        if not best["output"].strip() or not worst["output"].strip():
            stats["no_pair_empty_output"] += 1
            continue
        pairs.append({"id": f"fb-{best['request_id']}-{worst['request_id']}", "prompt": prompt,
                      "chosen": best["output"], "rejected": worst["output"],
                      "slice": best["slice"] or "feedback", "model_version": best["model_version"]})
    return sft, pairs
