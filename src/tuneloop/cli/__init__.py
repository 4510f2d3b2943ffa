"""`tuneloop ...`: the command line. Every command that takes CONFIG defaults to the embedded demo
config, so `tuneloop run` with no argument runs the whole loop on this machine.

shared.py      the app, consoles, CONFIG loading, one-line failures
pipeline.py    validate, compile, run, submit, schedule, upload-pipeline, config-reference
services.py    serve, monitor, feedback-service
standalone.py  evaluate, ingest (files, no run config)
review.py      review export / import
diagnose.py    diagnose (why a run's candidate was blocked)
summary.py     the run summary
"""

from __future__ import annotations

import sys

import typer

from tuneloop.cli import (diagnose, pipeline, review, services,  # noqa: F401 - each module registers its commands
                          standalone)
from tuneloop.cli.shared import app


def main() -> None:
    from tuneloop.config import ConfigError

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except ConfigError as e:  # found after loading, e.g. a cluster config's paths at compile/submit time
        typer.echo(f"invalid config\n{e}", err=True)  # unwrapped: the message carries paths
        sys.exit(2)
