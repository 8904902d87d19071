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
- Storage Commitment (`storage_commitment = true`, `dicom_node.storage_commitment`):
  the round's stored objects are asked to be committed on the same
  association (N-ACTION), which is then held open `storage_commitment_wait_s`
  for a report on it; a report on a new association to the node's port counts
  the same. No report within `storage_commitment_timeout_s`: failed. A refused
  N-ACTION is classified like a C-STORE status and the objects are sent again.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node import export_status
from dicom_node.association import request_association, scu_ae
from dicom_node.logging_setup import get_logger
from dicom_node.settings import ConfigError, Destination, ExportSettings
from dicom_node.storage_commitment import (
    PUSH_MODEL_INSTANCE,
    REQUEST_ACTION_TYPE,
    CommitmentReceiver,
    commitment_request,
)
from dicom_node.tls import client_ssl_context
from storage.database import Database
from storage.exports import RetryPolicy, due_exports, expire_commitments, record_attempt, request_commitment
from storage.instance_store import InstanceStore
from storage.models import Export
from storage.write_retry import retry_write

log = get_logger(__name__)

# Transfer syntaxes proposed for every object, in order of preference (the outputs are written Explicit VR LE).
PROPOSED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
DEFAULT_COMMITMENT_TIMEOUT_S = Destination.model_fields["storage_commitment_timeout_s"].default


def requested_contexts(sop_class_uids: set[str], storage_commitment: bool) -> list[tuple[str, list[str]]]:
    """The presentation contexts (SOP class, transfer syntaxes) a round proposes; the Conformance Statement's too."""
    contexts = [(uid, PROPOSED_TRANSFER_SYNTAXES) for uid in sorted(sop_class_uids)]
    if storage_commitment:
        contexts.append((StorageCommitmentPushModel, PROPOSED_TRANSFER_SYNTAXES))
    return contexts


class Outcome(NamedTuple):
    """One attempt's result: delivered, or failed with the reason and whether a retry can help.

    `new_attempt` False: the outcome ends an attempt already counted (a refused Storage Commitment request).
    """

    delivered: bool
    message: str
    permanent: bool = False
    new_attempt: bool = True


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
        self.commitments = CommitmentReceiver(db)

    def dispatch(self) -> list[_Round]:
        """Start a round for each destination with due exports and no round in flight; do not wait.

        What the service's scheduler calls: a destination that hangs keeps only its own round busy.
        """
        with self._lock:
            self._expire_commitments()
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

    def _expire_commitments(self) -> None:
        """Fail the objects whose Storage Commitment report is overdue (their jobs then settle)."""
        timeouts = {d.name: d.storage_commitment_timeout_s for d in self.destinations.values()}
        try:
            expired = expire_commitments(self.db, timeouts, DEFAULT_COMMITMENT_TIMEOUT_S)
        except Exception:  # the job store is down: the next dispatch tries again
            log.exception("export.commitment_expiry_failed")
            return
        if expired:
            log.warning("export.commitment_timed_out", exports=expired)

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
                    self.db,
                    export.id,
                    outcome.delivered,
                    outcome.message,
                    self.policy,
                    permanent=outcome.permanent,
                    new_attempt=outcome.new_attempt,
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
        for class_uid, syntaxes in requested_contexts(
            {e.sop_class_uid for e in exports}, destination.storage_commitment
        ):
            ae.add_requested_context(class_uid, syntaxes)
        transaction_uid, reported = generate_uid(prefix=None), threading.Event()
        handlers = []
        if destination.storage_commitment:

            def on_report(event: evt.Event) -> tuple[int, None]:
                status, report = self.commitments.receive(event)
                if report is not None and report.transaction_uid == transaction_uid:
                    reported.set()
                return status, None

            handlers.append((evt.EVT_N_EVENT_REPORT, on_report))
        try:
            request = request_association(
                ae,
                destination.host,
                destination.port,
                ae_title=destination.ae_title,
                ssl_context=ssl_context,
                evt_handlers=handlers,
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
            stored = []
            for export in exports:
                outcome = self._store_one(assoc, export, where)
                if outcome.delivered and destination.storage_commitment:
                    stored.append(export)  # delivered only once committed
                else:
                    self._record(export, outcome, recorded)
            if stored and self._request_commitment(assoc, where, stored, transaction_uid, recorded):
                reported.wait(destination.storage_commitment_wait_s)
        finally:
            if assoc.is_established:
                assoc.release()

    def _request_commitment(
        self, assoc, where: str, exports: list[Export], transaction_uid: str, recorded: set[int]
    ) -> bool:
        """Mark `exports` committing under `transaction_uid`, then send the N-ACTION; whether it was accepted."""
        if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
            message = (
                f"{where} stored it but does not accept Storage Commitment Push Model (presentation context"
                " rejected); set storage_commitment = false for this destination, or enable it on the peer"
            )
            self._record_all(exports, Outcome(False, message, permanent=True), recorded)
            return False
        recorded.update(e.id for e in exports)  # from here on, an unrecorded row is simply sent again
        try:
            retry_write(
                lambda: request_commitment(self.db, [e.id for e in exports], transaction_uid),
                f"commitment request {transaction_uid}",
            )
        except Exception:
            log.exception("export.commitment_record_failed", transaction_uid=transaction_uid)
            return False
        request = commitment_request(transaction_uid, [(e.sop_class_uid, e.sop_instance_uid) for e in exports])
        try:
            status, _ = assoc.send_n_action(
                request, REQUEST_ACTION_TYPE, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE
            )
        except Exception as exc:  # pynetdicom: the request cannot be encoded or sent
            status, error = None, f": {exc}"
        else:
            error = ""
        code = int(status.Status) if status and "Status" in status else None
        if code is not None and export_status.delivered(code):
            log.info("export.commitment_requested", destination=where, transaction_uid=transaction_uid)
            return True
        if code is None:
            outcome = Outcome(False, f"{where} did not answer the Storage Commitment request{error}", new_attempt=False)
        else:
            outcome = Outcome(
                False,
                f"{where} refused the Storage Commitment request (N-ACTION status {export_status.describe(code)})",
                export_status.is_permanent(code),
                new_attempt=False,
            )
        for export in exports:
            recorded.discard(export.id)
        self._record_all(exports, outcome, recorded)
        return False

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
