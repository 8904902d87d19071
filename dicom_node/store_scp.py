"""The Store SCP: C-ECHO and C-STORE, association policy, nothing acknowledged is lost.

Handlers are thin: check free space, read the header, call
`storage.ingest.store_instance` (file fsync'd and row committed before it
returns), map what went wrong to a named status. The encoded data set is
stored exactly as received (no decode/re-encode), so compressed transfer
syntaxes are kept bit-for-bit and decoded only at inference time.

Association policy: the called AE title must be ours; calling AE titles and
source addresses are checked against the allow-lists when those are set (an
address outside the list has its TCP connection closed before any PDU is
read); `max_associations` is enforced by pynetdicom with an A-ASSOCIATE-RJ
(transient, local limit exceeded) rather than a hang.
"""

from __future__ import annotations

import errno
import threading

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import status_codes
from dicom_node.logging_setup import get_logger
from dicom_node.settings import NodeSettings
from dicom_node.storage_commitment import CommitmentReceiver, accept_reports
from dicom_node.tls import server_ssl_context
from storage.database import Database
from storage.ingest import InstanceMeta, StoreOutcome, store_instance
from storage.instance_store import InstanceStore, InvalidUIDError

log = get_logger(__name__)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() if value not in (None, "") else None


def instance_meta(ds: Dataset, transfer_syntax_uid: str, calling_ae: str | None) -> InstanceMeta:
    """The header values the job store keeps; raises if the identifying UIDs are absent."""
    missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID") if k not in ds]
    if missing:
        raise InvalidUIDError(f"missing {', '.join(missing)}")
    return InstanceMeta(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(transfer_syntax_uid),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        study_date=_text(ds, "StudyDate"),
        accession_number=_text(ds, "AccessionNumber"),
        modality=_text(ds, "Modality"),
        series_description=_text(ds, "SeriesDescription"),
        calling_ae_title=calling_ae,
    )


class StoreSCP:
    """Receives instances into the instance store and job store."""

    def __init__(self, settings: NodeSettings, db: Database, store: InstanceStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self._server: ThreadedAssociationServer | None = None
        self.counts = {outcome: 0 for outcome in StoreOutcome}
        self._counts_lock = threading.Lock()

    # -- handlers ---------------------------------------------------------
    def handle_echo(self, event: evt.Event) -> int:
        return status_codes.SUCCESS

    def handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        calling_ae = event.assoc.requestor.ae_title
        free = self.store.free_bytes()
        if free < self.settings.min_free_disk_mb * 1024 * 1024:
            log.error(
                "store.refused_disk_full",
                free_mb=free // (1024 * 1024),
                threshold_mb=self.settings.min_free_disk_mb,
                calling_ae=calling_ae,
            )
            return status_codes.OUT_OF_RESOURCES
        try:
            ds = event.dataset
            meta = instance_meta(ds, event.file_meta.TransferSyntaxUID, calling_ae)
        except InvalidUIDError as exc:
            log.warning("store.rejected", reason=str(exc), calling_ae=calling_ae)
            return status_codes.CANNOT_UNDERSTAND
        except Exception as exc:  # undecodable header from a peer: refuse, keep serving
            log.warning("store.rejected", reason=f"unreadable data set: {exc}", calling_ae=calling_ae)
            return status_codes.CANNOT_UNDERSTAND
        bound = log.bind(
            sop_instance_uid=meta.sop_instance_uid,
            series_uid=meta.series_uid,
            study_uid=meta.study_uid,
            calling_ae=calling_ae,
        )
        if meta.sop_class_uid != event.request.AffectedSOPClassUID:
            bound.warning(
                "store.rejected",
                reason="SOP Class UID of the data set "
                f"({meta.sop_class_uid}) differs from the request's "
                f"({event.request.AffectedSOPClassUID})",
            )
            return status_codes.DATASET_DOES_NOT_MATCH_SOP_CLASS
        try:
            outcome = store_instance(self.db, self.store, meta, event.encoded_dataset())
        except InvalidUIDError as exc:
            bound.warning("store.rejected", reason=str(exc))
            return status_codes.CANNOT_UNDERSTAND
        except OSError as exc:
            bound.error("store.failed", reason=f"storage error: {exc}", disk_full=exc.errno == errno.ENOSPC)
            return status_codes.OUT_OF_RESOURCES
        except Exception as exc:  # database down or similar: refuse, never acknowledge
            bound.error("store.failed", reason=f"job store error: {exc}")
            return status_codes.OUT_OF_RESOURCES
        with self._counts_lock:
            self.counts[outcome] += 1
        if outcome is StoreOutcome.CONFLICT:
            bound.warning(
                "store.conflict",
                reason="same SOP Instance UID with different content; "
                "first version kept, new one saved under conflicts/",
            )
        else:
            bound.debug("store.ok", outcome=outcome.value)
        return status_codes.SUCCESS

    def handle_commitment_report(self, event: evt.Event) -> tuple[int, None]:
        """A destination's Storage Commitment report, on an association it opened to us (role reversal)."""
        return CommitmentReceiver(self.db).handle(event)

    def handle_rejected(self, event: evt.Event) -> None:
        log.warning(
            "association.rejected", calling_ae=event.assoc.requestor.ae_title, address=event.assoc.requestor.address
        )

    def handle_aborted(self, event: evt.Event) -> None:
        log.warning(
            "association.aborted", calling_ae=event.assoc.requestor.ae_title, address=event.assoc.requestor.address
        )

    def handle_conn_close(self, event: evt.Event) -> None:
        """Free the slot of a connection that closed before any A-ASSOCIATE-RQ.

        A TCP port check, a scanner or junk bytes close the connection before
        (or instead of) a request; pynetdicom would keep that acceptor waiting
        `acse_timeout` for a request that can no longer come, and
        `max_associations` such connections would refuse real peers meanwhile.
        The empty-queue wake-up is what the ACSE timeout itself does: end it.
        """
        assoc = event.assoc
        if assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
            assoc.dul.to_user_queue.put(None)

    # -- life cycle -------------------------------------------------------
    def _address_allowed(self, request, client_address) -> bool:
        allowed = self.settings.is_source_allowed(client_address[0])
        if not allowed:
            log.warning("association.refused_address", address=client_address[0])
        return allowed

    def build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.dimse_timeout = self.settings.dimse_timeout_s
        ae.network_timeout = self.settings.network_timeout_s
        ae.require_called_aet = True
        if self.settings.allowed_calling_aets:
            ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        accept_reports(ae)
        return ae

    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound (host, port)."""
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_N_EVENT_REPORT, self.handle_commitment_report),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
        ]
        ae = self.build_ae()
        self._server = ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=server_ssl_context(self.settings.tls),
        )
        self._server.verify_request = self._address_allowed  # type: ignore[method-assign]
        host, port = self._server.server_address[:2]
        log.info("scp.listening", ae_title=self.settings.ae_title, host=host, port=port, tls=self.settings.tls.enabled)
        return host, port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
