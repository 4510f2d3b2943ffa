"""Preflight: what can be checked about a run's inputs in seconds, before any compute. `tuneloop validate`
runs it once the config loads; check_prerequisites runs it first.

Checked, for every data source and evaluation set (`data.sources[i].path`, `data.eval[i].path`: preference
sources and held-out pairs are among them): the path exists and holds files ingest reads (the same discovery
as ingest: a folder recursively, .jsonl/.json/.csv/.parquet), and the first bytes of each file fit its format
(a JSON array where JSON Lines belong, a "Parquet" file without Parquet's magic, NUL bytes in a UTF-8 text
file); a URI (s3://, gs://, az://) answers a listing within URI_TIMEOUT_S with the source's storage_options
and the environment's credentials, unless `offline`. Also the other files a run reads: the drift embedding
model and spaCy model when they are folders, the red-team prompt files, the canary traffic file (local
paths; pkg:// packages depend on the image a stage runs in, not on the config). Replayed records come from
the champion in the registry and feedback from the feedback store: neither is a configured path.

Every problem is one line: the dotted config key (list items are counted from 0, as in every config message:
data.sources[0] is the first source), what is wrong, and what fixes it. A cluster config
(kubernetes.state_pvc) whose state_dir is not on this machine keeps its local paths on the cluster's volume:
those are left to check_prerequisites, which runs there.
"""

from __future__ import annotations

import codecs
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

from tuneloop.config import DataSource, RunConfig
from tuneloop.data.readers import SUFFIXES, file_format, is_uri, local_data_files

URI_TIMEOUT_S = 10.0  # for all URI checks together: they run side by side
PEEK_BYTES = 512  # read from the head of each file to judge its kind
MAX_PEEKED = 100  # files per source whose head is read
_S3_FAST = {"connect_timeout": 5, "read_timeout": 5, "retries": {"max_attempts": 1}}
_NOT_UTF8_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # UTF-32 LE starts like UTF-16 LE
_OFFLINE_HINT = "`tuneloop validate --offline` skips this check"
_CREDENTIALS = {"s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
                "gs": "GOOGLE_APPLICATION_CREDENTIALS", "az": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
                "abfs": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
                "abfss": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY"}


def preflight(cfg: RunConfig, offline: bool = False) -> list[str]:
    """Problems with the inputs `cfg` names, one line each (empty: all found); `offline` skips the URIs."""
    sources = [(f"data.{name}[{i}]", s) for name in ("sources", "eval") for i, s in enumerate(getattr(cfg.data, name))]
    probes = {} if offline else {key: _Probe(src) for key, src in sources if _remote(src.path)}
    for probe in probes.values():
        probe.start()
    deadline = time.monotonic() + URI_TIMEOUT_S
    problems: list[str] = []
    for key, src in sources:
        if _remote(src.path):
            if key in probes:
                problems += _guard(key, lambda: probes[key].result(key, deadline))
        elif not _elsewhere(cfg, src.path):
            problems += _guard(key, lambda: _local_source(key, src))
    problems += _guard("data", lambda: _other_files(cfg))
    return problems


def _guard(key: str, check: Any) -> list[str]:
    """A check's problems; a check that fails unexpectedly is one problem line, not a traceback."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - preflight reports, it never crashes the caller
        return [f"{key}: cannot be checked: {type(e).__name__}: {_one_line(e)}"]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _remote(path: str) -> bool:
    return is_uri(path) and not path.lower().startswith("file://")


def _elsewhere(cfg: RunConfig, path: str) -> bool:
    """A cluster run's local path on the state volume, which this machine does not have."""
    state = Path(cfg.state_dir)
    return bool(cfg.kubernetes.state_pvc) and not state.exists() and state in Path(path).parents


# -- local sources ----------------------------------------------------------------------------------
def _local_source(key: str, src: DataSource) -> list[str]:
    path = src.path[len("file://"):] if src.path.lower().startswith("file://") else src.path
    if not path:
        return [f"{key}.path: is empty; give a file or folder of .jsonl, .csv or .parquet records"]
    p = Path(path)
    if not p.exists():
        return [f"{key}.path: {path} does not exist; correct the path (a relative path is taken from the config "
                "file's folder) or remove the entry"]
    if p.is_dir():
        files = local_data_files(p)
        if not files:
            return [f"{key}.path: {path} holds no .jsonl, .csv or .parquet file (folders are read recursively); "
                    "put the data files there or point the path at them"]
    else:
        if file_format(path, src.format) is None:
            return [f"{key}.format: cannot tell the format of {path} from its extension "
                    f"{PurePosixPath(path).suffix!r}; set {key}.format to jsonl, csv or parquet"]
        files = [path]
    problems = []
    for f in files[:MAX_PEEKED]:
        why = _content_problem(key, f, file_format(f, src.format) or "jsonl", src.encoding)
        if why:
            problems.append(f"{key}.path: {why}")
    return problems


def _content_problem(key: str, file: str, fmt: str, encoding: str) -> str | None:
    """Whether the head of `file` rules out reading it as `fmt`; None when it may be read."""
    try:
        with open(file, "rb") as f:
            head = f.read(PEEK_BYTES)
    except OSError as e:
        return f"{file} cannot be read: {e.strerror or e}; check its permissions"
    if not head:
        return None  # an empty file: no records, which ingest reports
    if fmt == "parquet":
        return None if head.startswith(b"PAR1") else \
            f"{file} is not a Parquet file (it does not start with PAR1); convert it, or fix its extension or format"
    if head.startswith(_NOT_UTF8_BOMS) or encoding.lower().replace("_", "-") not in ("utf-8", "utf8", "auto"):
        return None  # another encoding: the reader decodes it, row by row
    if encoding.lower() != "auto" and b"\0" in head:
        return (f"{file} is not UTF-8 text (NUL bytes in its first {len(head)} bytes): point the path at the record "
                f"files, or if it is UTF-16 text set {key}.encoding: utf-16")
    if fmt == "jsonl" and head.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"["):
        name = PurePosixPath(file).name
        return (f"{file} is a JSON array, not JSON Lines (one object a line); convert it with "
                f"jq -c '.[]' {name} > {PurePosixPath(name).stem}.jsonl")
    return None


