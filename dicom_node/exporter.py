"""C-STORE SCU export of results to the configured destinations (PACS, TPS).

Decisions:

- Every outcome is recorded per (object, destination) as an attempt
  (`storage.exports.record_attempt`), which schedules the retry with backoff or
  settles the job. Nothing a destination does, and no error while sending one
  object, can leave a row unrecorded at the head of the queue.
- Destinations are served concurrently: each round of a destination runs in
  its own thread, at most one per destination at a time (a round still in
  flight is not started again). A peer that hangs until the DIMSE timeout
  delays only its own rows. Bounded by the number of configured destinations.
- Failures are classified (`dicom_node.export_status` for response statuses).
  Permanent, failed at once: a presentation context the peer rejected (it does
  not take that SOP class, e.g. a TPS refusing Comprehensive 3D SR), no
  accepted context at all, A-ASSOCIATE-RJ *rejected-permanent*, TLS files that
  cannot be loaded, an unconfigured destination, an unreadable output file.
  Transient, retried: connection refused or dropped, timeouts,
  *rejected-transient*, 0xA7xx.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node import export_status
from dicom_node.association import request_association, scu_ae
from dicom_node.logging_setup import get_logger
from dicom_node.settings import ConfigError, Destination, ExportSettings
from dicom_node.tls import client_ssl_context
from storage.database import Database
from storage.exports import RetryPolicy, due_exports, record_attempt
from storage.instance_store import InstanceStore
from storage.models import Export
from storage.write_retry import retry_write

log = get_logger(__name__)


class Outcome(NamedTuple):
    """One attempt's result: delivered, or failed with the reason and whether a retry can help."""

    delivered: bool
    message: str
    permanent: bool = False


class _Round(threading.Thread):
    """One destination's round: its due exports, sent over one association."""

    def __init__(self, destination: str, exports: list[Export], send: Callable[[str, list[Export]], None]) -> None:
        super().__init__(target=send, args=(destination, exports), name=f"export-{destination}", daemon=True)
        self.exports = exports


