"""Series completion: a series is complete when no new instance arrived for the quiet period.

DIMSE has no "end of series" message, so completion is a timeout
(APScheduler interval job, `series.check_interval_s`). A complete series is
routed with the header of its first stored instance; the job is queued or
rejected with the reason (`storage.jobs.complete_series`). New instances
after that start a new delivery and, after another quiet period, a new job.

Each series is routed in isolation: a header that cannot be read or
routed (e.g. a malformed value in an attribute a rule matches on) fails that
series' job with the reason, and the other series proceed. One bad series
must never stall the watcher for every series after it.

The quiet period must elapse while the node is listening: nothing is routed
during the first quiet period after start-up, so a series whose sender was
still sending (or retrying) across a restart is not cut in two.
"""

from __future__ import annotations

import time

import pydicom

from dicom_node.logging_setup import get_logger
from dicom_node.routing import CompiledRule, route_series
from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import RoutingOutcome, complete_series, first_instance_path, series_ready_for_routing

log = get_logger(__name__)


class SeriesWatcher:
    def __init__(self, db: Database, store: InstanceStore, rules: list[CompiledRule], quiet_period_s: float) -> None:
        self.db = db
        self.store = store
        self.rules = rules
        self.quiet_period_s = quiet_period_s
        self._listening_since = time.monotonic()

    def route(self, series_id: int) -> RoutingOutcome:
        """Decide what to do with one complete series (never raises on bad input)."""
        relative = first_instance_path(self.db, series_id)
        if relative is None:
            return RoutingOutcome(None, None, [], "the series has no stored instance", failed=True)
        try:
            header = pydicom.dcmread(self.store.absolute(relative), stop_before_pixels=True)
        except Exception as exc:
            return RoutingOutcome(None, None, [], f"the series' header cannot be read: {exc}", failed=True)
        try:
            decision = route_series(self.rules, header)
        except Exception as exc:  # a value pydicom cannot convert, e.g. DS 'abc'
            return RoutingOutcome(
                None, None, [], f"routing failed on {relative.rsplit('/', 1)[-1]}: {exc}", failed=True
            )
        if decision.rule is None:
            return RoutingOutcome(None, None, [], decision.reason)
        rule = decision.rule
        return RoutingOutcome(rule.name, rule.model, list(rule.destinations), decision.reason)

    def check_once(self) -> list[int]:
        """Route every series that became complete; returns the job ids created or updated."""
        job_ids: list[int] = []
        if time.monotonic() - self._listening_since < self.quiet_period_s:
            return job_ids
        for series_id in series_ready_for_routing(self.db, self.quiet_period_s):
            try:
                outcome = self.route(series_id)
                job_id = complete_series(self.db, series_id, outcome)
            except Exception as exc:  # e.g. the database: this series is tried again next round, the others go on
                log.error("series.routing_failed", series_id=series_id, reason=str(exc))
                continue
            log.info(
                "series.complete", job_id=job_id, series_id=series_id, rule=outcome.rule_name, reason=outcome.reason
            )
            job_ids.append(job_id)
        return job_ids
