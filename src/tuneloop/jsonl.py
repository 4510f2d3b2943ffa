"""JSON Lines files between stages: one JSON object per line, utf-8, blank lines skipped.

For trusted files that tuneloop wrote itself (or a config names as-is): a bad line raises
json.JSONDecodeError. Untrusted input goes through tuneloop.data.readers instead, which
quarantines bad lines and names the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records one at a time (for files too large to hold)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of the file."""
    return list(iter_jsonl(path))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One line per row (non-ASCII kept as utf-8); returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
