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
MAX_CONFIG_BYTES = 10 * 2**20


def _is_uri(p: str) -> bool:
    return "://" in p


def _section(raw: dict[str, Any], *keys: str) -> dict[str, Any]:
    """raw[k1][k2]... when each is a mapping, else {} (a wrong type is the validator's to report)."""
    node: Any = raw
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _local(base: Path, p: Any) -> Any:
    """A relative local path made absolute against `base`; anything else (a URI, a wrong type) as it is."""
    if not isinstance(p, str) or not p or _is_uri(p):
        return p
    try:
        return str((base / p).resolve())
    except (OSError, ValueError):  # a NUL byte, a loop of links: the path is reported as it was written
        return p


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative data paths absolute against the config file's folder (in place)."""
    for section, key in _PATH_FIELDS:
        sources = _section(raw, section).get(key)
        for src in sources if isinstance(sources, list) else []:
            if isinstance(src, dict) and "path" in src:
                src["path"] = _local(base, src["path"])
    bm = _section(raw, "base_model")
    if isinstance(bm.get("path"), str) and not _is_uri(bm["path"]) and (base / bm["path"]).exists():
        bm["path"] = str((base / bm["path"]).resolve())
    canary = _section(raw, "deploy", "canary")
    if "traffic_file" in canary:
        canary["traffic_file"] = _local(base, canary["traffic_file"])
    safety = _section(raw, "evaluate", "safety")
    if isinstance(safety.get("prompt_files"), list):  # pkg://<package>/<file> is a URI too
        safety["prompt_files"] = [_local(base, f) for f in safety["prompt_files"]]
    pairs = _section(raw, "train", "reward", "safety")  # the reward model's safety prompts
    if isinstance(pairs.get("prompt_files"), list):
        pairs["prompt_files"] = [_local(base, f) for f in pairs["prompt_files"]]
    if isinstance(raw.get("state_dir"), str):
        raw["state_dir"] = str(Path(raw["state_dir"]).resolve())
    else:
        raw["state_dir"] = str(Path(os.environ.get("TUNELOOP_STATE_DIR", DEFAULT_STATE_DIR)).resolve())


_REL_KEY = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*): (.*)$", re.DOTALL)


def dotted_key(loc: tuple[Any, ...] | list[Any]) -> str:
    """A location as messages name it: `data.sources[1].path` (list items counted from 0, as in the
    validators' own messages and in `tuneloop validate`'s data checks)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = dotted_key(e["loc"])
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys may override it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class says so, with its position
                continue
            if seen is not key_node:
                raise _DuplicateKey(key, seen.start_mark, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.again = key, first, again


def _yaml_error(path: Path, text: str, e: yaml.YAMLError) -> str:
    """One line, `file:line:col: message` (1-based), for anything PyYAML refuses."""
    if isinstance(e, _DuplicateKey):
        return (f"{path}:{e.again.line + 1}:{e.again.column + 1}: duplicate key {e.key!r} "
                f"(first at line {e.first.line + 1})")
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (NUL, other controls)
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        ch = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        return f"{path}:{line}:{col}: not valid YAML: control character {ch} is not allowed"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and problem != context:
        problem += f" ({context}" + (f" at line {cmark.line + 1})" if cmark else ")")
    if "'\\t'" in problem:
        problem += "; indent with spaces, not tabs"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    return f"{where}: not valid YAML: {problem}"


def _read_yaml(path: Path) -> Any:
    """The YAML document at `path`; ConfigError with one line for every way that can fail."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a run config")
        text = data.decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the run config YAML file itself") from None
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        col = e.start - (e.object.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}:{col}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(path, text, e)) from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None


def load_config(path: str | Path, state_dir: str | None = None) -> RunConfig:
    """Load and validate a YAML run config; relative paths are resolved against its folder. Every refusal is
    a ConfigError: YAML mistakes as `file:line:col: message`, config mistakes as `file: dotted.key: message`."""
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: holds no settings (empty, or only comments); a run config must be a mapping of "
                          "keys (name, base_model, data, evaluate, registry, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    if state_dir is not None:
        raw["state_dir"] = state_dir
    _resolve_paths(raw, path.resolve().parent)
    return parse_config(raw, str(path))


def demo_config_path() -> Path:
    """The embedded default: the demo config that ships inside the package."""
    return Path(__file__).parent.parent / "demo" / "config.yaml"


