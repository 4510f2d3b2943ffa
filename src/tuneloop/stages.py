"""The pipeline's stages as plain functions: one per KFP component, callable without KFP.

Each takes the validated config, the MLflow parent run id and local folders (KFP artifact
paths, or any folder from Python, the CLI or a test), runs inside its own nested MLflow run,
and returns a small dict. Big inputs travel by path: the base model is materialised once in
the state directory and read from there.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.data.validate import FEEDBACK_SLICE  # a constant; the module imports pandas, GX lazily
from tuneloop.registry import (TAG_BASE_MODEL, TAG_BASE_PATH, TAG_DATA_HASH, TAG_GIT_SHA, TAG_PIPELINE_RUN,
                               TAG_TRAINED_SLICES, Registry, git_sha)

log = logging.getLogger("tuneloop.stages")

# Each pipeline task is a fresh interpreter that exits right after its stage, and its last cyclic garbage
# collection walks every object of the ~3,000 modules it loaded (1-2 s here). Frozen at exit, they are
# skipped by that walk; reference counting still releases them as the modules are torn down.
atexit.register(gc.freeze)


class PrerequisiteError(RuntimeError):
    pass


def _timed(reg: Registry, parent_id: str, stage: str, fn: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    with reg.stage_run(parent_id, stage) as run_id:
        result = fn(run_id)
        wall = time.perf_counter() - started
        reg.log_metrics(run_id, {"stage_wall_s": wall})
        reg.set_tag(run_id, "tuneloop.outcome", str(result.get("outcome", "done")))
    result["wall_s"] = wall
    log.info("%s: %s (%.1fs)", stage, result.get("outcome", "done"), wall)
    return result


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def base_model_dir(cfg: RunConfig) -> Path:
    from tuneloop.models import materialize_base_model

    return materialize_base_model(cfg.base_model, cfg.state_path)


# 1 -------------------------------------------------------------------------------------------
def check_prerequisites(cfg: RunConfig, run_name: str, kfp_run_id: str) -> dict[str, Any]:
    """Fail in seconds, with every problem listed, before any compute; open the parent run."""
    from tuneloop.data.readers import SourceError, expand

    started = time.perf_counter()
    problems = []
    for src in [*cfg.data.sources, *cfg.data.eval]:
        try:
            expand(src.path, src.format, src.storage_options)  # s3:// too: listed through fsspec
        except SourceError as e:
            problems.append(str(e))
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
    params = _flatten(cfg.model_dump(mode="json"))
    parent = reg.start_pipeline_run(run_name, kfp_run_id, params)
    reg.set_tag(parent, TAG_BASE_MODEL, cfg.base_model.name)
    with reg.stage_run(parent, "check_prerequisites") as run_id:
        reg.log_metrics(run_id, {"stage_wall_s": time.perf_counter() - started})
        reg.set_tag(run_id, "tuneloop.outcome", "ok")
    return {"parent_run_id": parent, "base_model_dir": str(base), "outcome": "ok"}


# 2 -------------------------------------------------------------------------------------------
def ingest_stage(cfg: RunConfig, parent_id: str, out: Path) -> dict[str, Any]:
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
        rows = FeedbackStore(cfg.feedback_db).rows() if cfg.data.use_feedback else []
        champion = champion_training_data(reg, cfg.state_path / "champion-data") if cfg.data.replay_share > 0 \
            else None
        report = ingest(cfg.data, ChatFormatter(tok, cfg.data.system_prompt), out, rows, champion, train=cfg.train)
        log_data_lineage(reg, run_id, parent_id, report)
        for kind, ctx in (("sft", "training"), ("preference", "training"), ("eval", "evaluation")):
            reg.log_dataset(run_id, out / f"{kind}.jsonl", f"{cfg.name}-{kind}", report["file_sha256"][kind], ctx)
        reg.log_artifacts(run_id, out, "dataset")
        return {**report, "outcome": f"{report['accepted']} accepted, {report['quarantined']} quarantined"}

    return _timed(reg, parent_id, "ingest", run)


def _metric_key(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", s)[:200]


def log_data_lineage(reg: Registry, run_id: str, parent_id: str, report: dict[str, Any]) -> None:
    """Ingest's counts as MLflow metrics/params/tags: rows per kind, slice and source, quarantine
    reasons, PII per entity type, dedup, replay; the content hash as a tag on the stage and parent run."""
    reg.log_metrics(run_id, {"read": report["read"], "accepted": report["accepted"],
                             "quarantined": report["quarantined"],
                             "feedback_preference_pairs": report["feedback"]["preference"],
                             "feedback_sft_records": report["feedback"]["sft"]})
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
        return {"passed": report["passed"], "failed": report["failed"], "drift": drift,
                "drift_html": str(out / "drift" / "drift.html"),
                "outcome": "passed" if report["passed"] else f"FAILED ({len(report['failed'])} checks)"}

    return _timed(reg, parent_id, "validate_data", run)


# 4, 5 ----------------------------------------------------------------------------------------
def _train(cfg: RunConfig, parent_id: str, stage: str, data: Path, out: Path,
           init_adapter: Path | None) -> dict[str, Any]:
    from tuneloop.train.launch import build_spec, launch

    reg = Registry(cfg)
    section = cfg.train.sft if stage == "sft" else cfg.train.dpo

    def run(run_id: str) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        if not section.enabled or not data.read_text().strip():
            reason = "disabled" if not section.enabled else "no training records"
            if init_adapter is None:
                raise RuntimeError(f"{stage}: {reason} and there is no adapter to pass on")
            shutil.copytree(init_adapter, out / "adapter", dirs_exist_ok=True)
            return {"outcome": f"skipped ({reason}); adapter passed through", "skipped": True}
        reg.log_params(run_id, {f"{stage}.{k}": v for k, v in section.model_dump().items()})
        reg.log_params(run_id, {"deepspeed": cfg.train.deepspeed, "nproc_per_node": cfg.train.nproc_per_node,
                                "backend": cfg.train.backend, "num_nodes": cfg.train.num_nodes,
                                "method": cfg.train.method,
                                **{f"lora.{k}": v for k, v in cfg.train.lora.model_dump().items()}})
        spec = build_spec(cfg, stage, base_model_dir(cfg), data, out, init_adapter,
                          {"tracking_uri": reg.uri, "run_id": run_id}, pipeline_run=parent_id)
        result = launch(cfg, spec, parent_id)  # a rerun of this pipeline run resumes from its checkpoints
        reg.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool)})
        return {**result, "adapter": str(out / "adapter"),
                "outcome": f"{result['steps']} steps, loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}, "
                           f"{result['tokens_per_s']:.0f} tokens/s"}

    return _timed(reg, parent_id, stage, run)


def sft_stage(cfg: RunConfig, parent_id: str, dataset: Path, out: Path) -> dict[str, Any]:
    return _train(cfg, parent_id, "sft", dataset / "sft.jsonl", out, None)


def dpo_stage(cfg: RunConfig, parent_id: str, dataset: Path, sft_out: Path, out: Path) -> dict[str, Any]:
    return _train(cfg, parent_id, "dpo", dataset / "preference.jsonl", out, sft_out / "adapter")


# 6 -------------------------------------------------------------------------------------------
def evaluate_stage(cfg: RunConfig, parent_id: str, dataset: Path, candidate: Path, out: Path) -> dict[str, Any]:
    from tuneloop.evaluate.run import evaluate_models

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        champ = reg.alias_version("champion")
        champ_adapter = reg.download_adapter(champ, cfg.state_path / "serving") if champ else None
        ref_name = f"champion v{champ.version}" if champ else "base model"
        trained = [s for s in champ.tags.get(TAG_TRAINED_SLICES, "").split(",") if s] if champ else []
        result = evaluate_models(cfg.evaluate, base_model_dir(cfg), dataset / "eval.jsonl", candidate / "adapter",
                                 champ_adapter, ref_name, out, cfg.data.system_prompt,
                                 dataset / "eval_preference.jsonl", trained)
        for who in ("candidate", "champion", "base"):
            for sl, m in result["metrics"].get(who, {}).items():
                reg.log_metrics(run_id, {f"{who}.{sl}.{k}": v for k, v in m.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        reg.log_artifacts(run_id, out, "evaluation")
        g = result["gate"]
        confusion = [m["confusion"] for sl, m in sorted(result["metrics"]["candidate"].items())
                     if "confusion" in m and sl != "all"]
        gated = {(r["slice"], r["metric"]) for r in g["rules"]}
        headline = {who: {f"{sl}.{m}": float(v) for sl, ms in result["metrics"][who].items()
                          for m, v in ms.items() if (sl, m) in gated and isinstance(v, (int, float))}
                    for who in ("candidate", "champion")}
        return {"passed": g["passed"], "gate": g, "confusion": confusion, "metrics": result["metrics"],
                "headline": headline,
                "outcome": "gate PASSED" if g["passed"] else
                f"gate FAILED: {', '.join(r['slice'] + '/' + r['metric'] for r in g['rules'] if not r['passed'])}"}

    return _timed(reg, parent_id, "evaluate", run)


# 7 -------------------------------------------------------------------------------------------
def register_stage(cfg: RunConfig, parent_id: str, candidate: Path, evaluation: Path,
                   dataset: Path) -> dict[str, Any]:
    from tuneloop.evaluate.model_card import model_card

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        gate = json.loads((evaluation / "gate.json").read_text())
        if not gate["passed"]:
            raise RuntimeError("register: the evaluation gate did not pass; refusing to register")
        report = json.loads((dataset / "report.json").read_text())
        data_hash = report["data_hash"]
        # skills this version learned (the catch-all feedback slice has no eval set of its own)
        trained = sorted((set(report["by_kind"]["sft"]["per_slice"]) | set(report["by_kind"]["preference"]["per_slice"]))
                         - {FEEDBACK_SLICE})
        tags = {TAG_PIPELINE_RUN: parent_id, TAG_DATA_HASH: data_hash, TAG_GIT_SHA: git_sha(),
                TAG_TRAINED_SLICES: ",".join(trained),
                TAG_BASE_MODEL: cfg.base_model.name, TAG_BASE_PATH: str(base_model_dir(cfg)),
                "tuneloop.loop": cfg.name}
        tags["tuneloop.config_sha256"] = hashlib.sha256(
            json.dumps(cfg.to_pipeline_param(), sort_keys=True).encode()).hexdigest()
        mv = reg.register(run_id, candidate / "adapter", tags)
        version = str(mv.version)
        reg.log_artifacts(run_id, evaluation, "evaluation")
        card = model_card(cfg, version, tags, report, json.loads((evaluation / "metrics.json").read_text()), gate)
        card_dir = Path(tempfile.mkdtemp())
        (card_dir / "model_card.md").write_text(card)
        (card_dir / "run_config.json").write_text(json.dumps(cfg.to_pipeline_param(), indent=2))
        reg.log_artifacts(run_id, card_dir, "model_card")
        reg.set_version_description(version, card)
        reg.set_tag(parent_id, "tuneloop.model_version", version)
        return {"version": version, "model_card": card,
                "outcome": f"{cfg.registry.model_name} v{version} @challenger"}

    return _timed(reg, parent_id, "register", run)


# 8, 9, 10 ------------------------------------------------------------------------------------
def deploy_canary_stage(cfg: RunConfig, parent_id: str, version: str) -> dict[str, Any]:
    from tuneloop.deploy.canary import deploy_canary

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        r = deploy_canary(cfg, version)
        reg.log_params(run_id, {"version": version, "traffic_percent": r["traffic_percent"]})
        return {**r, "outcome": f"v{version} @canary, {r['traffic_percent']}% of users"}

    return _timed(reg, parent_id, "deploy_canary", run)


def analyze_canary_stage(cfg: RunConfig, parent_id: str, version: str, deployed_at: float,
                         out: Path) -> dict[str, Any]:
    from tuneloop.deploy.canary import analyze_canary

    reg = Registry(cfg)

    def run(run_id: str) -> dict[str, Any]:
        r = analyze_canary(cfg, deployed_at)
        out.mkdir(parents=True, exist_ok=True)
        (out / "canary.json").write_text(json.dumps(r, indent=2))
        for side, f in r["figures"].items():
            reg.log_metrics(run_id, {f"{side}.{k}": v for k, v in f.items() if isinstance(v, (int, float))})
        reg.log_artifacts(run_id, out, "canary")
        return {**r, "markdown": canary_markdown(r), "outcome": r["decision"]}

    return _timed(reg, parent_id, "analyze_canary", run)


def canary_markdown(r: dict[str, Any]) -> str:
    lines = [f"# Canary analysis: {r['decision'].upper()}", "", "| check | result | figures |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['passed'] else '**FAIL**'} | {c['detail']} |" for c in r["checks"]]
    return "\n".join(lines) + "\n"


def _end_rollout(cfg: RunConfig, parent_id: str, version: str, action: str) -> dict[str, Any]:
    """promote or rollback (deploy/canary.py), then close the pipeline's parent run."""
    from tuneloop.deploy import canary

    reg = Registry(cfg)
    outcome = f"promoted v{version}" if action == "promote" else f"rolled back v{version}"
    r = _timed(reg, parent_id, action, lambda run_id: {**getattr(canary, action)(cfg, version), "outcome": outcome})
    reg.finish_pipeline_run(parent_id, outcome)
    return r


