"""C-STORE SCU export of results to the configured destinations (PACS, TPS).

Runs as an APScheduler interval job: every due export is grouped by
destination and sent over one association per destination; each object's
outcome is recorded as an attempt (`storage.exports.record_attempt`), which
schedules the retry with backoff or settles the job. A destination that
refuses the association, drops it, answers with a failure status or does not
answer within the DIMSE timeout is a failed attempt, never a lost result.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.status import code_to_category

from dicom_node.association import request_association, scu_ae
from dicom_node.logging_setup import get_logger
from dicom_node.settings import Destination, ExportSettings
from dicom_node.tls import client_ssl_context
from storage.database import Database
from storage.exports import RetryPolicy, due_exports, record_attempt
from storage.instance_store import InstanceStore
from storage.models import Export

log = get_logger(__name__)


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
        self._lock = threading.Lock()  # one export round at a time
        self.on_attempt: Callable[[str, bool], None] | None = None  # (destination, delivered): metrics

    def run_once(self) -> int:
        """Send every due export; returns how many attempts were made."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            by_destination: dict[str, list[Export]] = defaultdict(list)
            for export in due_exports(self.db):
                by_destination[export.destination].append(export)
            for name, exports in by_destination.items():
                self._send(name, exports)
            return sum(len(v) for v in by_destination.values())
        finally:
            self._lock.release()

    def _record(self, export: Export, delivered: bool, message: str) -> None:
        record_attempt(self.db, export.id, delivered, message, self.policy)
        if self.on_attempt is not None:
            self.on_attempt(export.destination, delivered)
        event = "export.delivered" if delivered else "export.failed"
        (log.info if delivered else log.warning)(
            event,
            job_id=export.job_id,
            destination=export.destination,
            sop_instance_uid=export.sop_instance_uid,
            message=message,
        )

    def _send(self, name: str, exports: list[Export]) -> None:
        destination = self.destinations.get(name)
        if destination is None:
            for export in exports:
                self._record(export, False, f"destination {name!r} is not in the configuration")
            return
        ae = scu_ae(destination.calling_ae_title or self.node_ae_title, self.dimse_timeout_s)
        for class_uid in sorted({e.sop_class_uid for e in exports}):
            ae.add_requested_context(class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ssl_context = client_ssl_context(destination.tls)
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        try:
            request = request_association(
                ae, destination.host, destination.port, ae_title=destination.ae_title, ssl_context=ssl_context
            )
        except Exception as exc:  # e.g. TLS handshake failure
            for export in exports:
                self._record(export, False, f"could not connect to {where}: {exc}")
            return
        assoc = request.assoc
        if request.rejected:
            for export in exports:
                self._record(export, False, f"{where} rejected the association ({request.rejection})")
            return
        if not assoc.is_established:
            why = "could not be reached or aborted"
            if ssl_context is not None:
                why += " (TLS: the handshake may have failed; check the certificates and CA)"
            for export in exports:
                self._record(export, False, f"{where} {why}")
            return
        try:
            for export in exports:
                self._record(export, *self._store_one(assoc, export, where))
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_one(self, assoc, export: Export, where: str) -> tuple[bool, str]:
        try:
            ds = pydicom.dcmread(self.store.absolute(export.path))
        except Exception as exc:
            return False, f"output file unreadable: {exc}"
        if not assoc.is_established:
            return False, f"{where} dropped the association"
        status = assoc.send_c_store(ds)
        if not status or "Status" not in status:
            return False, f"{where} did not answer (timeout or connection dropped)"
        code = int(status.Status)
        category = code_to_category(code)
        if category in ("Success", "Warning"):
            return True, f"delivered to {where} (status 0x{code:04X} {category})"
        return False, f"{where} answered failure status 0x{code:04X}"
