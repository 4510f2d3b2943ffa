"""validate_data: a Great Expectations suite, built from the run config, that gates the run.

The suite checks the ingested dataset as a whole (record-level problems were already
quarantined by ingest): required fields, non-empty turns, allowed roles, token-length
bounds, allowed slices, classification labels, duplicates (ids and normalized content), PII
residue (Presidio run again over what ingest wrote), slice coverage of the eval set and of
the training data, and the shares of input that had to be quarantined or were duplicates.

GX validates a narrow frame derived from the JSONL files in chunks (ids, slices, lengths,
token counts, content hashes, PII findings; the long texts are not kept), so a million
records need about a hundred bytes each, not the records themselves. Output folder:
    report.json  {passed, checks: [{table, expectation, column, passed, observed, message, config_key}],
                 failed}: `message` says in plain words what failed, for which records (a few ids, or
                 file and row for quarantined ones) and what to change; `config_key` is the key that
                 changes the outcome (empty where only the data can)
    report.md    the failures in words, then every check as a table
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.config import RunConfig

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("tuneloop.validate")
FEEDBACK_SLICE = "feedback"
CHUNK = 20_000
ROLES_RE = r"^(?:system|user|assistant)(?:,(?:system|user|assistant))*$"
ANSWERS = {"sft": ("response",), "eval": ("response",), "preference": ("chosen", "rejected")}


def _chunks(path: Path) -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if len(rows) == CHUNK:
                    yield rows
                    rows = []
    if rows:
        yield rows


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _frame(path: Path, table: str, tokenizer: Any, scrubber: Any, label_slices: set[str],
           residue_sample: int = 0) -> pd.DataFrame:
    """The narrow per-record frame the expectations run on (streamed in chunks; text columns are
    categories or hashes, so a row costs ~100 bytes). PII residue is checked on every record, or
    on `residue_sample` records evenly spread (the others are null, which the check skips)."""
    import pandas as pd  # here, not at module level: FEEDBACK_SLICE's importers (stages) need no pandas

    answers = ANSWERS[table]
    parts = []
    stride = max(1, _count(path) // residue_sample) if residue_sample else 1
    seen = 0
    for rows in _chunks(path):
        df = pd.DataFrame({"id": [r.get("id") for r in rows], "slice": [r.get("slice") for r in rows]})
        df["user_text_chars"] = [len(r.get("user_text") or "") for r in rows]
        for a in answers:
            df[f"{a}_chars"] = [len(r.get(a) or "") for r in rows]
        if "response" in answers:  # labels, only where a label set is checked
            df["response"] = [r.get("response") if r.get("slice") in label_slices else None for r in rows]
            turns = [[*(r.get("turns") or [{"role": "user", "content": r.get("user_text") or ""}]),
                      {"role": "assistant", "content": r.get("response") or ""}] for r in rows]
            df["roles"] = [",".join(str(t.get("role")) for t in ts) for ts in turns]
            df["min_turn_chars"] = [min(len((t.get("content") or "").strip()) for t in ts) for ts in turns]
        df["content_key"] = [int.from_bytes(hashlib.sha1("\0".join(_norm(r.get(k) or "") for k in
                                                                   ("user_text", *answers)).encode()).digest()[:8],
                                            "big", signed=True) for r in rows]
        if scrubber is not None:
            df["pii_residue"] = pd.array([sum(len(scrubber.find(t)) for t in _texts(r, answers))
                                          if (seen + i) % stride == 0 else None for i, r in enumerate(rows)],
                                         dtype="Int64")
        seen += len(rows)
        for col in ("slice", "response", "roles"):
            if col in df:
                df[col] = df[col].astype("category")
        if tokenizer is not None:
            from tuneloop.data.formatting import count_tokens

            df["prompt_chars"] = [len(r["prompt"]) if isinstance(r.get("prompt"), str) else None for r in rows]
            for a in answers:
                col = "completion" if a == "response" else a
                full = [(r.get("prompt") or "") + (r.get(col) or "") for r in rows]
                # tokens of the whole training sequence (prompt + this answer): what max_length bounds
                df[f"{col}_seq_tokens"] = count_tokens(tokenizer, full)
        parts.append(df)
    if not parts:
        return pd.DataFrame()
    df = pd.concat(parts, ignore_index=True)
    for col in ("slice", "response", "roles"):  # categories of the chunks may differ; unify them
        if col in df:
            df[col] = df[col].astype("category")
    return df


def _texts(r: dict[str, Any], answers: tuple[str, ...]) -> list[str]:
    out = [t.get("content") or "" for t in r.get("turns") or []] or [r.get("user_text") or ""]
    return out + [r.get(a) or "" for a in answers]


def _suites(cfg: RunConfig, tokenizer: Any) -> dict[str, list[Any]]:
    import great_expectations.expectations as gxe

    slices = sorted(cfg.evaluate.slices)
    allowed = [*slices, FEEDBACK_SLICE, *cfg.evaluate.audit_slices()]
    pii = [gxe.ExpectColumnValuesToBeBetween(column="pii_residue", max_value=0)] if cfg.data.pii.enabled else []
    common = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToBeInSet(column="slice", value_set=allowed),
        gxe.ExpectColumnValuesToBeBetween(column="user_text_chars", min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="content_key"),
        *pii,
        *([gxe.ExpectColumnValuesToNotBeNull(column="prompt_chars")] if tokenizer is not None else []),
    ]
    turns = [gxe.ExpectColumnValuesToBeBetween(column="response_chars", min_value=1),
             gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLES_RE),
             gxe.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1)]
    sft = [*common, *turns]
    if tokenizer is not None:
        sft.append(gxe.ExpectColumnValuesToBeBetween(column="completion_seq_tokens", min_value=2,
                                                     max_value=cfg.train.sft.max_length))
    for name, sl in cfg.evaluate.slices.items():
        if sl.task == "classification":
            sft.append(gxe.ExpectColumnValuesToBeInSet(column="response", value_set=sl.labels,
                                                       row_condition=f'slice=="{name}"', condition_parser="pandas"))
    pref = [*common,
            gxe.ExpectColumnValuesToBeBetween(column="chosen_chars", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="rejected_chars", min_value=1)]
    if tokenizer is not None:
        pref += [gxe.ExpectColumnValuesToBeBetween(column="chosen_seq_tokens", min_value=2,
                                                   max_value=cfg.train.dpo.max_length),
                 gxe.ExpectColumnValuesToBeBetween(column="rejected_seq_tokens", min_value=2,
                                                   max_value=cfg.train.dpo.max_length)]
    evals = [*common, *turns,
             gxe.ExpectColumnDistinctValuesToContainSet(column="slice", value_set=slices)]
    suites = {"eval": evals}
    if cfg.train.sft.enabled:
        suites["sft"] = sft
    if cfg.train.dpo.enabled:
        suites["preference"] = pref
    return suites


def _observed(result: dict[str, Any]) -> str:
    if "observed_value" in result and result["observed_value"] is not None:
        return str(result["observed_value"])
    if "unexpected_count" in result:
        sample = result.get("partial_unexpected_list") or []
        return f"{result['unexpected_count']} of {result.get('element_count')} unexpected" + \
            (f", e.g. {sample[:3]}" if sample else "")
    return ""


def validate_dataset(cfg: RunConfig, dataset_dir: Path, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Run the suite over an ingest output folder; returns (and writes) the report. Without a
    tokenizer (records that were not chat-formatted) the token-length checks are left out."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    from tuneloop.data.pii import PiiScrubber

    out.mkdir(parents=True, exist_ok=True)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm bars in task logs
    batch_def = ctx.data_sources.add_pandas("tuneloop").add_dataframe_asset("records") \
        .add_batch_definition_whole_dataframe("whole")
    scrubber = PiiScrubber(cfg.data.pii) if cfg.data.pii.enabled else None
    label_slices = {n for n, sl in cfg.evaluate.slices.items() if sl.task == "classification"}
    checks: list[dict[str, Any]] = []
    sft_slices: dict[str, int] = {}
    for table, expectations in _suites(cfg, tokenizer).items():
        df = _frame(dataset_dir / f"{table}.jsonl", table, tokenizer, scrubber, label_slices,
                    cfg.data.pii.residue_sample)
        if df.empty:
            where = "data.eval" if table == "eval" else "data.sources"
            checks.append({"table": table, "expectation": "table_has_records", "column": "", "passed": False,
                           "observed": "0 records",
                           "message": f"no {WHAT[table]} were accepted: add some to {where} (quarantine.jsonl "
                                      "says why the ones read were rejected)", "config_key": where})
            continue
        if table == "sft":
            sft_slices = df["slice"].value_counts().to_dict()
        suite = gx.ExpectationSuite(name=f"tuneloop-{table}")
        for e in expectations:
            suite.add_expectation(e)
        result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format=RESULT_FORMAT)
        for r in result.results:
            kw = r.expectation_config.kwargs
            cond = kw.get("row_condition")
            column = kw.get("column") or ",".join(kw.get("column_list") or [])
            if cond:
                column += f" where {cond.get('pass_through_filter', cond) if isinstance(cond, dict) else cond}"
            message, key = _explain(cfg, table, r.expectation_config.type, kw, r.result, bool(r.success))
            checks.append({"table": table, "expectation": r.expectation_config.type, "column": column,
                           "passed": bool(r.success), "observed": _observed(r.result), "message": message,
                           "config_key": key})
        del df
    checks += _ingest_checks(cfg, json.loads((dataset_dir / "report.json").read_text()), sft_slices,
                             dataset_dir / "quarantine.jsonl")
    report = {"passed": all(c["passed"] for c in checks), "checks": checks,
              "failed": [c for c in checks if not c["passed"]]}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    log.info("validate_data: %s (%d checks, %d failed)", "PASSED" if report["passed"] else "FAILED",
             len(checks), len(report["failed"]))
    return report


def _ingest_checks(cfg: RunConfig, ing: dict[str, Any], sft_slices: dict[str, int],
                   quarantine: Path | None = None) -> list[dict[str, Any]]:
    """Checks on ingest's counts: quarantine share, duplicate share (both of the new data: replayed
    records that were dropped, e.g. as already present, do not count), training slice coverage."""
    replay = ing.get("replay") or {}
    replay_reasons = replay.get("per_reason") or {}
    read = max(ing["read"] - replay.get("read", 0), 1)
    quarantined = ing["quarantined"] - (replay.get("read", 0) - replay.get("accepted", 0))
    share = quarantined / read
    limit = cfg.data.max_quarantine_share
    reasons = {k: v - replay_reasons.get(k, 0) for k, v in ing.get("per_reason", {}).items()}
    ok = share <= limit
    message = ""
    if not ok:
        top = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]) if v > 0)
        examples = _quarantined_examples(quarantine) if quarantine else []
        message = (f"{quarantined} of the {read} records read ({share:.1%}) were quarantined, more than "
                   f"data.max_quarantine_share ({limit:.1%}): {top or 'no reason recorded'}"
                   + (f"; e.g. {'; '.join(examples)}" if examples else "")
                   + ". Fix the data or the setting its reason names, or raise data.max_quarantine_share")
    checks = [{"table": "ingest", "expectation": "quarantined_share_at_most", "column": "", "passed": ok,
               "observed": f"{share:.3f} (limit {limit})", "message": message,
               "config_key": "data.max_quarantine_share"}]
    exact, near = reasons.get("exact duplicate", 0), reasons.get("near duplicate", 0)
    dup_share, dup_limit = (exact + near) / read, cfg.data.max_duplicate_share
    checks.append({"table": "ingest", "expectation": "duplicate_share_at_most", "column": "",
                   "passed": dup_share <= dup_limit,
                   "observed": f"{dup_share:.3f} ({exact} exact, {near} near; limit {dup_limit})",
                   "message": "" if dup_share <= dup_limit else
                   f"{exact + near} of the {read} records read ({dup_share:.1%}) were duplicates ({exact} exact, "
                   f"{near} near), more than data.max_duplicate_share ({dup_limit:.1%}): a sign of a broken export "
                   "upstream (quarantine.jsonl names each one's original); raise data.max_duplicate_share, or "
                   "data.dedup.near_threshold if near duplicates are distinct records",
                   "config_key": "data.max_duplicate_share"})
    if cfg.train.sft.enabled:
        counts = {s: sft_slices.get(s, 0) for s in sorted(cfg.evaluate.slices)}
        low = [s for s, n in counts.items() if n < cfg.data.min_slice_records]
        checks.append({"table": "sft", "expectation": "slice_records_at_least", "column": "slice",
                       "passed": not low, "observed": ", ".join(f"{s} {n}" for s, n in counts.items())
                       + f" (min {cfg.data.min_slice_records})" + (f"; too few: {', '.join(low)}" if low else ""),
                       "message": "" if not low else
                       f"evaluated slices with fewer training records than data.min_slice_records "
                       f"({cfg.data.min_slice_records}): {', '.join(f'{s} ({counts[s]})' for s in low)}; add records "
                       "for them to data.sources or lower data.min_slice_records",
                       "config_key": "data.min_slice_records"})
    return checks


def _quarantined_examples(path: Path, n: int = 3) -> list[str]:
    """A few quarantined records of the new data, as `file row N (id x): reason`."""
    out: list[str] = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            if str(q.get("source", "")).startswith("replay:"):
                continue
            rec = q.get("record")
            rid = rec.get("id") if isinstance(rec, dict) else None
            name = Path(str(q.get("source", "")).split("://", 1)[-1]).name
            out.append(f"{name} row {q.get('row')}" + (f" (id {rid})" if rid is not None else "")
                       + f": {q.get('reason')}")
            if len(out) == n:
                break
    return out


WHAT = {"sft": "training records", "preference": "preference pairs", "eval": "eval records"}
RESULT_FORMAT = {"result_format": "SUMMARY", "unexpected_index_column_names": ["id"], "partial_unexpected_count": 5}


def _examples(result: dict[str, Any], column: str, unit: str = "") -> str:
    """`r12 (284 tokens), r40 (288 tokens)`: ids of a few records that failed, with their value."""
    rows = result.get("partial_unexpected_index_list") or []
    parts = []
    for row in rows[:5]:
        if not isinstance(row, dict):
            continue
        value = row.get(column) if column in _SHOWN or column.endswith("_seq_tokens") else None
        parts.append(f"{row.get('id')}" + (f" ({value}{unit})" if value is not None else ""))
    return ", ".join(parts)


_SHOWN = {"slice", "response", "roles", "pii_residue"}  # columns whose value helps (not hashes, not lengths)


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _explain(cfg: RunConfig, table: str, expectation: str, kw: dict[str, Any], result: dict[str, Any],
             passed: bool) -> tuple[str, str]:
    """(what failed in plain words, for which records and what to change; the config key that changes it)."""
    column = kw.get("column") or ""
    what = WHAT[table]
    stage = "dpo" if table == "preference" else "sft"
    max_key = f"train.{stage}.max_length"
    cond = kw.get("row_condition")
    label_slice = str(cond).split('"')[1] if cond and '"' in str(cond) else None
    keys = {"completion_seq_tokens": max_key, "chosen_seq_tokens": max_key, "rejected_seq_tokens": max_key,
            "pii_residue": "data.pii.entities", "slice": "evaluate.slices", "prompt_chars": "base_model.path"}
    key = keys.get(column, "data.eval" if table == "eval" else "data.sources")
    if column == "response" and label_slice:
        key = f"evaluate.slices.{label_slice}.labels"
    if expectation == "expect_column_distinct_values_to_contain_set":
        key = "data.eval"
    if passed:
        return "", key
    n, total = result.get("unexpected_count"), result.get("element_count")
    some = f"{n} of {total} {what}" if n is not None else what
    eg = _examples(result, column, " tokens" if column.endswith("_seq_tokens") else
                   " PII findings" if column == "pii_residue" else "")
    eg = f" (e.g. {eg})" if eg else ""
    if column.endswith("_seq_tokens"):
        limit = _num(kw.get("max_value"))
        values = [v for v in result.get("partial_unexpected_list") or [] if isinstance(v, (int, float))]
        if any(v > limit for v in values):
            return (f"{some} are longer than {max_key} ({limit} tokens, prompt + answer){eg}: raise {max_key}, or "
                    f"ingest with the same tokenizer and data.long_records (quarantine or truncate_prompt) so "
                    "they are handled before this gate", key)
        return f"{some} have fewer than 2 tokens of prompt + answer{eg}: fix them in the source data", key
    if column == "pii_residue":
        return (f"{some} still contain PII after scrubbing{eg}: add the entity types to "
                "data.pii.entities (or lower data.pii.score_threshold) and ingest again", key)
    if column == "id":
        return f"{some} share their id with another record{eg}: give every record its own id", key
    if column == "content_key":
        return f"{some} repeat the content of another record{eg}: remove the duplicates from the data", key
    if column == "slice" and expectation == "expect_column_values_to_be_in_set":
        return (f"{some} carry a slice that is not evaluated{eg}: add the slice to evaluate.slices, or set the "
                "records' slice (or the source's data.sources[].slice) to an evaluated one", key)
    if expectation == "expect_column_distinct_values_to_contain_set":
        seen = set(result.get("observed_value") or [])
        missing = sorted(set(kw.get("value_set") or []) - seen)
        return (f"the eval set has no records for slice(s) {', '.join(missing)}: add them to data.eval, or remove "
                "the slice from evaluate.slices", key)
    if column == "response" and label_slice:
        return (f"{some} of slice {label_slice} have a label outside evaluate.slices.{label_slice}.labels{eg}: "
                "add the label there, or fix the records", key)
    if column == "prompt_chars":
        return (f"{some} were not rendered with the chat template{eg}: ingest them with the base model's "
                "tokenizer (base_model.path)", key)
    if column == "roles":
        return f"{some} have turns whose role is not system, user or assistant{eg}: fix them in the data", key
    if column.endswith("_chars"):
        part = {"user_text_chars": "prompt", "min_turn_chars": "turn"}.get(column, column[:-6])
        return f"{some} have an empty {part}{eg}: fix them in the data", key
    if expectation == "expect_table_row_count_to_be_between":
        return (f"no {what} were accepted: add some to {key} (quarantine.jsonl says why the ones read were "
                "rejected)", key)
    return f"{expectation} on {table}.{column} failed: {_observed(result)}", key


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data validation: {'PASSED' if report['passed'] else 'FAILED'}", ""]
    failed = [c for c in report["checks"] if not c["passed"]]
    if failed:
        lines += ["## What failed", ""]
        lines += [f"- **{c['table']}**: {c.get('message') or c['expectation']}"
                  + (f" (config: `{c['config_key']}`)" if c.get("config_key") else "") for c in failed]
        lines.append("")
    lines += ["| table | expectation | column | result | observed |", "|---|---|---|---|---|"]
    for c in sorted(report["checks"], key=lambda c: c["passed"]):
        lines.append(f"| {c['table']} | {c['expectation']} | {c['column']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} | {c['observed']} |")
    return "\n".join(lines) + "\n"
