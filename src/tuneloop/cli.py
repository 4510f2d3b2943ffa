"""`tuneloop ...`: validate, compile, run, submit, schedule, serve.

Every command that takes CONFIG defaults to the embedded demo config, so
`tuneloop run` with no argument runs the whole loop on this machine.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

app = typer.Typer(help="tuneloop: continuous LLM fine-tuning (Kubeflow Pipelines, DeepSpeed, MLflow).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err = Console(stderr=True)

ConfigArg = Annotated[Path | None, typer.Argument(help="Run config YAML; default: the embedded demo config.")]
StateDir = Annotated[str | None, typer.Option(
    "--state-dir", help="Override `state_dir` (MLflow store, feedback store, model cache, checkpoints).")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking server URI; overrides registry.tracking_uri (default: sqlite in state_dir).")]


def _load(config: Path | None, state_dir: str | None = None, tracking_uri: str | None = None):
    from tuneloop.config import ConfigError, demo_config_path, load_config

    try:
        cfg = load_config(config or demo_config_path(), state_dir=state_dir)
    except ConfigError as e:
        err.print(f"[red]invalid config[/red]\n{e}")
        raise typer.Exit(2) from None
    if tracking_uri:
        cfg.registry.tracking_uri = tracking_uri
    return cfg


def _fail(msg: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


@app.command()
def validate(config: ConfigArg = None) -> None:
    """Check a run config (types, unknown keys, impossible combinations) without running anything."""
    cfg = _load(config)
    console.print(f"[green]ok[/green]: {config or 'embedded demo config'} is a valid run config "
                  f"(loop {cfg.name!r}, {len(cfg.data.sources)} sources, {len(cfg.evaluate.gates)} gate rules)")


@app.command("compile")
def compile_(
    out: Annotated[Path | None, typer.Option(help="Where to write the YAML; default: the committed "
                                                  "pipelines/continuous_training.yaml.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Do not write; exit 1 if the committed YAML differs "
                                                        "from what the code compiles.")] = False,
    config: Annotated[Path | None, typer.Option(help="Compile with this run config's `platform` settings "
                                                     "(resources, GPUs, volumes, secrets); needs --out. Default: "
                                                     "the default platform, as committed.")] = None,
) -> None:
    """Compile the pipeline to KFP YAML (or check that the committed YAML is current)."""
    from tuneloop.orchestrate import compile_pipeline, compiled_is_current, compiled_path

    if config is not None:
        if out is None or check:
            _fail("--config compiles a config's own pipeline: give --out (the committed YAML uses the defaults)", 2)
        console.print(f"wrote {compile_pipeline(out, _load(config))}")
        return
    target = out or compiled_path()
    if check:
        same, diff = compiled_is_current(target)
        if not same:
            err.print(diff[:4000])
            _fail(f"{target} is stale: run `tuneloop compile` and commit the result")
        console.print(f"[green]ok[/green]: {target} matches the pipeline code")
        return
    compile_pipeline(target)
    console.print(f"wrote {target}")


@app.command()
def run(config: ConfigArg = None, state_dir: StateDir = None, tracking_uri: TrackingUri = None,
        run_name: Annotated[str | None, typer.Option(help="MLflow/KFP run name; default: <name>-<timestamp>.")] = None,
        ) -> None:
    """Run the whole pipeline on this machine with kfp.local, then print the summary."""
    from tuneloop.orchestrate import run_local

    cfg = _load(config, state_dir, tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    console.rule(f"tuneloop run: {cfg.name}")
    try:
        summary = run_local(cfg, run_name)
    except Exception as e:  # the pipeline's own logs above show the failing task in full
        _fail(f"pipeline failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    print_summary(summary, cfg)


@app.command()
def submit(config: ConfigArg = None,
           host: Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint, e.g. https://kfp.example.com.")] = "",
           experiment: Annotated[str, typer.Option(help="KFP experiment to file the run under.")] = "tuneloop",
           run_name: Annotated[str | None, typer.Option(help="Run name; default <name>-<timestamp>.")] = None,
           namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace (multi-user).")] = None,
           ) -> None:
    """Submit one pipeline run to a Kubeflow Pipelines endpoint."""
    from tuneloop.orchestrate import submit as do_submit

    if not host:
        _fail("--host is required (the Kubeflow Pipelines endpoint)", 2)
    cfg = _load(config)
    run_id = do_submit(cfg, host, experiment, run_name, namespace)
    console.print(f"submitted run {run_id} to {host} (experiment {experiment})")


@app.command()
def schedule(config: ConfigArg = None,
             host: Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint.")] = "",
             cron: Annotated[str, typer.Option(help="KFP cron (6 fields, seconds first), e.g. '0 0 3 * * *'.")]
             = "0 0 3 * * *",
             experiment: Annotated[str, typer.Option(help="KFP experiment of the recurring run.")] = "tuneloop",
             job_name: Annotated[str | None, typer.Option(help="Recurring run name; default <name>-nightly.")] = None,
             namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace.")] = None,
             replace: Annotated[bool, typer.Option(help="Delete recurring runs of the same name in the experiment "
                                                        "first (update the schedule instead of adding one).")]
             = False,
             ) -> None:
    """Create a recurring pipeline run on a Kubeflow Pipelines endpoint."""
    from tuneloop.orchestrate import schedule as do_schedule

    if not host:
        _fail("--host is required (the Kubeflow Pipelines endpoint)", 2)
    if len(cron.split()) != 6:
        _fail(f"--cron {cron!r}: KFP wants 6 fields (seconds minutes hours day month weekday)", 2)
    cfg = _load(config)
    rid = do_schedule(cfg, host, experiment, cron, job_name or f"{cfg.name}-nightly", namespace, replace=replace)
    console.print(f"created recurring run {rid} ({cron}) on {host}")


@app.command("upload-pipeline")
def upload_pipeline(
        host: Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint, e.g. "
                                               "http://ml-pipeline.kubeflow:8888.")] = "",
        name: Annotated[str, typer.Option(help="Pipeline name in KFP; created on first upload, a new version "
                                               "is added to it afterwards.")] = "tuneloop-continuous-training",
        version: Annotated[str | None, typer.Option(help="Pipeline version name (unique within the pipeline); "
                                                         "default <package version>-<UTC timestamp>.")] = None,
        package: Annotated[Path | None, typer.Option(help="Compiled pipeline YAML; default: the one shipped "
                                                          "with this package (`tuneloop compile`).")] = None,
        description: Annotated[str | None, typer.Option(help="Description stored with the pipeline version.")]
        = None,
        namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace (multi-user).")] = None,
) -> None:
    """Upload the compiled pipeline to Kubeflow Pipelines as a new pipeline version."""
    import time

    from tuneloop import __version__
    from tuneloop.orchestrate import upload_pipeline as do_upload

    if not host:
        _fail("--host is required (the Kubeflow Pipelines endpoint)", 2)
    if package is not None and not package.is_file():
        _fail(f"--package {package}: no such file", 2)
    version = version or f"{__version__}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    ids = do_upload(host, name, version, package, description, namespace)
    console.print(f"uploaded pipeline {name!r} version {version!r} to {host} "
                  f"(pipeline id {ids['pipeline_id']}, version id {ids['version_id']})")


@app.command()
def serve(config: ConfigArg = None, state_dir: StateDir = None, tracking_uri: TrackingUri = None,
          host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
          port: Annotated[int | None, typer.Option(help="Port; default: the port of deploy.gateway_url.")] = None,
          ) -> None:
    """Start the local serving gateway (champion + canary from the registry aliases)."""
    from tuneloop.deploy.gateway import serve as do_serve

    cfg = _load(config, state_dir, tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    do_serve(cfg, host, port or int(cfg.deploy.gateway_url.rsplit(":", 1)[1].split("/")[0]))


@app.command()
def evaluate(
    candidate: Annotated[Path, typer.Option(help="Candidate: a LoRA adapter folder or a save_pretrained model folder.")],
    data: Annotated[list[str], typer.Option(help="Held-out eval file or folder (JSONL/CSV/Parquet: prompt, response, "
                                                 "slice; preference pairs with chosen/rejected). Repeatable.")],
    gates: Annotated[Path, typer.Option(help="YAML with the `evaluate` section of a run config: slices, gates, "
                                             "optional safety.")],
    out: Annotated[Path, typer.Option(help="Output folder: gate.json, report.md, metrics.json, predictions.jsonl.")],
    champion: Annotated[Path | None, typer.Option(help="Champion (adapter or model folder); default: the base "
                                                       "model stands in for it.")] = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder for adapters; default: the candidate "
                                                   "adapter's base_model_name_or_path.")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System message for every prompt (as in the run "
                                                           "config's data.system_prompt).")] = None,
) -> None:
    """Score candidate and champion on the same held-out data per slice and apply the gate.

    Exits 0 whether the gate passes or fails (the decision is in OUT/gate.json), non-zero on error.
    """
    from tuneloop.config import ConfigError
    from tuneloop.data.readers import SourceError
    from tuneloop.evaluate.run import evaluate_paths

    logging.basicConfig(level=logging.WARNING)
    try:
        result = evaluate_paths(candidate, champion, data, gates, out, base, system_prompt)
    except (ConfigError, SourceError, FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    g = result["gate"]
    console.print(f"gate {'PASSED' if g['passed'] else 'FAILED'} (reference: {g['reference']}); "
                  f"{sum(r['passed'] for r in g['rules'])}/{len(g['rules'])} rules pass")
    for r in g["rules"]:
        if not r["passed"]:
            console.print(f"  FAIL {r['slice']}/{r['metric']}: {r['why']}")
    console.print(f"wrote {out / 'gate.json'} and {out / 'report.md'}")


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files or folders of .jsonl/.csv/.parquet records (folders are "
                                                    "read recursively), local or s3://bucket/prefix/.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: accepted.jsonl, quarantine.jsonl, report.json "
                                                    "(and eval.jsonl with --eval).")],
    eval_: Annotated[list[str] | None, typer.Option(
        "--eval", help="Held-out eval set (repeatable): training records that repeat or nearly repeat one of its "
                       "prompts are quarantined as eval leaks.")] = None,
    kind: Annotated[str, typer.Option(help="auto: records with chosen/rejected are preference pairs, the rest SFT "
                                           "(messages or prompt/response); or sft, preference, classification.")]
    = "auto",
    template: Annotated[str | None, typer.Option(
        help="Classification records: the instruction with record fields in braces, e.g. "
             "'Route this ticket: {text}' (implies --kind classification).")] = None,
    label_field: Annotated[str, typer.Option(help="Classification records: the field with the answer.")] = "label",
    slice_: Annotated[str | None, typer.Option("--slice", help="Slice label for records that carry none "
                                                                "(default: `default`).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto (from the file extension), jsonl, csv or parquet.")]
    = "auto",
    tokenizer: Annotated[Path | None, typer.Option(
        help="A save_pretrained folder with a chat template: accepted records also get prompt/completion (or "
             "chosen/rejected) rendered with it. Without it records are checked, scrubbed and deduplicated but "
             "not chat-formatted.")] = None,
    pii: Annotated[bool, typer.Option("--pii/--no-pii", help="Scrub PII (Presidio pattern recognizers: email, "
                                                             "phone, credit card, IBAN, IP, URL).")] = True,
    near_dup: Annotated[float, typer.Option(help="Jaccard threshold for near-duplicate removal (MinHash LSH); "
                                                 "0 turns it off.")] = 0.85,
    max_prompt_chars: Annotated[int, typer.Option(help="Longer prompts are quarantined.")] = 4000,
    max_response_chars: Annotated[int, typer.Option(help="Longer responses are quarantined.")] = 4000,
) -> None:
    """Check, scrub and deduplicate record files on their own (no config, no MLflow).

    Exit 0 when the data was processed, even with quarantined records; 1 with a one-line error when an input cannot be read at all (missing file, unknown or broken format)."""
    from tuneloop.data.ingest import ingest_paths
    from tuneloop.data.readers import SourceError

    if kind not in ("auto", "sft", "preference", "classification"):
        _fail_line(f"--kind {kind!r}: use auto, sft, preference or classification", 2)
    if fmt not in ("auto", "jsonl", "csv", "parquet"):
        _fail_line(f"--format {fmt!r}: use auto, jsonl, csv or parquet", 2)
    if kind == "classification" and template is None:
        _fail_line("--kind classification needs --template, e.g. 'Route this ticket: {text}'", 2)
    if not 0 <= near_dup <= 1:
        _fail_line(f"--near-dup {near_dup}: a Jaccard threshold between 0 and 1", 2)
    formatter = None
    if tokenizer is not None:
        formatter = _formatter(tokenizer)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        if template is not None:
            from tuneloop.config import template_fields

            template_fields(template)
        out.mkdir(parents=True, exist_ok=True)
        report = ingest_paths(paths, out, eval_paths=eval_ or [], kind=kind, template=template,
                              label_field=label_field, slice_=slice_, fmt=fmt, formatter=formatter, pii=pii,
                              near_threshold=near_dup, max_prompt_chars=max_prompt_chars,
                              max_response_chars=max_response_chars)
    except SourceError as e:
        _fail_line(str(e).splitlines()[0])
    except ValueError as e:  # a template that is not usable
        _fail_line(str(e).splitlines()[0], 2)
    except OSError as e:
        _fail_line(f"{out}: {e.strerror or e}")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report["per_reason"].items(), key=lambda kv: -kv[1]))
    typer.echo(f"read {report['read']}, accepted {report['accepted']}, quarantined {report['quarantined']}"
               + (f" ({reasons})" if reasons else "") + f" -> {out}")


def _fail_line(msg: str, code: int = 1) -> None:
    """One line on stderr (no wrapping), then exit."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _formatter(tokenizer_dir: Path):
    from tuneloop.data.formatting import ChatFormatter

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except ImportError:
        _fail_line("--tokenizer needs transformers (pip install tuneloop[train])", 2)
    except (OSError, ValueError) as e:
        _fail_line(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer: {str(e).splitlines()[0]}", 2)
    if not getattr(tok, "chat_template", None) or tok.eos_token is None:
        _fail_line(f"--tokenizer {tokenizer_dir}: has no chat template or no eos token", 2)
    return ChatFormatter(tok)


review_app = typer.Typer(help="Human review of candidate answers: export a sample, import ratings.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    predictions: Annotated[Path, typer.Option(help="predictions.jsonl written by the evaluate stage.")],
    out: Annotated[Path, typer.Option(help="CSV to hand to the raters (one row per item and rater).")],
    per_slice: Annotated[int, typer.Option(help="Items sampled from every slice.")] = 10,
    rater: Annotated[list[str], typer.Option(help="Rater id; repeat for each rater (at least two).")] = ["a", "b"],
    seed: Annotated[int, typer.Option(help="Seed of the stratified sample.")] = 0,
) -> None:
    """Export a stratified sample of candidate answers with the rubric (helpfulness, harmlessness, honesty; 1-5)."""
    from tuneloop.evaluate.review import export_sample

    try:
        counts = export_sample(predictions, out, per_slice, rater, seed)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    console.print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" items x {len(rater)} raters")


