"""Stages 1-3: prerequisites (and the pipeline run), ingest, the data gate."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.registry import NOTE, TAG_BASE_MODEL, TAG_DATA_HASH, Registry
from tuneloop.stages.common import PrerequisiteError, base_model_dir, flatten, record_verdict, timed_stage
from tuneloop.stages.story import close_abandoned_runs, tell_story
from tuneloop.tracing import stage_span


# 1 -------------------------------------------------------------------------------------------
def check_prerequisites(cfg: RunConfig, run_name: str, kfp_run_id: str) -> dict[str, Any]:
    """Fail in seconds, with every problem listed, before any compute; open the parent run."""
    from tuneloop.data.preflight import preflight

    started = time.perf_counter()
    problems = preflight(cfg)  # what `tuneloop validate` checks: paths hold data files, URIs answer (s3:// too)
    if cfg.deploy.backend == "local":
        from tuneloop.deploy.canary import gateway_alive

        if not gateway_alive(cfg.deploy.gateway_url):
            problems.append(f"deploy.gateway_url: no gateway answers at {cfg.deploy.gateway_url} "
                            "(start one with `tuneloop serve CONFIG`)")
    # looked up, not imported: importing them (torch, transformers) would cost this task ~6 s
    missing = [name for name in ("deepspeed", "peft", "trl") if importlib.util.find_spec(name) is None]
    if missing:
        problems.append(f"training libraries missing ({', '.join(missing)}); install tuneloop[train]")
    if problems:
        raise PrerequisiteError("prerequisites not met:\n  - " + "\n  - ".join(problems))
    base = base_model_dir(cfg)
    if cfg.train.backend == "local":  # a cluster job's pods have their own memory; the launcher reports OOMKilled
        from tuneloop.train.memory import check_local_fit

        stages = [s for s, section in (("sft", cfg.train.sft), ("dpo", cfg.train.dpo)) if section.enabled]
        too_big = check_local_fit(cfg.train, base, stages)
        if too_big:
            raise PrerequisiteError("prerequisites not met:\n  - " + "\n  - ".join(too_big))
    reg = Registry(cfg)
    closed = close_abandoned_runs(cfg, reg, kfp_run_id, run_name)
    params = flatten(cfg.model_dump(mode="json"))
    parent = reg.start_pipeline_run(run_name, kfp_run_id, params)
    reg.set_tag(parent, TAG_BASE_MODEL, cfg.base_model.name)
    outcome = "ok" + (f"; closed {len(closed)} runs an earlier process left open" if closed else "")
    with reg.stage_run(parent, "check_prerequisites") as run_id, stage_span("check_prerequisites", run_id, parent):
        reg.log_metrics(run_id, {"stage_wall_s": time.perf_counter() - started, "abandoned_runs_closed": len(closed)})
        reg.set_tag(run_id, "tuneloop.outcome", outcome)
        reg.set_tag(run_id, NOTE, f"**ok**: {len(cfg.data.sources) + len(cfg.data.eval)} data sources readable, base "
                                  f"model `{cfg.base_model.name}` at `{base}`, training libraries importable."
                    + "".join(f"\n- closed run `{c}` that an earlier process left open" for c in closed))
    tell_story(reg, parent)
    return {"parent_run_id": parent, "base_model_dir": str(base), "outcome": outcome, "closed": closed}


# 2 -------------------------------------------------------------------------------------------
def ingest_stage(cfg: RunConfig, parent_id: str, out: Path, name: str | None = None) -> dict[str, Any]:
    """`name`: the stage run's name when it is not the pipeline's own ingest (a repair attempt's)."""
    from transformers import AutoConfig, AutoTokenizer

    from tuneloop.data.formatting import ChatFormatter, check_tokenizer
    from tuneloop.data.ingest import ingest
    from tuneloop.data.replay import champion_training_data
    from tuneloop.feedback.store import FeedbackStore

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        base = base_model_dir(cfg)
        tok = AutoTokenizer.from_pretrained(str(base))
        check_tokenizer(tok, AutoConfig.from_pretrained(str(base)), f"base_model {base}")
        store = FeedbackStore(cfg.feedback_db)
        rows = store.rows() if cfg.data.use_feedback else []
        audit, audit_stats = _audit_examples(cfg, store)
        champion = champion_training_data(reg, cfg.state_path / "champion-data") if cfg.data.replay_share > 0 \
            else None
        report = ingest(cfg.data, ChatFormatter(tok, cfg.data.system_prompt), out, rows, champion, train=cfg.train,
                        audit=audit, audit_stats=audit_stats)
        log_data_lineage(reg, run_id, parent_id, report)
        for kind, ctx in (("sft", "training"), ("preference", "training"), ("eval", "evaluation")):
            reg.log_dataset(run_id, out / f"{kind}.jsonl", f"{cfg.name}-{kind}", report["file_sha256"][kind], ctx)
        reg.log_artifacts(run_id, out, "dataset")
        return {**report, "outcome": f"{report['accepted']} accepted, {report['quarantined']} quarantined",
                "description": _ingest_note(report)}

    return timed_stage(reg, parent_id, name or "ingest", run)


def _audit_examples(cfg: RunConfig, store: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The human-rated audit sample of the classification slices (evaluate.audit), from the feedback store."""
    from tuneloop.monitor.labels import QualityStore, audit_examples

    slices = sorted(set(cfg.evaluate.audit_slices().values()))
    if not slices:
        return [], {"note": "evaluate.audit is off or no slice is a classification slice"}
    QualityStore(store.engine)  # the tables exist before they are read
    store.flush()
    return audit_examples(store.engine, slices, cfg.evaluate.audit.max_records)


def _ingest_note(r: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {c.get('accepted', 0)}" for k, c in r["by_kind"].items())
    reasons = ", ".join(f"{k} {v}" for k, v in r.get("per_reason", {}).items())
    fb, rp, pii = r.get("feedback", {}), r.get("replay", {}), r.get("pii", {})
    lines = [f"**{r['accepted']} accepted, {r['quarantined']} quarantined** of {r['read']} records read "
             f"(data hash `{r['data_hash'][:12]}`)", "", f"- accepted per kind: {kinds}",
             f"- quarantined: {reasons or 'none'} (`dataset/quarantine.jsonl` says why, per record)",
             f"- from users' feedback: {fb.get('sft', 0)} SFT records, {fb.get('preference', 0)} preference pairs",
             f"- audited production requests in the eval set: {r.get('audit', {}).get('accepted', 0)}"
             + (f" ({r['audit']['tied']} left out: raters tied)" if r.get("audit", {}).get("tied") else ""),
             f"- replayed from the champion's data: {rp.get('accepted', 0)}"
             + (f" (champion v{rp['champion_version']})" if rp.get("champion_version") else ""),
             f"- PII replaced: {sum(pii.get('entities', {}).values())}"]
    return "\n".join(lines) + "\n"


def _metric_key(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", s)[:200]


def log_data_lineage(reg: Registry, run_id: str, parent_id: str, report: dict[str, Any]) -> None:
    """Ingest's counts as MLflow metrics/params/tags: rows per kind, slice and source, quarantine
    reasons, PII per entity type, dedup, replay; the content hash as a tag on the stage and parent run."""
    reg.log_metrics(run_id, {"read": report["read"], "accepted": report["accepted"],
                             "quarantined": report["quarantined"],
                             "feedback_preference_pairs": report["feedback"]["preference"],
                             "feedback_sft_records": report["feedback"]["sft"],
                             "audit_eval_records": report.get("audit", {}).get("accepted", 0)})
    for kind, c in report["by_kind"].items():
        reg.log_metrics(run_id, {f"{kind}.{k}": v for k, v in c.items() if isinstance(v, int)})
        reg.log_metrics(run_id, {_metric_key(f"{kind}.slice.{s}"): n for s, n in c["per_slice"].items()})
        reg.log_metrics(run_id, {_metric_key(f"{kind}.source.{s}"): n for s, n in c["per_source"].items()})
    reg.log_metrics(run_id, {_metric_key(f"quarantine.{r}"): n for r, n in report["per_reason"].items()})
    pii = report.get("pii", {})
    reg.log_metrics(run_id, {_metric_key(f"pii.{e}"): n for e, n in pii.get("entities", {}).items()})
    reg.log_metrics(run_id, {f"pii.{k}": pii[k] for k in ("texts_seen", "texts_analyzed", "texts_changed")
                             if k in pii})
    dd = report.get("dedup", {})
    reg.log_metrics(run_id, {f"dedup.{k}": v for k, v in dd.items() if isinstance(v, (int, float))})
    rp = report.get("replay", {})
    reg.log_metrics(run_id, {f"replay.{k}": v for k, v in rp.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
    reg.log_params(run_id, {"replay.champion_version": rp.get("champion_version") or "none",
                            "replay.note": rp.get("note", ""), "pii.nlp_model": pii.get("nlp_model", "")})
    nz, lr = report.get("normalize", {}), report.get("long_records", {})
    reg.log_metrics(run_id, {f"normalize.{k}": v for k, v in nz.get("texts_changed", {}).items()})
    reg.log_metrics(run_id, {_metric_key(f"normalize.{s}.{k}"): v for s, c in nz.get("per_source", {}).items()
                             for k, v in c.items() if isinstance(v, (int, float))})
    reg.log_metrics(run_id, {f"long_records.{k}": lr[k] for k in ("truncated", "quarantined") if k in lr})
    reg.log_params(run_id, {"long_records.policy": lr.get("policy", ""),
                            "encodings": json.dumps(report.get("encodings", {}))[:6000]})
    for k, v in report["file_sha256"].items():
        reg.set_tag(run_id, f"tuneloop.sha256.{k}", v)
    reg.set_tag(run_id, TAG_DATA_HASH, report["data_hash"])
    reg.set_tag(parent_id, TAG_DATA_HASH, report["data_hash"])


# 3 -------------------------------------------------------------------------------------------
def validate_stage(cfg: RunConfig, parent_id: str, dataset: Path, out: Path) -> dict[str, Any]:
    """The GX data gate, then the drift report against the champion's training data (out/drift/)."""
    from transformers import AutoTokenizer

    from tuneloop.data.drift import drift_report
    from tuneloop.data.replay import champion_training_data
    from tuneloop.data.validate import validate_dataset
    from tuneloop.evaluate.model_card import validation_markdown

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        tok = AutoTokenizer.from_pretrained(str(base_model_dir(cfg)))
        report = validate_dataset(cfg, dataset, tok, out)
        reg.log_metrics(run_id, {"checks": len(report["checks"]), "failed_checks": len(report["failed"]),
                                 "passed": float(report["passed"])})
        champion = champion_training_data(reg, cfg.state_path / "champion-data") if cfg.data.drift.enabled \
            else None
        drift = drift_report(dataset / "sft.jsonl", champion.sft if champion else None, out / "drift",
                             cfg.data.drift, f"champion v{champion.version} training data" if champion else "")
        reg.log_metrics(run_id, {f"drift.{k}": v for k, v in drift.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
        reg.set_tag(run_id, "tuneloop.drift_reference", drift.get("reference") or "none")
        reg.log_artifacts(run_id, out, "validation")
        record_verdict(reg, [run_id, parent_id], {"tuneloop.data_gate": "passed" if report["passed"] else "blocked"},
                 {"data_gate_passed": float(report["passed"])})
        return {"passed": report["passed"], "failed": report["failed"], "drift": drift,
                "drift_html": str(out / "drift" / "drift.html"), "description": validation_markdown(report, drift),
                "outcome": "passed" if report["passed"] else f"FAILED ({len(report['failed'])} checks)"}

    return timed_stage(reg, parent_id, "validate_data", run)