# -- URIs -------------------------------------------------------------------------------------------
class _Probe(threading.Thread):
    """Lists one URI source in the background (a daemon: one that hangs is abandoned at the deadline)."""

    def __init__(self, src: DataSource) -> None:
        super().__init__(daemon=True, name=f"preflight {src.path}")
        self.src = src
        self.problem: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.problem = _list_uri(self.src)
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def result(self, key: str, deadline: float) -> list[str]:
        self.join(max(0.0, deadline - time.monotonic()))
        if self.is_alive():
            return [f"{key}.path: {self.src.path}: no answer within {URI_TIMEOUT_S:.0f} s"
                    f"{_endpoint(self.src)}; check {key}.storage_options and the network ({_OFFLINE_HINT})"]
        if self.error is not None:
            return [_uri_problem(key, self.src, self.error)]
        return [f"{key}.{self.problem}"] if self.problem else []


def _list_uri(src: DataSource) -> str | None:
    """`path: why` or `format: why` (relative to the source's key) for a URI that is there but holds nothing
    ingest reads; None when it does. Errors (credentials, network, missing) are raised."""
    import fsspec

    opts = dict(src.storage_options)
    if src.path.split("://", 1)[0].lower() == "s3" and "config_kwargs" not in opts:
        opts["config_kwargs"] = _S3_FAST  # fail in seconds, not after botocore's retries
    fs, root = fsspec.core.url_to_fs(src.path, **opts)
    if fs.info(root).get("type") == "directory":
        for _, _, files in fs.walk(root):
            if any(PurePosixPath(f).suffix in SUFFIXES for f in files):
                return None
        return (f"path: {src.path} holds no .jsonl, .csv or .parquet file (folders are read recursively); put the "
                "data files there or point the path at them")
    if file_format(src.path, src.format) is None:
        return (f"format: cannot tell the format of {src.path} from its extension; set the source's format to "
                "jsonl, csv or parquet")
    return None


def _endpoint(src: DataSource) -> str:
    opts = src.storage_options
    url = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    return f" from {url}" if url else ""


def _uri_problem(key: str, src: DataSource, e: BaseException) -> str:
    """One line for a URI that could not be listed, with what fixes it."""
    name, msg = type(e).__name__, _one_line(e)
    head = f"{key}.path: {src.path}"
    if "Credential" in name or "NoAuth" in name or "Authentication" in name:
        env = _CREDENTIALS.get(src.path.split("://", 1)[0].lower(), "the storage's credential variables")
        return (f"{head}: no usable credentials ({name}: {msg}); give them through the environment ({env}; on "
                "a cluster a Secret in kubernetes.secrets or the pod's service account), never in the config "
                f"({_OFFLINE_HINT})")
    if isinstance(e, FileNotFoundError):
        return f"{head} does not exist; correct the path (bucket and prefix)"
    if isinstance(e, PermissionError) or "AccessDenied" in msg or "Forbidden" in msg:
        return (f"{head}: access denied ({msg}); the credentials in the environment may not list it: grant "
                "list and read on the bucket or prefix")
    if isinstance(e, (ImportError, ValueError)) and not isinstance(e, UnicodeError):
        return f"{head}: cannot open this URI: {msg}"
    if "Connect" in name or "Timeout" in name or isinstance(e, (OSError, TimeoutError)):
        return (f"{head}: cannot reach the storage service{_endpoint(src)} ({name}: {msg}); check "
                f"{key}.storage_options.endpoint_url and the network ({_OFFLINE_HINT})")
    return f"{head}: cannot be listed ({name}: {msg}) ({_OFFLINE_HINT})"


# -- the other files a run reads ----------------------------------------------------------------------
def _other_files(cfg: RunConfig) -> list[str]:
    """Local files and folders named outside data.sources/eval. pkg:// specs and spaCy package names are not
    checked: whether a package is installed depends on the image a stage runs in, not on the config."""
    specs = []
    if cfg.data.drift.enabled and cfg.data.drift.embeddings:
        specs.append(("data.drift.embedding_model", cfg.data.drift.embedding_model))
    model = cfg.data.pii.nlp_model
    if cfg.data.pii.enabled and model and ("/" in model or model.startswith(".")):
        specs.append(("data.pii.nlp_model", model))
    if cfg.evaluate.safety is not None:
        specs += [(f"evaluate.safety.prompt_files[{i}]", f) for i, f in enumerate(cfg.evaluate.safety.prompt_files)]
    if cfg.deploy.canary.traffic_file:
        specs.append(("deploy.canary.traffic_file", cfg.deploy.canary.traffic_file))
    problems = []
    for key, spec in specs:
        if is_uri(spec) or _elsewhere(cfg, spec) or (key == "data.drift.embedding_model" and "/" not in spec):
            continue
        path = Path(spec)
        if not path.exists():
            where = "" if path.is_absolute() else f" (relative to the current folder, {Path.cwd()})"
            problems.append(f"{key}: {spec} does not exist{where}; correct the path")
    return problems
