"""The process environment every tuneloop process starts from: offline, no telemetry, quiet tokenizers.

One place for the defaults the CLI, the pipeline's tasks, the training workers and the training pods
set (each only where the variable is not set already, so an operator can override any of them).
"""

from __future__ import annotations

import os

DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow phones home otherwise
    "DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "False",  # Great Expectations' usage statistics
    "NML_DISABLE_USAGE_LOGGING": "1",  # NannyML's usage analytics (segment) in the monitor's quality estimate
    "NML_DISABLE_USER_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",  # models come from the state dir or a package, never from the hub at run time
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set DEFAULTS where unset, in `env` (default: this process's os.environ); returns it."""
    target = os.environ if env is None else env
    for key, value in DEFAULTS.items():
        target.setdefault(key, value)
    return target  # type: ignore[return-value]
