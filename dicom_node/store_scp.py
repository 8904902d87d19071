"""The Store SCP: C-ECHO and C-STORE, association policy, nothing acknowledged is lost.

Handlers are thin: check free space, read the header elements the job store
needs (`dicom_node.instance_header`) from the file the data set streamed into
(`dicom_node.scp_transport`),
call `storage.ingest.store_instance` (that file fsync'd, renamed into place and
its row committed before it returns), map what went wrong to a named status
(an instance whose UIDs or PatientID contradict the stored study and series:
0xC000, `storage.ingest.IdentityConflict`), with an Error Comment that tells
the sender's operator why in a few words (the details, with UIDs, are logged).
The encoded data set is stored exactly as received (no decode/re-encode), so
compressed transfer syntaxes are kept bit-for-bit and decoded only at
inference time.

Association policy: the called AE title must be ours; calling AE titles and
source addresses are checked against the allow-lists when those are set (an
address outside the list has its TCP connection closed before any PDU is
read); `max_associations` is enforced by pynetdicom with an A-ASSOCIATE-RJ
(transient, local limit exceeded) rather than a hang. Source addresses are
checked before any TLS handshake; what is accepted: `dicom_node.negotiation`.

Each association is followed by `AssociationTracker` (a row, one INFO line,
metrics); each instance keeps its source address.
"""

from __future__ import annotations

import errno
import re
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import Verification
from pynetdicom.utils import make_target

from dicom_node import status_codes
from dicom_node.association_tracker import AssociationTracker
from dicom_node.instance_header import read_header
from dicom_node.logging_setup import get_logger
from dicom_node.metrics import NodeMetrics
from dicom_node.negotiation import accepted_transfer_syntaxes
from dicom_node.scp_transport import NodeAE, NodeAssociationServer, SpoolingDIMSE, TransportLimits
from dicom_node.settings import NodeSettings
from dicom_node.storage_commitment import CommitmentReceiver, accept_reports
from dicom_node.tls import server_ssl_context
from storage.database import Database
from storage.ingest import ConflictPolicy, IdentityConflict, InstanceMeta, StoreOutcome, store_instance
from storage.instance_store import IncomingFile, InstanceStore, InvalidUIDError

log = get_logger(__name__)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() if value not in (None, "") else None


# The `store.conflict` warning; what changed is a `conflict` event of the series' latest job (jobs show).
_CONFLICT_REASONS = {
    ConflictPolicy.KEEP_FIRST: "same SOP Instance UID with other content; first version kept, "
    "new one saved under conflicts/ (what changed: the job's conflict event)",
    ConflictPolicy.REPLACE: "same SOP Instance UID with other content; the new version replaces the first, "
    "which is saved under conflicts/ (what changed and what was done: the job's conflict event)",
}

# Outcome label of a refused C-STORE, by the status it answered.
REFUSAL_NAMES = {
    status_codes.OUT_OF_RESOURCES: "out_of_resources",
    status_codes.CANNOT_UNDERSTAND: "cannot_understand",
    status_codes.DATASET_DOES_NOT_MATCH_SOP_CLASS: "sop_class_mismatch",
    status_codes.PROCESSING_FAILURE: "processing_failure",
}


_LO_MAX = 64
_NOT_LO = re.compile(r"[^\x20-\x5b\x5d-\x7e]")  # the command set's default repertoire, less backslash


def error_comment(text: str) -> str:
    """`text` as an Error Comment (0000,0902) can carry it: LO in the default repertoire (printable
    ASCII, no backslash), at most 64 characters."""
    text = _NOT_LO.sub("?", text)
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def instance_meta(
    ds: Dataset, transfer_syntax_uid: str, calling_ae: str | None, source_address: str | None = None
) -> InstanceMeta:
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
        source_address=source_address,
    )