@review_app.command("import")
def review_import(
    ratings: Annotated[list[Path], typer.Argument(help="Filled CSV file(s) from `tuneloop review export`.")],
    min_kappa: Annotated[float, typer.Option(help="Refuse the ratings when agreement on any rubric dimension "
                                                  "(Cohen's / Fleiss' kappa) is below this.")] = 0.4,
    out: Annotated[Path | None, typer.Option(help="Write the summary (agreement, mean scores per slice) as JSON.")]
    = None,
) -> None:
    """Import ratings, check inter-rater agreement, and summarise the scores per slice."""
    import json

    from tuneloop.evaluate.review import ReviewRejected, import_ratings

    try:
        summary = import_ratings(ratings, min_kappa)
    except (ReviewRejected, FileNotFoundError) as e:
        _fail(str(e), 3)
    for dim, a in summary["agreement"].items():
        console.print(f"{dim}: {a['statistic']} kappa {a['kappa']:.3f}")
    if out:
        out.write_text(json.dumps(summary, indent=2))
        console.print(f"wrote {out}")


@app.command()
def monitor(config: ConfigArg = None, state_dir: StateDir = None, tracking_uri: TrackingUri = None,
            out: Annotated[Path | None, typer.Option(help="Folder for monitor.json, monitor.prom and the drift "
                                                          "report; default <state_dir>/monitor/<timestamp>.")] = None,
            ) -> None:
    """Check production (SLOs, feedback trend, prompt drift, feedback volume) and start a run when due.

    What happens when retraining is due is the config's monitor.action: report, run, or submit.
    Exits 0 after a check; the decision is in monitor.json and in MLflow.
    """
    import time as _time

    from tuneloop.monitor.check import check, record

    cfg = _load(config, state_dir, tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    target = out or cfg.state_path / "monitor" / _time.strftime("%Y%m%d-%H%M%S")
    r = check(cfg, target)
    record(cfg, r, target)
    r["action"] = _act_on_monitor(cfg, r)
    slo = r["slo"]
    console.print(f"champion {r['champion']}: {r['window_requests']} requests in the window, error rate "
                  f"{slo['error_rate']:.3f}, p95 {_fmt(slo['p95_latency_ms'])} ms"
                  f"{' (SLO BREACH)' if r['slo_breach'] else ''}")
    console.print(f"feedback trend: {r['feedback_trend']['verdict']}; drift: "
                  f"{r['drift'].get('note') or 'embedding score ' + _fmt(r['drift'].get('embedding_drift_score'))}; "
                  f"feedback since champion: {r['feedback_volume']['since_champion']}")
    console.print(f"retrain: {'DUE (' + ', '.join(r['reasons']) + ')' if r['retrain'] else 'not due'}; "
                  f"action: {r['action']}; report in {target}")


def _act_on_monitor(cfg: Any, report: dict[str, Any]) -> str:
    """What `monitor.action` says to do when the check found retraining due."""
    if not report["retrain"]:
        return "none"
    if cfg.monitor.action == "run":
        from tuneloop.orchestrate import run_local

        return f"ran pipeline: {run_local(cfg)['outcome']}"
    if cfg.monitor.action == "submit":
        from tuneloop.orchestrate import submit

        return f"submitted KFP run {submit(cfg, cfg.monitor.kfp_host or '', cfg.registry.experiment, None)}"
    return "retraining is due (action: report)"


@app.command("feedback-service")
def feedback_service(
    database_url: Annotated[str, typer.Option(envvar="DATABASE_URL", help="SQLAlchemy URL of the feedback store "
                                              "(postgresql://user:password@host:5432/feedback on a cluster, psycopg 3; a sqlite "
                                              "path locally).")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    config: Annotated[Path | None, typer.Option(help="Run config whose data.pii settings scrub what is stored; "
                                                     "default: the default PII settings.")] = None,
) -> None:
    """The cluster's feedback service: KServe payload-logger events in, user feedback in, PII-scrubbed."""
    import uvicorn

    from tuneloop.config import PiiConfig
    from tuneloop.data.pii import PiiScrubber
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.feedback.service import create_feedback_service

    pii = _load(config).data.pii if config else PiiConfig()
    store = FeedbackStore(database_url, scrubber=PiiScrubber(pii) if pii.enabled else None)
    uvicorn.run(create_feedback_service(store), host=host, port=port, log_level="warning")


@app.command("config-reference")
def config_reference() -> None:
    """Print every config key with its type, default and meaning (Markdown)."""
    from tuneloop.config import reference_markdown

    print(reference_markdown())


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def print_summary(s: dict[str, Any], cfg: Any) -> None:
    console.rule("summary")
    t = Table(title=f"pipeline run {s['run_name']}: {s['outcome']}")
    for col in ("stage", "status", "wall s", "outcome"):
        t.add_column(col)
    for st in s["stages"]:
        t.add_row(st["stage"], st["status"], _fmt(st["wall_s"]), st["outcome"])
    console.print(t)
    if s.get("validation"):
        v = s["validation"]
        console.print(f"data gate: {'PASSED' if v['passed'] else 'FAILED'} "
                      f"({len(v['checks']) - len(v['failed'])}/{len(v['checks'])} checks)")
        for c in v["failed"]:
            console.print(f"  FAIL {c['table']} {c['expectation']} {c['column']}: {c['observed']}")
    if s.get("gate"):
        g = s["gate"]
        gt = Table(title=f"evaluation gate: {'PASSED' if g['passed'] else 'FAILED'} (reference: {g['reference']})")
        for col in ("slice", "metric", "candidate", "reference", "threshold", "result"):
            gt.add_column(col)
        for r in g["rules"]:
            gt.add_row(r["slice"], r["metric"], _fmt(r["candidate"]), _fmt(r["champion"]),
                       f"{r['kind']} {_fmt(r['threshold'])}", "pass" if r["passed"] else "FAIL")
        console.print(gt)
    if s.get("metrics"):
        m = s["metrics"]
        mt = Table(title="candidate vs base model, per slice")
        for col in ("slice", "metric", "base", "candidate", "gain"):
            mt.add_column(col)
        for sl in sorted(k for k in m["candidate"] if k != "all"):
            for k in ("accuracy", "exact_match", "token_f1", "nll"):
                if k in m["candidate"][sl]:
                    b, c = m["base"][sl][k], m["candidate"][sl][k]
                    mt.add_row(sl, k, _fmt(b), _fmt(c), f"{c - b:+.3f}")
        console.print(mt)
    if s.get("canary"):
        c = s["canary"]
        console.print(f"canary analysis: {c['decision'].upper()} - " +
                      "; ".join(f"{x['check']}: {x['detail']}" for x in c["checks"]))
    aliases = ", ".join(f"{a}=v{v}" for a, v in s["aliases"].items()) or "none"
    console.print(f"registry: model [bold]{s['model_name']}[/bold], this run's version: "
                  f"{('v' + s['model_version']) if s['model_version'] else 'none (not registered)'}; aliases: {aliases}")
    console.print(f"MLflow run: {s['parent_run_id']} (experiment {s['experiment_id']}) at {s['tracking_uri']}")
    if "pipeline_wall_s" in s:
        console.print(f"pipeline wall time: {s['pipeline_wall_s']:.0f} s")
    if s["tracking_uri"].startswith("sqlite:"):
        root = cfg.state_path
        console.print(f"open the MLflow UI: mlflow ui --backend-store-uri {s['tracking_uri']} "
                      f"--default-artifact-root {root / 'mlartifacts'} --port 5000  "
                      f"(then http://127.0.0.1:5000/#/experiments/{s['experiment_id']}/runs/{s['parent_run_id']})")


def main() -> None:
    from tuneloop.config import ConfigError

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except ConfigError as e:  # found after loading, e.g. a cluster config's paths at compile/submit time
        typer.echo(f"invalid config\n{e}", err=True)  # unwrapped: the message carries paths
        sys.exit(2)


if __name__ == "__main__":
    main()
