"""pkg://<package>[/<path inside it>]: files shipped in an installed package, found without importing it
(models, red-team prompt sets, the embedding model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PREFIX = "pkg://"


def resolve(spec: str, key: str) -> Path:
    """pkg://<package>[/<path>] -> that path inside the installed package; anything else -> Path(spec).
    `key` is the config key the spec came from, named in the error when the package is missing."""
    if not spec.startswith(PREFIX):
        return Path(spec)
    pkg, _, rel = spec.removeprefix(PREFIX).partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{key}: package {pkg!r} is not installed (pip install --no-deps {pkg})")
    folder = Path(next(iter(found.submodule_search_locations)))
    return folder / rel if rel else folder
