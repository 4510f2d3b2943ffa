"""validate_data: a Great Expectations suite, built from the run config, that gates the run.

The suite checks the ingested dataset as a whole (record-level problems were already
quarantined by ingest): required fields, non-empty turns, token-length bounds, allowed slices,
classification labels, duplicates, slice coverage of the eval set, and the share of input
that had to be quarantined. Output folder:
    report.json  {passed, checks: [{table, expectation, column, passed, observed, details}]}
    report.md    the same as a table a person reads first
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.config import RunConfig

log = logging.getLogger("tuneloop.validate")
FEEDBACK_SLICE = "feedback"


def _frame(path: Path, tokenizer: Any, text_cols: tuple[str, ...]) -> pd.DataFrame:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in text_cols[1:]:
        full = [p + c for p, c in zip(df[text_cols[0]], df[col], strict=True)]
        # tokens of the whole training sequence (prompt + this answer): what max_length bounds
        df[f"{col}_seq_tokens"] = [len(ids) for ids in tokenizer(full, add_special_tokens=False)["input_ids"]]
    return df


def _suites(cfg: RunConfig) -> dict[str, list[Any]]:
    import great_expectations.expectations as gxe

    slices = sorted(cfg.evaluate.slices)
    allowed = [*slices, FEEDBACK_SLICE]
    common = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt"),
        gxe.ExpectColumnValuesToBeInSet(column="slice", value_set=allowed),
        gxe.ExpectColumnValueLengthsToBeBetween(column="user_text", min_value=1),
    ]
    sft = [*common,
           gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1),
           gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_text", "response"]),
           gxe.ExpectColumnValuesToBeBetween(column="completion_seq_tokens", min_value=2,
                                             max_value=cfg.train.sft.max_length)]
    for name, sl in cfg.evaluate.slices.items():
        if sl.task == "classification":
            sft.append(gxe.ExpectColumnValuesToBeInSet(column="response", value_set=sl.labels,
                                                       row_condition=f'slice=="{name}"', condition_parser="pandas"))
    pref = [*common,
            gxe.ExpectColumnValuesToBeBetween(column="chosen_seq_tokens", min_value=2, max_value=cfg.train.dpo.max_length),
            gxe.ExpectColumnValuesToBeBetween(column="rejected_seq_tokens", min_value=2,
                                              max_value=cfg.train.dpo.max_length)]
    evals = [*common,
             gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1),
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
    """Run the suite over an ingest output folder; returns (and writes) the report."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    out.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="ephemeral")
    batch_def = ctx.data_sources.add_pandas("tuneloop").add_dataframe_asset("records") \
        .add_batch_definition_whole_dataframe("whole")
    cols = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
            "eval": ("prompt", "completion")}
    checks: list[dict[str, Any]] = []
    for table, expectations in _suites(cfg).items():
        df = _frame(dataset_dir / f"{table}.jsonl", tokenizer, cols[table])
        if df.empty:
            checks.append({"table": table, "expectation": "table_has_records", "column": "", "passed": False,
                           "observed": "0 records"})
            continue
        suite = gx.ExpectationSuite(name=f"tuneloop-{table}")
        for e in expectations:
            suite.add_expectation(e)
        result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite)
        for r in result.results:
            kw = r.expectation_config.kwargs
            cond = kw.get("row_condition")
            column = kw.get("column") or ",".join(kw.get("column_list") or [])
            if cond:
                column += f" where {cond.get('pass_through_filter', cond) if isinstance(cond, dict) else cond}"
            checks.append({"table": table, "expectation": r.expectation_config.type, "column": column,
                           "passed": bool(r.success), "observed": _observed(r.result)})
    ingest_report = json.loads((dataset_dir / "report.json").read_text())
    share = ingest_report["quarantined"] / max(ingest_report["read"], 1)
    checks.append({"table": "ingest", "expectation": "quarantined_share_at_most", "column": "",
                   "passed": share <= cfg.data.max_quarantine_share,
                   "observed": f"{share:.3f} (limit {cfg.data.max_quarantine_share})"})
    report = {"passed": all(c["passed"] for c in checks), "checks": checks,
              "failed": [c for c in checks if not c["passed"]]}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    log.info("validate_data: %s (%d checks, %d failed)", "PASSED" if report["passed"] else "FAILED",
             len(checks), len(report["failed"]))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data validation: {'PASSED' if report['passed'] else 'FAILED'}", "",
             "| table | expectation | column | result | observed |", "|---|---|---|---|---|"]
    for c in sorted(report["checks"], key=lambda c: c["passed"]):
        lines.append(f"| {c['table']} | {c['expectation']} | {c['column']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} | {c['observed']} |")
    return "\n".join(lines) + "\n"
