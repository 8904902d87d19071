"""Follows each incoming association from acceptance to the close of its connection.

Why a module of its own: the Store SCP stays a thin set of DIMSE handlers;
this is where an association becomes a row in the job store
(`storage.associations`), one INFO log line with its counts when it ends, and
Prometheus counts (`dicom_node.metrics`). Each association's counts are
touched only by that association's thread; a job-store error while recording
is logged and never breaks the association.

It also tells the series watcher which series an association is still
delivering (`SeriesDeliveries`): a series is never taken as complete while an
association that sent instances of it (stored, duplicates, `replace`
corrections) is open, and its quiet period counts from
the end of the last one, released or not. This knowledge lives in the
process that runs the SCP and its watcher (`serve`); other processes see
only the instances' times.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from pynetdicom import evt

from dicom_node.logging_setup import get_logger
from dicom_node.metrics import NodeMetrics
from storage.associations import (
    AssociationCounts,
    close_association,
    open_association,
    record_rejected,
    settle_interrupted,
)
from storage.database import Database
from storage.models import utcnow

log = get_logger(__name__)

ACCEPTED_OUTCOMES = ("stored", "duplicate", "conflict")  # anything else was refused


@dataclass
class _Followed:
    row_id: int | None
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    outcome: str = "closed"  # until released or aborted
    counts: AssociationCounts = field(default_factory=AssociationCounts)
    series: set[str] = field(default_factory=set)  # Series Instance UIDs it delivered accepted instances into


@dataclass(frozen=True)
class SeriesDelivery:
    """What this process saw of the associations that stored into one series."""

    open_associations: int  # still open
    ended_at: datetime | None  # when the last of them ended (UTC)
    ended_outcome: str | None  # how it ended: released, aborted, closed

    @property
    def released(self) -> bool:
        """The last association ended with an A-RELEASE (the sender said it was done)."""
        return self.open_associations == 0 and self.ended_outcome == "released"


class SeriesDeliveries:
    """Open and ended deliveries per series, written by association threads, read by the watcher."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._by_series: dict[str, SeriesDelivery] = {}

    def opened(self, series_uid: str) -> None:
        """An association stored its first new instance into the series."""
        with self._lock:
            was = self._by_series.get(series_uid, SeriesDelivery(0, None, None))
            self._by_series[series_uid] = SeriesDelivery(was.open_associations + 1, was.ended_at, was.ended_outcome)

    def ended(self, series_uids: Iterable[str], outcome: str) -> None:
        """An association that stored into these series ended (`outcome`: released, aborted, closed)."""
        now = self.clock()
        with self._lock:
            for uid in series_uids:
                was = self._by_series.get(uid, SeriesDelivery(1, None, None))
                self._by_series[uid] = SeriesDelivery(max(0, was.open_associations - 1), now, outcome)

    def state(self, series_uid: str) -> SeriesDelivery | None:
        """None when no association of this process stored into the series (recently)."""
        with self._lock:
            return self._by_series.get(series_uid)

    def forget(self, series_uid: str) -> None:
        """The series was routed: drop what ended (an open association stays followed)."""
        with self._lock:
            was = self._by_series.get(series_uid)
            if was is not None and was.open_associations == 0:
                del self._by_series[series_uid]

    def prune(self, ended_before: datetime, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Drop series whose deliveries all ended before `ended_before` (they no longer matter), except
        those in `keep` (series still to be decided: how their delivery ended decides them)."""
        with self._lock:
            for uid, was in list(self._by_series.items()):
                if uid in keep:
                    continue
                if was.open_associations == 0 and (was.ended_at is None or was.ended_at < ended_before):
                    del self._by_series[uid]


class AssociationTracker:
    def __init__(self, db: Database, metrics: NodeMetrics) -> None:
        self.db = db
        self.metrics = metrics
        self.node = socket.gethostname()
        self._open: dict[int, _Followed] = {}  # by id(assoc), until its connection closes
        self.deliveries = SeriesDeliveries()

    def settle_leftovers(self) -> None:
        """Before listening: this host's rows left `open` by a crash become `interrupted`."""
        count = self._record(settle_interrupted, self.node)
        if count:
            log.warning("association.interrupted_rows_settled", count=count)

    def handlers(self) -> list[tuple]:
        """The pynetdicom events only the tracker needs (the SCP forwards the others)."""
        return [(evt.EVT_ACCEPTED, self.accepted), (evt.EVT_RELEASED, self.released)]

    def accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        self.metrics.associations_active.inc()
        row_id = self._record(
            open_association,
            self.node,
            requestor.ae_title,
            event.assoc.acceptor.ae_title,
            requestor.address,
            requestor.port,
        )
        self._open[id(event.assoc)] = _Followed(row_id, requestor.ae_title, requestor.address)

    def released(self, event: evt.Event) -> None:
        self._set_outcome(event, "released")

    def aborted(self, event: evt.Event) -> None:
        self._set_outcome(event, "aborted")

    def stored(
        self, event: evt.Event, outcome: str, nbytes: int, seconds: float, series_uid: str | None = None
    ) -> None:
        """One C-STORE handled: `outcome` is a StoreOutcome value or the refusal's name.

        `series_uid`: the series the instance belongs to. Every accepted instance (stored, a
        duplicate, a conflict: a `replace` correction) makes the association a delivery into
        that series, so the series is not taken as complete while it is open."""
        self.metrics.observe_store(event.assoc.requestor.ae_title, outcome, nbytes, seconds)
        followed = self._open.get(id(event.assoc))
        if followed is not None:
            key = outcome if outcome in ACCEPTED_OUTCOMES else "refused"
            setattr(followed.counts, key, getattr(followed.counts, key) + 1)
            followed.counts.bytes_received += nbytes
            if outcome in ACCEPTED_OUTCOMES and series_uid is not None and series_uid not in followed.series:
                followed.series.add(series_uid)
                self.deliveries.opened(series_uid)

    def rejected(self, event: evt.Event) -> None:
        """An A-ASSOCIATE-RJ sent (called or calling AE policy, too many associations)."""
        requestor = event.assoc.requestor
        self.metrics.associations_rejected.labels("policy").inc()
        called = requestor.primitive.called_ae_title if requestor.primitive is not None else None
        self._record(record_rejected, requestor.ae_title, called, requestor.address, requestor.port, "A-ASSOCIATE-RJ")

    def refused_address(self, address: str, port: int) -> None:
        self.metrics.associations_rejected.labels("address").inc()
        self._record(record_rejected, None, None, address, port, "source address not allowed")

    def closed(self, event: evt.Event) -> None:
        """The connection closed: the row's end, the metrics and the one INFO line."""
        followed = self._open.pop(id(event.assoc), None)
        if followed is None:
            return
        counts = followed.counts
        self.deliveries.ended(followed.series, followed.outcome)
        self.metrics.associations_active.dec()
        self.metrics.associations.labels(self.metrics.ae_label(followed.calling_ae), followed.outcome).inc()
        if followed.row_id is not None:
            self._record(close_association, followed.row_id, followed.outcome, counts)
        log.info(
            "association.ended",
            calling_ae=followed.calling_ae,
            address=followed.address,
            outcome=followed.outcome,
            duration_s=round(time.monotonic() - followed.started, 3),
            instances=counts.instances,
            stored=counts.stored,
            duplicate=counts.duplicate,
            conflict=counts.conflict,
            refused=counts.refused,
            bytes=counts.bytes_received,
        )

    def _set_outcome(self, event: evt.Event, outcome: str) -> None:
        followed = self._open.get(id(event.assoc))
        if followed is not None:
            followed.outcome = outcome

    def _record(self, function, *args):
        try:
            return function(self.db, *args)
        except Exception as exc:
            log.error("association.record_failed", reason=str(exc))
            return None
