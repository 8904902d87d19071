"""Series completion: when a received series is taken as whole and routed.

DIMSE has no "end of series" message, so completion is decided from three
things, checked every `[series] check_interval_s` (APScheduler):

- **The delivery.** While an association that stored into the series is open
  (`association_tracker.SeriesDeliveries`), the series waits. The quiet
  period counts from the end of the last such association (and never from
  before the series' last instance).
- **Its headers** (`series_completeness`): an expected count
  (ImagesInAcquisition), temporal or cardiac positions, gaps in the slice
  positions.
- **Two quiet periods.** `quiet_period_s` (short, default 5 s) after a
  released association, for a series that looks whole. `partial_quiet_period_s`
  (long, default 120 s) after its last instance, for a series that looks
  incomplete, whose association was aborted or dropped (unless a count shows
  it whole), or whose association stays open without sending.

When the long period is over, a series is decided whatever it looks like: an
incomplete one that a rule matches **fails** with the reason ("incomplete
series: 150 of 176 images (ImagesInAcquisition 176), InstanceNumber 151-176
missing"), so no partial RTSTRUCT reaches a planning system unseen. So does
one that looks whole but whose last association was aborted or closed
without A-RELEASE, unless a count shows it whole
("interrupted delivery: ..."): a transfer cut after slice 30 of 48 leaves
evenly spaced positions, and the missing slices may hold a metastasis. A
series whose association is still open waits, past the long period too,
until `[node] network_timeout_s` after its last instance: a silent association
is aborted by then (and its series fails as cut), so one still open has sent
since (other series) and has moved on: the series is routed. The job
keeps its rule, so `dicom-node jobs retry` runs it as it is when a physicist
decides so. If the rest arrives later, the series is a new delivery and gets
a new job. A series no rule matches is rejected after the short period
without its completeness being read: nothing will run on it.

Limit: a series without a count whose *trailing* slices are missing, sent
over an association that was released normally, has evenly spaced positions
and looks whole; it is routed after the short period. Likewise, a process that does not run the SCP (or another host's
SCP sharing the job store) does not see the associations: the quiet period
counts from the last instance.

Start-up: a series whose last instance reached a previous run of the process
is treated like one whose association was aborted (the stop or crash cut
it, and the sender may resume): it is routed before the long period only
when a count shows it whole, and its quiet periods count from when this
run's SCP listens. After the long period it is routed, not failed: this
process cannot tell a transfer the stop cut from one that ended before it,
and failing every series received just before a planned restart would be
wrong far more often (limit, as for another host's SCP). So a series whose sender was still sending across a restart is not
cut in two, even when the sender takes a while to resume.

Each series is decided in isolation: a header that cannot be read or routed
(e.g. a malformed value in an attribute a rule matches on) fails that
series' job with the reason, and the other series proceed. One bad series
must never stall the watcher for every series after it.

Time comes from `clock` (UTC now; tests inject a fake one), the same clock
as the job store's timestamps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import pydicom

from dicom_node.association_tracker import SeriesDeliveries, SeriesDelivery
from dicom_node.logging_setup import get_logger
from dicom_node.routing import CompiledRule, route_series
from dicom_node.series_completeness import Completeness, assess, read_slice_header
from storage.database import Database
from storage.instance_store import InstanceStore
from storage.jobs import (
    AwaitingSeries,
    RoutingOutcome,
    complete_series,
    first_instance_path,
    note_on_received_job,
    series_awaiting_routing,
    series_instance_paths,
)
from storage.models import utcnow

log = get_logger(__name__)


@dataclass(frozen=True)
class _Assessed:
    instance_count: int  # the verdicts below are about this many instances ...
    last_received_at: datetime  # ... as they were when the last of them arrived (a `replace` keeps the count)
    outcome: RoutingOutcome
    completeness: Completeness | None  # None: not read (no rule matched, routing failed)


class SeriesWatcher:
    def __init__(
        self,
        db: Database,
        store: InstanceStore,
        rules: list[CompiledRule],
        quiet_period_s: float,
        partial_quiet_period_s: float | None = None,
        deliveries: SeriesDeliveries | None = None,
        clock: Callable[[], datetime] = utcnow,
        idle_abort_s: float = 0.0,
    ) -> None:
        self.db = db
        self.store = store
        self.rules = rules
        self.quiet_period_s = quiet_period_s
        self.partial_quiet_period_s = max(quiet_period_s, partial_quiet_period_s or quiet_period_s)
        self.deliveries = deliveries
        self.clock = clock
        # After this long without a PDU the node aborts an association (`[node] network_timeout_s`): one
        # still open so long after the series' last instance has sent since, so it is not a cut one.
        self.idle_abort_s = idle_abort_s
        self.listening_since = clock()  # moved to when the SCP listens by the service
        self._assessed: dict[int, _Assessed] = {}  # by series id: headers are read again when instances arrive
        self._noted: set[tuple[int, int]] = set()  # (series id, instance count) whose wait is in the job's history

    def route(self, series_id: int) -> RoutingOutcome:
        """Decide what to do with one series by the header of its first instance (never raises on bad input)."""
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

    def completeness(self, series_id: int) -> Completeness:
        """The series' completeness from the headers of its stored instances."""
        paths = series_instance_paths(self.db, series_id)
        headers = []
        for relative in paths:
            try:
                headers.append(read_slice_header(self.store.absolute(relative)))
            except Exception as exc:  # the engine fails the series with its own reason
                return Completeness(len(paths), None, None, f"{relative.rsplit('/', 1)[-1]} unreadable: {exc}")
        return assess(headers)

    def decide(self, series: AwaitingSeries, now: datetime) -> RoutingOutcome | None:
        """The outcome to record for a series now, or None while it waits (module doc)."""
        delivery = self.deliveries.state(series.series_uid) if self.deliveries is not None else None
        quiet_since = max(series.last_received_at, self.listening_since)
        if delivery is not None and delivery.ended_at is not None and delivery.open_associations == 0:
            quiet_since = max(quiet_since, delivery.ended_at)
        quiet_s = (now - quiet_since).total_seconds()
        if quiet_s < self.quiet_period_s:
            return None
        since_last = (now - max(series.last_received_at, self.listening_since)).total_seconds()
        final = since_last >= self.partial_quiet_period_s
        if delivery is not None and delivery.open_associations > 0 and (not final or since_last <= self.idle_abort_s):
            return None  # still open: sending, or silent until the node aborts it (`_cut`)
        assessed = self._assess(series)
        outcome, completeness = assessed.outcome, assessed.completeness
        if completeness is None:  # no rule, or routing failed: nothing will run on it
            return outcome
        described = completeness.describe()
        if completeness.incomplete:
            if not final:
                self._note_waiting(series, completeness)
                return None
            return replace(
                outcome,
                failed=True,
                reason=f"incomplete series: {completeness.missing}; waited {self.partial_quiet_period_s:g} s "
                "for the rest (`dicom-node jobs retry` runs it as it is)",
                completeness=described,
            )
        # Nothing seen missing. After an association that ended without A-RELEASE, only a met count routes
        # it before the long period; so too for a series last fed before this process started (its
        # association was cut by the stop or crash: the sender may resume). With no association seen
        # since (another process's SCP), the timing is all there is.
        if delivery is None:
            clean = series.last_received_at >= self.listening_since
        else:
            clean = delivery.released
        if not (clean or completeness.confirmed or final):
            return None
        cut = self._cut(series, delivery) if not (clean or completeness.confirmed) else None
        if cut is not None:  # final, and the only evidence says the transfer was cut: fail, never route as whole
            return replace(
                outcome,
                failed=True,
                reason=f"interrupted delivery: {cut}, with {series.instance_count} instance(s) received, and no "
                "count (ImagesInAcquisition, positions) shows the series whole: its last slices may be missing; "
                f"waited {self.partial_quiet_period_s:g} s for the rest (`dicom-node jobs retry` runs it as it is)",
                completeness=described,
            )
        return replace(outcome, completeness=described)

    def _cut(self, series: AwaitingSeries, delivery: SeriesDelivery | None) -> str | None:
        """How the series' transfer was cut, if it was (module doc), else None. An association still open
        `idle_abort_s` after the series' last instance is not taken as cut: a silent one is aborted by the
        node by then, so one still open has sent since (other series): it has moved on."""
        if delivery is None:  # no association seen by this process (before a restart, or another host's SCP):
            return None  # a series received whole before a stop must not fail for it, so the timing decides
        if delivery.open_associations:  # open past `idle_abort_s`: it sent since, so it has moved on
            return None
        return f"the association that sent it {'was aborted' if delivery.ended_outcome == 'aborted' else 'closed without A-RELEASE'}"

    def check_once(self) -> list[int]:
        """Route every series that became complete; returns the job ids created or updated."""
        now = self.clock()
        job_ids: list[int] = []
        awaiting = series_awaiting_routing(self.db, self.quiet_period_s, self.clock)
        if self.deliveries is not None:  # never the delivery of a series still to decide: it says how it ended
            self.deliveries.prune(
                ended_before=now - timedelta(seconds=self.partial_quiet_period_s),
                keep={series.series_uid for series in awaiting},
            )
        for series in awaiting:
            try:
                outcome = self.decide(series, now)
                if outcome is None:
                    continue
                job_id = complete_series(self.db, series.series_id, outcome)
            except Exception as exc:  # e.g. the database: this series is tried again next round, the others go on
                log.error("series.routing_failed", series_id=series.series_id, reason=str(exc))
                continue
            self._assessed.pop(series.series_id, None)
            self._noted = {key for key in self._noted if key[0] != series.series_id}
            if self.deliveries is not None:
                self.deliveries.forget(series.series_uid)
            log.info(
                "series.complete",
                job_id=job_id,
                series_id=series.series_id,
                rule=outcome.rule_name,
                reason=outcome.reason,
                completeness=outcome.completeness,
            )
            job_ids.append(job_id)
        return job_ids

    def _note_waiting(self, series: AwaitingSeries, completeness: Completeness) -> None:
        """Once per instance count: the received job's history and the log say why the series waits."""
        key = (series.series_id, series.instance_count)
        if key in self._noted:
            return
        self._noted.add(key)
        message = f"waiting for the rest: {completeness.missing} (up to {self.partial_quiet_period_s:g} s)"
        note_on_received_job(self.db, series.series_id, message)
        log.info("series.incomplete_waiting", series_id=series.series_id, missing=completeness.missing)

    def _assess(self, series: AwaitingSeries) -> _Assessed:
        """Routing and completeness of the series as it is now, read again only when instances arrived
        (new ones, or corrections that replaced some: the count alone would miss those)."""
        cached = self._assessed.get(series.series_id)
        if cached is not None and (cached.instance_count, cached.last_received_at) == (
            series.instance_count,
            series.last_received_at,
        ):
            return cached
        outcome = self.route(series.series_id)
        completeness = None if outcome.rule_name is None or outcome.failed else self.completeness(series.series_id)
        assessed = _Assessed(series.instance_count, series.last_received_at, outcome, completeness)
        self._assessed[series.series_id] = assessed
        return assessed
