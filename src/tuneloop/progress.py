"""Progress of long loops as log lines with an ETA, for task logs (KFP, kubectl logs) where a
terminal progress bar would be one unreadable line: `evaluate candidate answers: 96/176 (55%)
elapsed 41s eta 34s`, at most every `every_s` seconds, plus the first and the last step."""

from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, what: str, total: int, log: logging.Logger | None = None, every_s: float = 10.0) -> None:
        self.what, self.total, self.every_s = what, max(int(total), 0), every_s
        self.log = log or logging.getLogger("tuneloop.progress")
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        now = time.monotonic()
        first, last = self.done == n, self.total and self.done >= self.total
        if first or last or now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        if not self.total:
            return f"{self.what}: {self.done} elapsed {elapsed:.0f}s"
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return (f"{self.what}: {self.done}/{self.total} ({self.done / self.total:.0%}) elapsed {elapsed:.0f}s "
                f"eta {eta:.0f}s")
