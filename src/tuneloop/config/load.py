"""Loading: YAML -> resolved paths -> validated `RunConfig`, errors naming the file and the dotted key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tuneloop.config.base import DEFAULT_STATE_DIR, ConfigError
from tuneloop.config.deprecated import migrate
from tuneloop.config.run import RunConfig

_PATH_FIELDS = [("data", "sources"), ("data", "eval")]


def _is_uri(p: str) -> bool:
    return "://" in p


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative data paths absolute against the config file's folder (in place)."""
    for section, key in _PATH_FIELDS:
        for src in (raw.get(section) or {}).get(key) or []:
            if isinstance(src, dict) and isinstance(src.get("path"), str) and not _is_uri(src["path"]):
                src["path"] = str((base / src["path"]).resolve())
    bm = raw.get("base_model") or {}
    if isinstance(bm.get("path"), str) and not _is_uri(bm["path"]) and (base / bm["path"]).exists():
        bm["path"] = str((base / bm["path"]).resolve())
    canary = ((raw.get("deploy") or {}).get("canary") or {})
    tf = canary.get("traffic_file")
    if isinstance(tf, str) and not _is_uri(tf):
        canary["traffic_file"] = str((base / tf).resolve())
    safety = ((raw.get("evaluate") or {}).get("safety") or {})
    if isinstance(safety.get("prompt_files"), list):  # pkg://<package>/<file> is a URI too
        safety["prompt_files"] = [str((base / f).resolve()) if isinstance(f, str) and not _is_uri(f) else f
                                  for f in safety["prompt_files"]]
    if isinstance(raw.get("state_dir"), str):
        raw["state_dir"] = str(Path(raw["state_dir"]).resolve())
    else:
        raw["state_dir"] = str(Path(os.environ.get("TUNELOOP_STATE_DIR", DEFAULT_STATE_DIR)).resolve())


_REL_KEY = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*): (.*)$", re.DOTALL)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # a section's validator names keys relative to its section: join them to the location
            m = _REL_KEY.match(msg)
            if m and e["loc"]:
                rel = m.group(1)
                key = rel if rel.split(".")[0].split("[")[0] == str(e["loc"][0]) else f"{key}.{rel}"
                msg = m.group(2)
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate an already-loaded mapping (paths must already be resolved). Deprecated keys are moved to
    their new place first; the warnings are kept on `cfg.deprecations` for the caller to show."""
    raw, deprecations = migrate(raw, source)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None
    cfg._deprecations = deprecations
    return cfg


def load_config(path: str | Path, state_dir: str | None = None) -> RunConfig:
    """Load and validate a YAML run config; relative paths are resolved against its folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    if state_dir is not None:
        raw["state_dir"] = state_dir
    _resolve_paths(raw, path.resolve().parent)
    return parse_config(raw, str(path))


def demo_config_path() -> Path:
    """The embedded default: the demo config that ships inside the package."""
    return Path(__file__).parent.parent / "demo" / "config.yaml"


