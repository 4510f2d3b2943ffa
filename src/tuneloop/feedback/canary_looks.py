"""Each look of a canary analysis, kept where a long-lived process can serve it on /metrics.

The canary analysis runs in a short-lived process (the analyze task: a KFP pod on a cluster, a CLI
run locally) that Prometheus cannot scrape. So every look it takes - each batch of the sequential
test, the single look of the fixed test - is a row of the table `canary_looks` in the feedback
store's database (sqlite in the state dir locally, the same Postgres on a cluster; a table of its own
on that engine: `CanaryLooks(store.engine)`), and the processes that are scraped - the feedback
service on a cluster, the local gateway - read the latest row at scrape time (`CanaryLookCollector`):

  tuneloop_canary_e_value{canary_version, metric, against}            the look's e-value per metric:
      against="no_difference" (harm: rollback once it reaches its threshold with the estimate beyond
      the margin), against="margin" (success: promote once every metric reaches its threshold)
  tuneloop_canary_e_value_threshold{canary_version, metric, against}  k/alpha and 1/alpha
  tuneloop_canary_look_requests{canary_version, variant}              requests per side at the look
  tuneloop_canary_look_decision{canary_version, decision}             1 for the look's decision
                                                                      (continue, promote, rollback)
  tuneloop_canary_looks{canary_version}                               looks taken so far
  tuneloop_canary_look_timestamp_seconds{canary_version}              when the look was taken
  tuneloop_canary_info{canary_version, champion_version, test}        1
  tuneloop_canary_look_read_failures_total                            scrapes whose read failed or
                                                                      timed out (no look served)

"The latest look" is the row with the highest id: one primary-key lookup per scrape, whatever the
table's size. A scrape waits at most `timeout_s` for it; a read still running (a hung database) is
not started again, so a stalled database holds one thread, not one per scrape.

This is the ground floor: it imports nothing of tuneloop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

log = logging.getLogger("tuneloop.feedback")
DECISIONS = ("continue", "promote", "rollback")
VARIANTS = ("canary", "champion")


class _Base(DeclarativeBase):
    pass


class CanaryLook(_Base):
    __tablename__ = "canary_looks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployed_at: Mapped[float] = mapped_column(Float)  # the analysis: its canary's deployment time
    canary_version: Mapped[str] = mapped_column(String(64), default="")
    champion_version: Mapped[str] = mapped_column(String(64), default="")
    look: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within the analysis
    created: Mapped[float] = mapped_column(Float)
    canary_requests: Mapped[int] = mapped_column(Integer, default=0)
    champion_requests: Mapped[int] = mapped_column(Integer, default=0)
    decision: Mapped[str] = mapped_column(String(16))  # continue | promote | rollback
    test: Mapped[str] = mapped_column(String(16))  # sequential | fixed
    # JSON {metric: {against: {"e_value": x, "threshold": t}}} (sequential); {} for the fixed test
    metrics: Mapped[str] = mapped_column(Text, default="{}")

    __table_args__ = (Index("ix_canary_looks_analysis", "deployed_at", "look"),)


def _create(engine: Any, attempts: int = 3) -> None:
    """The table (if missing). The analyze task and the feedback service's replicas may start together
    and race on the catalog (Postgres): the loser looks again."""
    for attempt in range(attempts):
        try:
            _Base.metadata.create_all(engine)
            return
        except (IntegrityError, OperationalError, ProgrammingError, DBAPIError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _as_dict(r: CanaryLook) -> dict[str, Any]:
    return {"deployed_at": r.deployed_at, "canary_version": r.canary_version,
            "champion_version": r.champion_version, "look": r.look, "created": r.created,
            "requests": {"canary": r.canary_requests, "champion": r.champion_requests},
            "decision": r.decision, "test": r.test, "metrics": json.loads(r.metrics or "{}")}


class CanaryLooks:
    """The table on an engine (the FeedbackStore's: `CanaryLooks(store.engine)`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        _create(engine)

    def add(self, *, deployed_at: float, look: int, decision: str, test: str, requests: dict[str, int],
            canary_version: str = "", champion_version: str = "", metrics: dict[str, Any] | None = None,
            created: float | None = None) -> None:
        """One look: `requests` per side (canary, champion); `metrics` {metric: {against: {"e_value",
        "threshold"}}} (the sequential test's; none for the fixed test)."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
        row = CanaryLook(deployed_at=float(deployed_at), look=int(look), decision=decision, test=test[:16],
                         canary_version=str(canary_version)[:64], champion_version=str(champion_version)[:64],
                         canary_requests=int(requests.get("canary", 0)),
                         champion_requests=int(requests.get("champion", 0)),
                         metrics=json.dumps(metrics or {}), created=time.time() if created is None else created)
        with Session(self.engine) as s, s.begin():
            s.add(row)

    def latest(self) -> dict[str, Any] | None:
        """The most recent look of any analysis (the highest id: a primary-key lookup); None if none."""
        with Session(self.engine) as s:
            r = s.scalars(select(CanaryLook).order_by(CanaryLook.id.desc()).limit(1)).first()
            return None if r is None else _as_dict(r)

    def looks(self, deployed_at: float) -> list[dict[str, Any]]:
        """Every look of one analysis (its canary's deployment time), in order."""
        with Session(self.engine) as s:
            q = select(CanaryLook).where(CanaryLook.deployed_at == deployed_at).order_by(CanaryLook.look)
            return [_as_dict(r) for r in s.scalars(q)]


class CanaryLookCollector:
    """The latest canary look as gauges (see the module's docstring), read at scrape time."""

    def __init__(self, looks: CanaryLooks, timeout_s: float = 2.0) -> None:
        self.looks, self.timeout_s = looks, timeout_s
        self.failures = 0
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._box: dict[str, Any] = {}

    def _query(self, box: dict[str, Any]) -> None:
        try:
            box["look"] = self.looks.latest()
        except Exception as e:  # noqa: BLE001 - reported by the scrape that waits for it
            box["error"] = e

    def _latest(self) -> dict[str, Any] | None:
        with self._lock:
            if self._reader is None or not self._reader.is_alive():
                self._box = {}
                self._reader = threading.Thread(target=self._query, args=(self._box,), name="canary-looks-read",
                                                daemon=True)
                self._reader.start()
            reader, box = self._reader, self._box
        reader.join(self.timeout_s)
        if reader.is_alive():
            self.failures += 1
            log.warning("canary looks: the database did not answer within %.1f s; no look served", self.timeout_s)
            return None
        if "error" in box:
            self.failures += 1
            log.warning("canary looks: reading the latest look failed: %s", box["error"])
            return None
        return box.get("look")

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        look = self._latest()
        v = ["canary_version"]
        e_value = GaugeMetricFamily("tuneloop_canary_e_value", "E-value of the canary's latest look per metric: "
                                    "against no difference (harm) or the margin (success)",
                                    labels=[*v, "metric", "against"])
        threshold = GaugeMetricFamily("tuneloop_canary_e_value_threshold", "The e-value's rejection threshold "
                                      "(k/alpha against no difference, 1/alpha against the margin)",
                                      labels=[*v, "metric", "against"])
        requests = GaugeMetricFamily("tuneloop_canary_look_requests", "Requests per side at the canary's latest look",
                                     labels=[*v, "variant"])
        decision = GaugeMetricFamily("tuneloop_canary_look_decision", "1 for the decision of the canary's latest "
                                     "look (continue, promote, rollback), 0 for the others", labels=[*v, "decision"])
        looks = GaugeMetricFamily("tuneloop_canary_looks", "Looks the canary analysis has taken", labels=v)
        when = GaugeMetricFamily("tuneloop_canary_look_timestamp_seconds", "When the canary's latest look was taken",
                                 labels=v)
        info = GaugeMetricFamily("tuneloop_canary_info", "The canary under analysis: its champion and test",
                                 labels=[*v, "champion_version", "test"])
        if look is not None:
            cv = look["canary_version"]
            for metric, tests in sorted(look["metrics"].items()):
                for against, t in sorted((tests or {}).items()):
                    if isinstance(t, dict) and isinstance(t.get("e_value"), (int, float)):
                        e_value.add_metric([cv, metric, against], float(t["e_value"]))
                        if isinstance(t.get("threshold"), (int, float)):
                            threshold.add_metric([cv, metric, against], float(t["threshold"]))
            for variant in VARIANTS:
                requests.add_metric([cv, variant], look["requests"][variant])
            for d in DECISIONS:
                decision.add_metric([cv, d], float(look["decision"] == d))
            looks.add_metric([cv], look["look"])
            when.add_metric([cv], look["created"])
            info.add_metric([cv, look["champion_version"], look["test"]], 1.0)
        yield from (e_value, threshold, requests, decision, looks, when, info)
        yield CounterMetricFamily("tuneloop_canary_look_read_failures", "Scrapes whose read of the latest canary "
                                  "look failed or timed out (no look served)", value=self.failures)
