"""Commands around the pipeline: validate, compile, run, submit, schedule, upload-pipeline, config-reference."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli.shared import ConfigArg, StateDir, TrackingUri, app, console, err, fail, load
from tuneloop.cli.summary import print_summary

Host = Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint, e.g. https://kfp.example.com or "
                                        "http://ml-pipeline.kubeflow:8888.")]


@app.command()
def validate(config: ConfigArg = None,
             offline: Annotated[bool, typer.Option("--offline", help="Skip the network checks: URIs (s3://, gs://, "
                                                                     "az://) are not listed; local paths still "
                                                                     "are.")] = False) -> None:
    """Check a run config and the data it names, in seconds, without running anything.

    The config: types, unknown keys, impossible combinations; YAML mistakes as FILE:LINE:COL, duplicate keys
    refused. The data: every path exists and holds .jsonl/.csv/.parquet files of that kind, every URI answers
    with the configured storage_options and the environment's credentials. Each problem is one line naming the
    dotted key; list items are counted from 0 (data.sources[0] is the first source). Exit 0: ready; 1: the data
    it names is not; 2: the config itself is invalid.
    """
    from tuneloop.data.preflight import preflight

    cfg = load(config)
    source = config or "embedded demo config"
    problems = preflight(cfg, offline=offline)
    for problem in problems:
        typer.echo(f"{source}: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {source} is a valid run config (loop {cfg.name!r}, {len(cfg.data.sources)} sources, "
               f"{len(cfg.evaluate.gates)} gate rules); its data paths are in place"
               + (" (URIs not checked: --offline)" if offline else ""))


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
            fail("--config compiles a config's own pipeline: give --out (the committed YAML uses the defaults)", 2)
        console.print(f"wrote {compile_pipeline(out, load(config))}")
        return
    target = out or compiled_path()
    if check:
        same, diff = compiled_is_current(target)
        if not same:
            err.print(diff[:4000])
            fail(f"{target} is stale: run `tuneloop compile` and commit the result")
        console.print(f"[green]ok[/green]: {target} matches the pipeline code")
        return
    compile_pipeline(target)
    console.print(f"wrote {target}")


@app.command()
def run(config: ConfigArg = None, state_dir: StateDir = None, tracking_uri: TrackingUri = None,
        run_name: Annotated[str | None, typer.Option(help="MLflow/KFP run name; default: <name>-<timestamp>.")] = None,
        cold_tasks: Annotated[bool, typer.Option(
            "--cold-tasks", help="Start every task in a fresh interpreter, as kfp.local does by itself, instead of "
                                 "forking it from one warm interpreter that imported the stages' libraries once "
                                 "(also TUNELOOP_COLD_TASKS=1).")] = False,
        ) -> None:
    """Run the whole pipeline on this machine with kfp.local, then print the summary."""
    from tuneloop.orchestrate import run_local

    cfg = load(config, state_dir, tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    console.rule(f"tuneloop run: {cfg.name}")
    try:
        summary = run_local(cfg, run_name, warm_tasks=not cold_tasks)
    except Exception as e:  # the pipeline's own logs above show the failing task in full
        fail(f"pipeline failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    print_summary(summary, cfg)


@app.command()
def submit(host: Host, config: ConfigArg = None,
           experiment: Annotated[str, typer.Option(help="KFP experiment to file the run under.")] = "tuneloop",
           run_name: Annotated[str | None, typer.Option(help="Run name; default <name>-<timestamp>.")] = None,
           namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace (multi-user).")] = None,
           ) -> None:
    """Submit one pipeline run to a Kubeflow Pipelines endpoint."""
    from tuneloop.orchestrate import submit as do_submit

    if not host:
        fail("--host is empty: give the Kubeflow Pipelines endpoint", 2)
    cfg = load(config)
    run_id = do_submit(cfg, host, experiment, run_name, namespace)
    console.print(f"submitted run {run_id} to {host} (experiment {experiment})")


@app.command()
def schedule(host: Host, config: ConfigArg = None,
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
        fail("--host is empty: give the Kubeflow Pipelines endpoint", 2)
    if len(cron.split()) != 6:
        fail(f"--cron {cron!r}: KFP wants 6 fields (seconds minutes hours day month weekday)", 2)
    cfg = load(config)
    rid = do_schedule(cfg, host, experiment, cron, job_name or f"{cfg.name}-nightly", namespace, replace=replace)
    console.print(f"created recurring run {rid} ({cron}) on {host}")


@app.command("upload-pipeline")
def upload_pipeline(
        host: Host,
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
        fail("--host is empty: give the Kubeflow Pipelines endpoint", 2)
    if package is not None and not package.is_file():
        fail(f"--package {package}: no such file", 2)
    version = version or f"{__version__}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    ids = do_upload(host, name, version, package, description, namespace)
    console.print(f"uploaded pipeline {name!r} version {version!r} to {host} "
                  f"(pipeline id {ids['pipeline_id']}, version id {ids['version_id']})")


@app.command("config-reference")
def config_reference() -> None:
    """Print every config key with its type, default and meaning (Markdown)."""
    from tuneloop.config import reference_markdown

    print(reference_markdown())


