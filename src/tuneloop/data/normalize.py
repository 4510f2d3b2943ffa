"""Text normalization: the cleaning step ingest applies to every text field of a record.

Three steps, each switched by `data.normalize` and applied in this order:
    html_entities  html.unescape, once: `didn&#039;t` -> didn't, `&amp;` -> &
    unicode_nfc    unicodedata NFC: one code point for an accented letter however it was composed
    control_chars  C0/C1 control characters and DEL removed (tab, newline, carriage return kept)
Counts: how many texts each step changed, per source file, for the ingest report.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from typing import Any

from tuneloop.config.data import NormalizeConfig

STEPS = ("html_entities", "unicode_nfc", "control_chars")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class Normalizer:
    """Cleans texts (`clean`), counting per source what each step changed (`report`)."""

    def __init__(self, cfg: NormalizeConfig) -> None:
        self.cfg = cfg
        self.steps = [s for s in STEPS if getattr(cfg, s)]
        self.seen = 0
        self.changed: dict[str, Counter] = {}  # source -> step -> texts changed
        self.source = ""

    def clean(self, text: str) -> str:
        self.seen += 1
        for step in self.steps:
            new = _apply(step, text)
            if new != text:
                self.changed.setdefault(self.source, Counter())[step] += 1
                text = new
        return text

    def report(self) -> dict[str, Any]:
        total = sum(self.changed.values(), Counter())
        return {"steps": list(self.steps), "texts_seen": self.seen,
                "texts_changed": {s: total[s] for s in self.steps},
                "per_source": {src: dict(c) for src, c in sorted(self.changed.items())}}


def _apply(step: str, text: str) -> str:
    if step == "html_entities":
        return html.unescape(text) if "&" in text else text
    if step == "unicode_nfc":
        return text if text.isascii() or unicodedata.is_normalized("NFC", text) else \
            unicodedata.normalize("NFC", text)
    return _CONTROL.sub("", text)
