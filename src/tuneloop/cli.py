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
) -> None:
    """Compile the pipeline to KFP YAML (or check that the committed YAML is current)."""
    from tuneloop.orchestrate import compile_pipeline, compiled_is_current, compiled_path

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
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