class StoreSCP:
    """Receives instances into the instance store and job store."""

    def __init__(
        self,
        settings: NodeSettings,
        db: Database,
        store: InstanceStore,
        metrics: NodeMetrics | None = None,
        conflict_policy: ConflictPolicy = ConflictPolicy.KEEP_FIRST,
    ) -> None:
        self.settings = settings
        self.conflict_policy = conflict_policy  # `[storage] conflict_policy`
        self.db = db
        self.store = store
        self._server: NodeAssociationServer | None = None
        self.tracker = AssociationTracker(db, metrics or NodeMetrics())
        self._outcome = threading.local()  # the StoreOutcome of this thread's last successful C-STORE

    # -- handlers ---------------------------------------------------------
    def handle_echo(self, event: evt.Event) -> int:
        return status_codes.SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """`_receive`, timed and counted (per association and in the metrics) by its outcome; a refusal
        carries its Error Comment."""
        start = time.perf_counter()
        self._outcome.value, self._outcome.nbytes, self._outcome.series_uid = None, 0, None
        self._outcome.comment = None
        status = self._receive(event)
        outcome = self._outcome.value or REFUSAL_NAMES.get(status, f"status_{status:04x}")
        seconds = time.perf_counter() - start
        self.tracker.stored(event, outcome, self._outcome.nbytes, seconds, self._outcome.series_uid)
        if status == status_codes.SUCCESS or self._outcome.comment is None:
            return status
        response = Dataset()
        response.Status = status
        response.ErrorComment = error_comment(self._outcome.comment)
        return response

    def _refuse(self, status: int, comment: str) -> int:
        """`status`, with `comment` for the sender (see `handle_store`)."""
        self._outcome.comment = comment
        return status

    def _receive(self, event: evt.Event) -> int:
        """The data set spooled to `tmp/` as it arrived: check the disk, store it, drop it if not kept."""
        calling_ae = event.assoc.requestor.ae_title
        dimse = event.assoc.dimse
        incoming = dimse.take(event.request.MessageID) if isinstance(dimse, SpoolingDIMSE) else None
        if incoming is None:
            log.error("store.failed", reason="the data set was not received into a file", calling_ae=calling_ae)
            return self._refuse(status_codes.OUT_OF_RESOURCES, "data set not received into storage; retry later")
        try:
            free = self.store.free_bytes()
            if free < self.settings.min_free_disk_mb * 1024 * 1024:
                log.error(
                    "store.refused_disk_full",
                    free_mb=free // (1024 * 1024),
                    threshold_mb=self.settings.min_free_disk_mb,
                    calling_ae=calling_ae,
                )
                return self._refuse(status_codes.OUT_OF_RESOURCES, "node storage below its free-space limit")
            self._outcome.nbytes = incoming.size
            return self._store(event, incoming, calling_ae)
        finally:
            incoming.discard()  # no-op once stored

    def _store(self, event: evt.Event, incoming: IncomingFile, calling_ae: str) -> int:
        try:
            incoming.complete()  # readable for the header; fsync'd when placed (storage.ingest)
        except OSError as exc:
            log.error("store.failed", reason=f"storage error: {exc}", disk_full=exc.errno == errno.ENOSPC)
            return self._refuse(status_codes.OUT_OF_RESOURCES, "node storage error; retry later")
        try:
            ds = read_header(incoming.path)
            meta = instance_meta(ds, event.context.transfer_syntax, calling_ae, event.assoc.requestor.address)
        except InvalidUIDError as exc:
            log.warning("store.rejected", reason=str(exc), calling_ae=calling_ae)
            return self._refuse(status_codes.CANNOT_UNDERSTAND, exc.summary)
        except Exception as exc:  # undecodable header from a peer: refuse, keep serving
            log.warning("store.rejected", reason=f"unreadable data set: {exc}", calling_ae=calling_ae)
            return self._refuse(status_codes.CANNOT_UNDERSTAND, "data set header unreadable")
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
            return self._refuse(
                status_codes.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the C-STORE request's"
            )
        try:
            outcome = store_instance(self.db, self.store, meta, incoming, self.conflict_policy)
        except InvalidUIDError as exc:
            bound.warning("store.rejected", reason=str(exc))
            return self._refuse(status_codes.CANNOT_UNDERSTAND, exc.summary)
        except IdentityConflict as exc:  # a sender's UID error: kept out of the stored series (storage.ingest)
            bound.warning("store.rejected", reason=str(exc), identity_conflict=True)
            return self._refuse(status_codes.CANNOT_UNDERSTAND, exc.summary)
        except OSError as exc:
            bound.error("store.failed", reason=f"storage error: {exc}", disk_full=exc.errno == errno.ENOSPC)
            return self._refuse(status_codes.OUT_OF_RESOURCES, "node storage error; retry later")
        except Exception as exc:  # database down or similar: refuse, never acknowledge
            bound.error("store.failed", reason=f"job store error: {exc}")
            return self._refuse(status_codes.OUT_OF_RESOURCES, "node job store unavailable; retry later")
        self._outcome.value, self._outcome.series_uid = outcome.value, meta.series_uid
        if outcome is StoreOutcome.CONFLICT:  # still Success: both versions are safely kept
            bound.warning(
                "store.conflict",
                reason=_CONFLICT_REASONS[self.conflict_policy],
                policy=self.conflict_policy.value,
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
        self.tracker.rejected(event)

    def handle_aborted(self, event: evt.Event) -> None:
        log.warning(
            "association.aborted", calling_ae=event.assoc.requestor.ae_title, address=event.assoc.requestor.address
        )
        self.tracker.aborted(event)

    def handle_conn_close(self, event: evt.Event) -> None:
        """Free the slot of a connection that closed before any A-ASSOCIATE-RQ.

        A TCP port check, a scanner or junk bytes close the connection before
        (or instead of) a request; pynetdicom would keep that acceptor waiting
        `acse_timeout` for a request that can no longer come, and
        `max_associations` such connections would refuse real peers meanwhile.
        The empty-queue wake-up is what the ACSE timeout itself does: end it.
        Data sets of an aborted transfer are dropped from `tmp/`.
        """
        assoc = event.assoc
        self.tracker.closed(event)
        if isinstance(assoc.dimse, SpoolingDIMSE):
            assoc.dimse.discard_all()
        if assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
            assoc.dul.to_user_queue.put(None)

    # -- life cycle -------------------------------------------------------
    def _address_allowed(self, address: str) -> bool:
        """The source-address allow-list (the transport logs a refusal); refusals are recorded too."""
        allowed = self.settings.is_source_allowed(address)
        if not allowed:
            self.tracker.refused_address(address, 0)
        return allowed

    def build_ae(self) -> NodeAE:
        settings = self.settings
        ae = NodeAE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu_kb * 1024
        ae.acse_timeout = settings.acse_timeout_s
        ae.dimse_timeout = settings.dimse_timeout_s
        ae.network_timeout = settings.network_timeout_s
        ae.require_called_aet = True
        if settings.allowed_calling_aets:
            ae.require_calling_aet = list(settings.allowed_calling_aets)
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in settings.accepted_sop_classes:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification, syntaxes)
        accept_reports(ae)
        return ae

    def limits(self) -> TransportLimits:
        settings = self.settings
        return TransportLimits(
            max_pdu_bytes=settings.max_pdu_kb * 1024,
            max_instance_bytes=int(settings.max_instance_mb * 1024 * 1024),
            handshake_timeout_s=settings.acse_timeout_s,
            network_timeout_s=settings.network_timeout_s,
            dimse_timeout_s=settings.dimse_timeout_s,
            max_pending_per_address=settings.max_associations,
        )

    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound (host, port)."""
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_N_EVENT_REPORT, self.handle_commitment_report),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
            *self.tracker.handlers(),
        ]
        ae = self.build_ae()
        self.tracker.settle_leftovers()
        server = ae.make_server(
            (self.settings.host, self.settings.port),
            ssl_context=server_ssl_context(self.settings.tls),
            evt_handlers=handlers,
            server_class=NodeAssociationServer,
            limits=self.limits(),
            open_incoming=self.store.incoming,
            address_allowed=self._address_allowed,
        )
        threading.Thread(target=make_target(server.serve_forever), name="StoreSCP-accept", daemon=True).start()
        ae._servers.append(server)
        self._server = server
        host, port = server.server_address[:2]
        log.info("scp.listening", ae_title=self.settings.ae_title, host=host, port=port, tls=self.settings.tls.enabled)
        return host, port

    @property
    def accepting(self) -> bool:
        """Whether the listening socket is open (readiness)."""
        return self._server is not None and self._server.socket.fileno() != -1

    def stop(self) -> None:
        """Stop accepting, then abort what is still connected (pending connections included)."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            for assoc in server.active_associations:
                assoc.abort()
