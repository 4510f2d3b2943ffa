"""`tuneloop monitor`'s latest report (monitor.prom, Prometheus textfile format) served on a server's /metrics,
validated first, so that no textfile collector is needed next to the monitor's output."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneloop.feedback")

MONITOR_REPORTS_ENV = "TUNELOOP_MONITOR_REPORTS"  # the feedback service's: the monitor's output (folder or file)
_REPORT_FOLDER = re.compile(r"^\d{8}-\d{6}$")  # `tuneloop monitor`'s default: <state_dir>/monitor/<%Y%m%d-%H%M%S>


class MonitorReportCollector:
    """`tuneloop monitor`'s latest gauges (its monitor.prom, Prometheus textfile format) on /metrics, so that
    no textfile collector is needed next to the monitor's output. `path`: a monitor.prom file, or the folder
    of the monitor's timestamped report folders (`<state_dir>/monitor`: the newest that holds a monitor.prom
    is served).

    The file is validated before any of it is served: it must parse (prometheus_client's parser), end with
    a newline (a file still being written does not), stay under MAX_BYTES, name only `tuneloop_monitor_*`
    families (never this service's own) and no series twice; else none of it is served and
    `tuneloop_monitor_report_valid` is 0 - a broken file never breaks /metrics. Alongside:
      tuneloop_monitor_report_age_seconds   seconds since the served file was written (alert on staleness)
      tuneloop_monitor_report_valid         1 when the newest report's gauges are served, 0 when it is refused
    (both absent while there is no report at all). A report is read and parsed once (cached by path,
    modification time and size); the folder is listed again only when its own modification time changes.
    Runs that left a folder without a monitor.prom (failed, or still running) are passed over: the last
    report goes on being served, and ages."""

    MAX_BYTES = 4 * 1024 * 1024
    OWN = ("tuneloop_monitor_report_age_seconds", "tuneloop_monitor_report_valid")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._listing: tuple[int, list[str]] | None = None  # (folder mtime_ns, report folders newest first)
        self._found: str | None = None  # the newest report folder known to hold a monitor.prom
        self._cache: tuple[tuple[str, int, int], list[Any] | None] | None = None
        self._lock = threading.Lock()

    def _report(self) -> Path | None:
        """The file to serve. In a folder of report folders: the newest that holds a monitor.prom. Only the
        folders newer than the last one found are looked into (a run in progress, runs that failed), so a
        scrape costs a stat or two, however many reports have piled up."""
        p = self.path
        if p.suffix == ".prom" or p.is_file():
            return p if p.is_file() else None
        try:
            mtime = p.stat().st_mtime_ns
            if self._listing is None or self._listing[0] != mtime:
                names = sorted((e.name for e in os.scandir(p) if _REPORT_FOLDER.match(e.name)), reverse=True)
                self._listing = (mtime, names)
        except OSError:
            self._listing = None
            return p / "monitor.prom" if (p / "monitor.prom").is_file() else None
        if self._found is not None and not (p / self._found / "monitor.prom").is_file():
            self._found = None  # removed (a clean-up): look through all of them again
        for name in self._listing[1]:
            if self._found is not None and name <= self._found:
                break
            if (p / name / "monitor.prom").is_file():
                self._found = name
                break
        if self._found is not None:
            return p / self._found / "monitor.prom"
        return p / "monitor.prom" if (p / "monitor.prom").is_file() else None

    def _families(self, f: Path, key: tuple[str, int, int]) -> list[Any] | None:
        """The file's families, or None (logged once per version of the file) when it is refused."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            if key[2] > self.MAX_BYTES:
                raise ValueError(f"{key[2]} bytes; the limit is {self.MAX_BYTES}")
            text = f.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                raise ValueError("it does not end with a newline (still being written?)")
            families = list(text_string_to_metric_families(text))
            seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
            for fam in families:
                if not fam.name.startswith("tuneloop_monitor_") or fam.name in self.OWN:
                    raise ValueError(f"family {fam.name!r} is not one of the monitor's gauges")
                for s in fam.samples:
                    series = (s.name, tuple(sorted(s.labels.items())))
                    if series in seen:
                        raise ValueError(f"series {s.name}{dict(s.labels)} appears twice")
                    seen.add(series)
            return families
        except Exception as e:  # noqa: BLE001 - parse errors are ValueErrors, reading may fail otherwise
            log.error("monitor report %s not served: %s", f, e)
            return None

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            try:
                f = self._report()
                st = f.stat() if f is not None else None
            except OSError:
                f, st = None, None
            if f is None or st is None:
                return
            key = (str(f), st.st_mtime_ns, st.st_size)
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self._families(f, key))
            families = self._cache[1]
        yield GaugeMetricFamily(self.OWN[0], "Seconds since tuneloop monitor wrote the report served here",
                                value=max(0.0, time.time() - st.st_mtime))
        yield GaugeMetricFamily(self.OWN[1], "1 when the newest monitor report's gauges are served, 0 when it "
                                "was refused (unparsable, incomplete, too large or naming other families)",
                                value=float(families is not None))
        yield from families or []
