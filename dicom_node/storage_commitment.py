"""Storage Commitment Push Model, SCU side (PS3.4 Annex J): the request, and the report wherever it arrives.

Why: a C-STORE success says the destination received an object, not that it
keeps it; a PACS archiving to tape, or a TPS database, may still lose it.
Storage Commitment asks the destination to take responsibility, and only its
N-EVENT-REPORT makes an export `committed`.

Decisions:

- The request (N-ACTION, Action Type 1) lists the instances of one
  destination's round under a fresh Transaction UID, which is stored on the
  export rows before the request is sent (`storage.exports.request_commitment`).
- The report (N-EVENT-REPORT, Event Type 1 all committed, 2 failures present)
  may come on the same association, before it is released, or on a new
  association the destination opens to the node's Store SCP port (SCP/SCU role
  reversal). Both are handled by `CommitmentReceiver`, which finds the rows by
  Transaction UID in the job store, so a report after a restart still counts.
- A report for an unknown or already settled transaction is answered Success
  and logged: the destination has nothing to resend, and refusing it would
  only make it retry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node.logging_setup import get_logger
from storage.database import Database
from storage.exports import record_commitment

log = get_logger(__name__)

# Well-known SOP Instance UID of the Storage Commitment Push Model (PS3.4 J.3.5).
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_ACTION_TYPE = 1  # N-ACTION Action Type ID: Request Storage Commitment
EVENT_ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type ID: Storage Commitment Request Successful
EVENT_FAILURES_PRESENT = 2  # N-EVENT-REPORT Event Type ID: Storage Commitment Request Complete - Failures Exist

# N-EVENT-REPORT response statuses (PS3.7 Annex C).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115

# Failure Reason (0008,1197) values of the Failed SOP Sequence (PS3.4 Annex J).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance (the destination does not hold it)",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP Class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


def commitment_request(transaction_uid: str, instances: Iterable[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and Referenced SOP Sequence of (class, instance) UIDs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for class_uid, instance_uid in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = class_uid
        item.ReferencedSOPInstanceUID = instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = DicomSequence(items)
    return ds


def describe_failure_reason(code: int | None) -> str:
    if code is None:
        return "no Failure Reason (0008,1197) given"
    return f"Failure Reason 0x{code:04X} {FAILURE_REASONS.get(code, '(not defined by PS3.4)')}"


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT says: the committed instances and the failed ones with their reasons."""

    transaction_uid: str
    committed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_event(cls, event_type: int, info: Dataset | None) -> CommitmentReport:
        """Parse the Event Information.

        Raises `LookupError` for an Event Type ID other than 1 or 2, `ValueError` naming the attribute that is wrong.
        """
        if event_type not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_PRESENT):
            raise LookupError(f"Event Type ID {event_type} is not a Storage Commitment result (1 or 2)")
        if info is None or not str(info.get("TransactionUID", "")).strip():
            raise ValueError("Transaction UID (0008,1195) missing")
        committed = [str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])]
        failed = {
            str(item.ReferencedSOPInstanceUID): describe_failure_reason(item.get("FailureReason"))
            for item in info.get("FailedSOPSequence", [])
        }
        if event_type == EVENT_FAILURES_PRESENT and not failed:
            raise ValueError("Event Type 2 (failures exist) without a Failed SOP Sequence (0008,1198)")
        return cls(str(info.TransactionUID), committed, failed)


class CommitmentReceiver:
    """Records N-EVENT-REPORTs into the job store; the EVT_N_EVENT_REPORT handler of the SCP and of the SCU."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def receive(self, event: evt.Event) -> tuple[int, CommitmentReport | None]:
        """Record the report of `event`; returns the response status and the report (None if unusable)."""
        peer = event.assoc.requestor if event.assoc.is_acceptor else event.assoc.acceptor
        reporter = str(peer.ae_title).strip()
        where = "new association" if event.assoc.is_acceptor else "same association"
        try:
            report = CommitmentReport.from_event(int(event.event_type), event.event_information)
        except LookupError as exc:
            log.warning("commitment.report_refused", reporter=reporter, reason=str(exc))
            return NO_SUCH_EVENT_TYPE, None
        except Exception as exc:  # undecodable or incomplete Event Information
            log.warning("commitment.report_refused", reporter=reporter, reason=f"unusable event information: {exc}")
            return INVALID_ARGUMENT_VALUE, None
        try:
            settled = record_commitment(self.db, report.transaction_uid, report.committed, report.failed, reporter)
        except Exception as exc:  # job store down: the destination may send the report again
            log.error("commitment.record_failed", transaction_uid=report.transaction_uid, reason=str(exc))
            return PROCESSING_FAILURE, report
        (log.info if settled else log.warning)(
            "commitment.report" if settled else "commitment.report_unknown_transaction",
            transaction_uid=report.transaction_uid,
            reporter=reporter,
            received_on=where,
            committed=len(report.committed),
            failed=len(report.failed),
            settled=settled,
        )
        return SUCCESS, report

    def handle(self, event: evt.Event) -> tuple[int, None]:
        status, _ = self.receive(event)
        return status, None


def accept_reports(ae: AE) -> None:
    """Let `ae` (the Store SCP) take reports on new associations: the destination there acts as SCP (role reversal).

    Uncompressed syntaxes only: a report is a small data set, and Deflated is refused everywhere on the SCP
    (its inflation is unbounded, see `dicom_node.negotiation`)."""
    ae.add_supported_context(
        StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=False, scp_role=True
    )
