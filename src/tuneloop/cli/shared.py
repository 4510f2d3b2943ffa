"""What every command shares: the Typer app (help without Python types, plain usage errors when not on a
terminal), the consoles, CONFIG loading, one-line failures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperGroup, TyperOption

from tuneloop.env import apply_defaults

apply_defaults()

_VALUE_NAMES = {int: "INTEGER", float: "NUMBER"}


class _Argument(TyperArgument):
    """An argument as help and usage show it: its name in capitals (CONFIG, PATHS...), no Python type, and
    brackets only when it is optional ([CONFIG])."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        return self.display_name_raw if self.required else f"[{self.display_name_raw}]"


def _tidy(param: Any) -> None:
    """Help without Python type names: a flag shows no value, an option its value's kind (TEXT, PATH, INTEGER,
    NUMBER), an argument its name in capitals. An explicit metavar= is kept."""
    if isinstance(param, TyperArgument):
        if param.metavar is None:
            param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
        param.__class__ = _Argument
    elif isinstance(param, TyperOption) and param.metavar is None and hasattr(param, "type_descriptor"):
        desc = param.type_descriptor  # (a Typer without it prints click's TEXT, INTEGER, ... already)
        value = get_args(desc.annotation)[0] if desc.is_list else desc.annotation
        param.metavar = "" if param.is_flag else "PATH" if desc.is_path else _VALUE_NAMES.get(value, "TEXT")


class Group(TyperGroup):
    """The app and its sub-apps (`review`): every command's help is tidied (_tidy), and when stderr is not a
    terminal (CI, KFP logs, a pipe) usage errors are plain lines, not a box wrapped at 80 columns."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _tidy(param)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None and not isinstance(cmd, TyperGroup):
            for param in [*cmd.params, cmd.get_help_option(ctx)]:
                if param is not None:
                    _tidy(param)
        return cmd

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        try:
            from typer.core import _main
        except ImportError:  # another Typer: its own error output
            _main = None
        if sys.stderr.isatty() or _main is None:
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        return _main(self, args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=standalone_mode,
                     windows_expand_args=windows_expand_args, rich_markup_mode=None, **extra)


app = typer.Typer(help="tuneloop: continuous LLM fine-tuning (Kubeflow Pipelines, DeepSpeed, MLflow).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, cls=Group,
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

ConfigArg = Annotated[Path | None, typer.Argument(metavar="CONFIG",
                                                  help="Run config YAML; default: the embedded demo config.")]
StateDir = Annotated[str | None, typer.Option(
    "--state-dir", help="Override `state_dir` (MLflow store, feedback store, model cache, checkpoints).")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking server URI; overrides registry.tracking_uri (default: sqlite in state_dir).")]


def load(config: Path | None, state_dir: str | None = None, tracking_uri: str | None = None):
    """The run config at `config` (default: the demo's); a refusal prints its lines as they are (each names the
    file and the key, or file:line:col for YAML) and exits 2."""
    from tuneloop.config import ConfigError, demo_config_path, load_config

    path = config or demo_config_path()
    try:
        cfg = load_config(path, state_dir=state_dir)
    except ConfigError as e:
        typer.echo(str(e), err=True)  # plain: no wrapping, no markup ([0] in a key stays)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - whatever the input, one line and no traceback
        typer.echo(f"{path}: cannot be read as a run config ({type(e).__name__}: {' '.join(str(e).split())})",
                   err=True)
        raise typer.Exit(2) from None
    for warning in cfg.deprecations:
        typer.echo(f"warning: {warning}", err=True)
    if tracking_uri:
        cfg.registry.tracking_uri = tracking_uri
    return cfg


def fail(msg: str, code: int = 1) -> None:
    """`error: msg` on stderr, unwrapped, then exit."""
    fail_line(msg, code)


def fail_line(msg: str, code: int = 1) -> None:
    """One line on stderr (no wrapping), then exit."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)
