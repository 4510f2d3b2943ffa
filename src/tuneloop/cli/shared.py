"""What every command shares: the Typer app, the consoles, CONFIG loading, one-line failures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tuneloop.env import apply_defaults

apply_defaults()

app = typer.Typer(help="tuneloop: continuous LLM fine-tuning (Kubeflow Pipelines, DeepSpeed, MLflow).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
# not a terminal (CI, KFP task logs, a pipe): no wrapping at 80 columns, no truncated table cells
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _version(value: bool) -> None:
    if value:
        from tuneloop import __version__

        typer.echo(f"tuneloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    """tuneloop: continuous LLM fine-tuning (Kubeflow Pipelines, DeepSpeed, MLflow)."""

ConfigArg = Annotated[Path | None, typer.Argument(help="Run config YAML; default: the embedded demo config.")]
StateDir = Annotated[str | None, typer.Option(
    "--state-dir", help="Override `state_dir` (MLflow store, feedback store, model cache, checkpoints).")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking server URI; overrides registry.tracking_uri (default: sqlite in state_dir).")]


def load(config: Path | None, state_dir: str | None = None, tracking_uri: str | None = None):
    from tuneloop.config import ConfigError, demo_config_path, load_config

    try:
        cfg = load_config(config or demo_config_path(), state_dir=state_dir)
    except ConfigError as e:
        err.print(f"[red]invalid config[/red]\n{e}")
        raise typer.Exit(2) from None
    for warning in cfg.deprecations:
        typer.echo(f"warning: {warning}", err=True)
    if tracking_uri:
        cfg.registry.tracking_uri = tracking_uri
    return cfg


def fail(msg: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)



def fail_line(msg: str, code: int = 1) -> None:
    """One line on stderr (no wrapping), then exit."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)