def promote_stage(cfg: RunConfig, parent_id: str, version: str) -> dict[str, Any]:
    return _end_rollout(cfg, parent_id, version, "promote")


def rollback_stage(cfg: RunConfig, parent_id: str, version: str) -> dict[str, Any]:
    return _end_rollout(cfg, parent_id, version, "rollback")


def stop_stage(cfg: RunConfig, parent_id: str, reason: str) -> dict[str, Any]:
    """The branch taken when a gate says no: close the parent run with the reason."""
    Registry(cfg).finish_pipeline_run(parent_id, reason)
    log.info("pipeline stopped: %s", reason)
    return {"outcome": reason}


# exit handler ---------------------------------------------------------------------------------
def finalize_stage(cfg: RunConfig, kfp_run_id: str, state: str, error: str = "") -> dict[str, Any]:
    """Runs last, whatever happened (the pipeline's exit handler). A run that ended without a decision
    (a task failed, the run was cancelled) must not leave anything behind: its canary (or shadow) is
    rolled back, stage runs still open are closed, and the parent run gets the outcome with the reason
    ("failed at sft: ..."). A run that reached its decision is left as it is."""
    from tuneloop.deploy import canary

    reg = Registry(cfg)
    parent = reg.pipeline_run_of_kfp(kfp_run_id)
    if parent is None:
        return {"outcome": f"{state}: no MLflow run was opened"}
    if parent.info.status != "RUNNING":
        return {"outcome": parent.data.tags.get("tuneloop.outcome", parent.info.status)}
    pid = parent.info.run_id
    cancelled = state.upper() in ("CANCELED", "CANCELLED", "CANCELING")
    failed_at = [r.data.tags.get("tuneloop.stage", r.info.run_name) for r in reg.stage_runs(pid)
                 if r.info.status in ("FAILED", "KILLED")]
    for r in reg.stage_runs(pid):
        if r.info.status == "RUNNING":  # its task was killed before it could close it
            reg.set_tag(r.info.run_id, "tuneloop.outcome", "KILLED: the task ended without closing its run")
            reg.client.set_terminated(r.info.run_id, "KILLED")
            failed_at.append(r.data.tags.get("tuneloop.stage", r.info.run_name))
    rolled_back = []
    live = reg.aliases()
    for mv in reg.versions_of_pipeline_run(pid):
        version = str(mv.version)
        if live.get(cfg.deploy.canary.mode) == version:
            try:
                canary.rollback(cfg, version)  # aliases first, then serving follows
            except Exception as e:  # noqa: BLE001 - serving unreachable: the aliases moved, it follows on reload
                log.error("rolled back v%s in the registry; serving did not answer: %s", version, e)
            rolled_back.append(version)
    where = f" at {failed_at[0]}" if failed_at else ""
    reason = (error or state).strip().splitlines()[0][:300] if (error or state) else state
    outcome = f"{'cancelled' if cancelled else 'failed'}{where}: {reason}"
    if rolled_back:
        outcome += f"; canary v{', v'.join(rolled_back)} rolled back"
    reg.finish_pipeline_run(pid, outcome, "KILLED" if cancelled else "FAILED")
    log.warning("pipeline %s", outcome)
    return {"outcome": outcome, "rolled_back": rolled_back}