class Exporter:
    def __init__(
        self,
        db: Database,
        store: InstanceStore,
        destinations: list[Destination],
        settings: ExportSettings,
        node_ae_title: str,
        dimse_timeout_s: float = 60,
    ) -> None:
        self.db = db
        self.store = store
        self.destinations = {d.name: d for d in destinations}
        self.policy = RetryPolicy(settings.retry_initial_s, settings.retry_max_interval_s, settings.give_up_after_s)
        self.node_ae_title = node_ae_title
        self.dimse_timeout_s = dimse_timeout_s
        self._lock = threading.Lock()  # one dispatch at a time
        self._rounds: dict[str, _Round] = {}  # destination -> its latest round
        self.on_attempt: Callable[[str, bool], None] | None = None  # (destination, delivered): metrics

    def dispatch(self) -> list[_Round]:
        """Start a round for each destination with due exports and no round in flight; do not wait.

        What the service's scheduler calls: a destination that hangs keeps only its own round busy.
        """
        with self._lock:
            # Busy before reading the rows: a round that ends in between has recorded its rows by then,
            # so none of them is read as still due and sent twice.
            busy = {name for name, running in self._rounds.items() if running.is_alive()}
            by_destination: dict[str, list[Export]] = defaultdict(list)
            for export in due_exports(self.db):
                if export.destination not in busy:
                    by_destination[export.destination].append(export)
            started = []
            for name, exports in by_destination.items():
                self._rounds[name] = _Round(name, exports, self._round)
                self._rounds[name].start()
                started.append(self._rounds[name])
            return started

    def run_once(self) -> int:
        """Start the due rounds and wait for them; returns how many attempts were made."""
        started = self.dispatch()
        for thread in started:
            thread.join()
        return sum(len(thread.exports) for thread in started)

    def stop(self, timeout_s: float = 10) -> None:
        """Wait up to `timeout_s` in all for rounds in flight (an unrecorded attempt is simply made again)."""
        with self._lock:
            rounds = list(self._rounds.values())
        deadline = time.monotonic() + timeout_s
        for thread in rounds:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _round(self, name: str, exports: list[Export]) -> None:
        """One destination's round; whatever goes wrong, every row gets an outcome."""
        recorded: set[int] = set()
        try:
            self._send(name, exports, recorded)
        except Exception as exc:
            log.exception("export.round_failed", destination=name)
            outcome = Outcome(False, f"internal error while sending to {name!r}: {type(exc).__name__}: {exc}")
            for export in exports:
                if export.id not in recorded:
                    self._record(export, outcome, recorded)

    def _record(self, export: Export, outcome: Outcome, recorded: set[int]) -> None:
        recorded.add(export.id)
        try:
            retry_write(
                lambda: record_attempt(
                    self.db, export.id, outcome.delivered, outcome.message, self.policy, permanent=outcome.permanent
                ),
                f"export {export.id} attempt",
            )
        except Exception:  # the store stays broken: the row is still due and is tried again next round
            log.exception("export.record_failed", export_id=export.id, job_id=export.job_id)
            return
        if self.on_attempt is not None:
            self.on_attempt(export.destination, outcome.delivered)
        event = "export.delivered" if outcome.delivered else "export.failed"
        (log.info if outcome.delivered else log.warning)(
            event,
            job_id=export.job_id,
            destination=export.destination,
            sop_instance_uid=export.sop_instance_uid,
            message=outcome.message,
            permanent=outcome.permanent,
        )

    def _record_all(self, exports: list[Export], outcome: Outcome, recorded: set[int]) -> None:
        for export in exports:
            self._record(export, outcome, recorded)

    def _send(self, name: str, exports: list[Export], recorded: set[int]) -> None:
        destination = self.destinations.get(name)
        if destination is None:
            outcome = Outcome(False, f"destination {name!r} is not in the configuration", permanent=True)
            return self._record_all(exports, outcome, recorded)
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        try:
            ssl_context = client_ssl_context(destination.tls)
        except ConfigError as exc:
            outcome = Outcome(False, f"destination {name!r}: TLS cannot be set up: {exc}", permanent=True)
            return self._record_all(exports, outcome, recorded)
        ae = scu_ae(destination.calling_ae_title or self.node_ae_title, self.dimse_timeout_s)
        for class_uid in sorted({e.sop_class_uid for e in exports}):
            ae.add_requested_context(class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            request = request_association(
                ae, destination.host, destination.port, ae_title=destination.ae_title, ssl_context=ssl_context
            )
        except Exception as exc:  # e.g. TLS handshake failure
            return self._record_all(exports, Outcome(False, f"could not connect to {where}: {exc}"), recorded)
        if request.rejected:
            outcome = Outcome(
                False, f"{where} rejected the association ({request.rejection})", request.rejected_permanently
            )
            return self._record_all(exports, outcome, recorded)
        if request.contexts_refused:
            message = f"{where} accepted none of the proposed presentation contexts: {request.contexts_refused}"
            return self._record_all(exports, Outcome(False, message, permanent=True), recorded)
        assoc = request.assoc
        if not assoc.is_established:
            why = "could not be reached or aborted"
            if ssl_context is not None:
                why += " (TLS: the handshake may have failed; check the certificates and CA)"
            return self._record_all(exports, Outcome(False, f"{where} {why}"), recorded)
        try:
            for export in exports:
                self._record(export, self._store_one(assoc, export, where), recorded)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_one(self, assoc, export: Export, where: str) -> Outcome:
        sop_class = UID(export.sop_class_uid)
        refused = [cx.status for cx in assoc.rejected_contexts if cx.abstract_syntax == sop_class]
        if refused:
            return Outcome(
                False,
                f"{where} does not accept {sop_class.name}: presentation context rejected ({refused[0]});"
                f" leave {export.sop_class_name()} out of this destination's `objects`",
                permanent=True,
            )
        try:
            ds = pydicom.dcmread(self.store.absolute(export.path))
        except Exception as exc:
            return Outcome(False, f"output file {export.path} unreadable: {exc}", permanent=True)
        if not assoc.is_established:
            return Outcome(False, f"{where} dropped the association")
        try:
            status = assoc.send_c_store(ds)
        except ValueError as exc:  # pynetdicom: no accepted context fits, or the data set cannot be encoded
            return Outcome(False, f"{where}: cannot send {sop_class.name}: {exc}", permanent=True)
        if not status or "Status" not in status:
            return Outcome(False, f"{where} did not answer (timeout or connection dropped)")
        code = int(status.Status)
        if export_status.delivered(code):
            return Outcome(True, f"delivered to {where} (status {export_status.describe(code)})")
        return Outcome(
            False, f"{where} answered failure status {export_status.describe(code)}", export_status.is_permanent(code)
        )
