"""Storage Commitment SCU: the report on the same association, on a new one to the node (also after a restart),
a failure with its reason, no report at all, and a destination that does not do Storage Commitment.

The Storage Commitment SCP here is a pynetdicom AE written for the test, so it can fail one instance on purpose;
the test against a real PACS is in tests/e2e/test_orthanc_storage_commitment.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import RTStructureSetStorage, StorageCommitmentPushModel

from dicom_node.peers import free_port
from dicom_node.settings import Destination
from dicom_node.storage_commitment import (
    EVENT_ALL_COMMITTED,
    EVENT_FAILURES_PRESENT,
    PUSH_MODEL_INSTANCE,
    REQUEST_ACTION_TYPE,
)
from dicom_node.store_scp import StoreSCP
from storage.database import Database
from storage.jobs import load_job
from storage.models import ExportState, JobState
from tests.dicom_node.conftest import MisbehavingSCP, exporter_to, exporting_job_with, run_until_settled, wait_for

NO_SUCH_OBJECT_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110


class CommitmentSCP:
    """A Store SCP that is also a Storage Commitment SCP: it commits what it holds, except `fail` (0x0112).

    `report_on`: "same" sends the N-EVENT-REPORT on the requesting association, "new" on a new
    association to `node_port` (after `delay` s, the requestor's association may be gone by then),
    None never reports.
    """

    def __init__(
        self,
        port: int,
        *,
        report_on: str | None,
        fail: set[str] = frozenset(),
        node_port: int = 0,
        delay: float = 0,
        action_status: int = 0x0000,
    ) -> None:
        self.report_on, self.fail, self.node_port, self.delay = report_on, set(fail), node_port, delay
        self.action_status = action_status
        self.held: set[str] = set()
        self.requests: list[Dataset] = []
        self.answers: list[int] = []  # the node's N-EVENT-REPORT response statuses
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(StorageCommitmentPushModel)
        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.on_store), (evt.EVT_N_ACTION, self.on_action)],
        )

    def on_store(self, event) -> int:
        self.held.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(self, event) -> tuple[int, None]:
        assert event.action_type == REQUEST_ACTION_TYPE
        assert event.request.RequestedSOPInstanceUID == PUSH_MODEL_INSTANCE
        request = event.action_information
        self.requests.append(request)
        if self.report_on is not None and self.action_status == 0x0000:
            threading.Thread(target=self.report, args=(event.assoc, request), daemon=True).start()
        return self.action_status, None

    def report_of(self, request: Dataset) -> tuple[int, Dataset]:
        info, committed, failed = Dataset(), [], []
        info.TransactionUID = request.TransactionUID
        for item in request.ReferencedSOPSequence:
            ref = Dataset()
            ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            uid = str(item.ReferencedSOPInstanceUID)
            if uid in self.fail or uid not in self.held:
                ref.FailureReason = NO_SUCH_OBJECT_INSTANCE
                failed.append(ref)
            else:
                committed.append(ref)
        info.ReferencedSOPSequence = DicomSequence(committed)
        if failed:
            info.FailedSOPSequence = DicomSequence(failed)
        return (EVENT_FAILURES_PRESENT if failed else EVENT_ALL_COMMITTED), info

    def report(self, assoc, request: Dataset) -> None:
        time.sleep(0.2 + self.delay)  # after the N-ACTION response
        event_type, info = self.report_of(request)
        if self.report_on == "same":
            status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
            self.answers.append(int(status.Status) if status else -1)
            return
        ae = AE(ae_title="PACS")
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        back = ae.associate("127.0.0.1", self.node_port, ae_title="DICOMNODE", ext_neg=[role])
        assert back.is_established
        status, _ = back.send_n_event_report(info, event_type, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
        self.answers.append(int(status.Status) if status else -1)
        back.release()

    def stop(self) -> None:
        self.server.shutdown()


def committing_destination(port: int, **options: float) -> Destination:
    return Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, storage_commitment=True, **options)  # type: ignore[arg-type]


def job_to_pacs(node, mr_series, mr_outputs) -> int:
    job_id, _ = exporting_job_with(node, [o.path for o in mr_outputs], ["pacs"], mr_source=mr_series[0])
    return job_id


def test_report_on_the_same_association_commits_one_and_fails_the_other_with_its_reason(
    unstarted_node, mr_series, mr_outputs
) -> None:
    node = unstarted_node
    rtstruct, sr = mr_outputs
    port = free_port()
    pacs = CommitmentSCP(port, report_on="same", fail={sr.sop_instance_uid})
    try:
        job_id = job_to_pacs(node, mr_series, mr_outputs)
        job = run_until_settled(
            exporter_to(node, [committing_destination(port, storage_commitment_wait_s=5)]), node, job_id
        )
    finally:
        pacs.stop()
    (request,) = pacs.requests
    assert {str(i.ReferencedSOPInstanceUID) for i in request.ReferencedSOPSequence} == {
        rtstruct.sop_instance_uid,
        sr.sop_instance_uid,
    }
    assert pacs.answers == [0x0000]
    rows = {e.sop_instance_uid: e for e in job.exports}
    assert rows[rtstruct.sop_instance_uid].state == ExportState.COMMITTED
    assert rows[rtstruct.sop_instance_uid].transaction_uid == request.TransactionUID
    failed = rows[sr.sop_instance_uid]
    assert failed.state == ExportState.FAILED and failed.attempts == 1
    assert "PACS did not commit it: Failure Reason 0x0112 no such object instance" in failed.last_error
    assert job.state == JobState.FAILED and "export to pacs failed: PACS did not commit it" in job.reason


def test_report_on_a_new_association_to_the_node_after_a_restart_commits_the_job(
    unstarted_node, mr_series, mr_outputs
) -> None:
    """The round ends (no wait on its association); the report comes later, to a Store SCP on a fresh job store
    connection, as after a restart: the transaction UID on the rows is all it needs."""
    node = unstarted_node
    port = free_port()
    exporter = exporter_to(node, [committing_destination(port, storage_commitment_wait_s=0)])
    job_id = job_to_pacs(node, mr_series, mr_outputs)
    settings = node.settings.node.model_copy(update={"port": free_port()})
    restarted_db = Database(node.settings.storage.resolved_database_url)
    scp = StoreSCP(settings, restarted_db, node.store)
    _, node_port = scp.start()
    pacs = CommitmentSCP(port, report_on="new", node_port=node_port, delay=0.5)
    try:
        exporter.run_once()
        job = load_job(node.db, job_id)
        assert job.state == JobState.EXPORTING
        assert {e.state for e in job.exports} == {ExportState.COMMITTING}
        job = wait_for(lambda: (j := load_job(node.db, job_id)).state == JobState.DONE and j, timeout=20)
    finally:
        pacs.stop()
        scp.stop()
        restarted_db.dispose()
    assert pacs.answers == [0x0000]
    assert {e.state for e in job.exports} == {ExportState.COMMITTED}
    assert "2 object(s) delivered, 2 of them committed" in job.events[-1].message


def test_no_report_within_the_timeout_fails_the_export_and_resend_commits_it(
    unstarted_node, mr_series, mr_outputs
) -> None:
    node = unstarted_node
    port = free_port()
    silent = CommitmentSCP(port, report_on=None)
    try:
        job_id = job_to_pacs(node, mr_series, mr_outputs)
        destination = committing_destination(port, storage_commitment_wait_s=0, storage_commitment_timeout_s=0.5)
        job = run_until_settled(exporter_to(node, [destination]), node, job_id)
    finally:
        silent.stop()
    assert job.state == JobState.FAILED
    assert all(e.state == ExportState.FAILED for e in job.exports)
    assert "no Storage Commitment report from pacs within 0.5 s" in job.reason

    from storage.exports import resend

    assert resend(node.db, job_id, ["pacs"]) == 2
    pacs = CommitmentSCP(port, report_on="same")
    try:
        job = run_until_settled(exporter_to(node, [committing_destination(port)]), node, job_id)
    finally:
        pacs.stop()
    assert job.state == JobState.DONE and {e.state for e in job.exports} == {ExportState.COMMITTED}


def test_refused_commitment_request_is_retried_as_one_attempt_per_round_then_given_up(
    unstarted_node, mr_series, mr_outputs
) -> None:
    node = unstarted_node
    port = free_port()
    busy = CommitmentSCP(port, report_on="same", action_status=PROCESSING_FAILURE)
    try:
        job_id = job_to_pacs(node, mr_series, mr_outputs)
        exporter = exporter_to(node, [committing_destination(port)], give_up_after_s=1)
        job = run_until_settled(exporter, node, job_id)
    finally:
        busy.stop()
    # One N-ACTION per round for the objects due in it: under load the two objects' next attempts can
    # fall into different rounds, and each is then asked for alone. Counted per object, not per round.
    asked = {
        export.sop_instance_uid: sum(
            export.sop_instance_uid in {str(item.ReferencedSOPInstanceUID) for item in request.ReferencedSOPSequence}
            for request in busy.requests
        )
        for export in job.exports
    }
    assert min(asked.values()) >= 2  # transient: asked again
    assert job.state == JobState.FAILED
    assert all(e.state == ExportState.FAILED and e.attempts == asked[e.sop_instance_uid] for e in job.exports)
    assert "refused the Storage Commitment request (N-ACTION status 0x0110" in job.reason
    for export in job.exports:
        assert any(
            f"{export.sop_class_name()} attempt {asked[export.sop_instance_uid]}" in e.message
            and f"giving up after {asked[export.sop_instance_uid]} attempts" in e.message
            for e in job.events
        )


def test_destination_without_storage_commitment_fails_at_once_naming_the_setting(
    unstarted_node, mr_series, mr_outputs
) -> None:
    node = unstarted_node
    port = free_port()
    store_only = MisbehavingSCP(port, ae_title="PACS", contexts=[RTStructureSetStorage, mr_outputs[1].sop_class_uid])
    try:
        job = run_until_settled(
            exporter_to(node, [committing_destination(port)]), node, job_to_pacs(node, mr_series, mr_outputs)
        )
    finally:
        store_only.stop()
    assert len(store_only.received) == 2  # stored, but never committed
    assert job.state == JobState.FAILED
    assert "does not accept Storage Commitment Push Model" in job.reason
    assert "storage_commitment = false" in job.reason


def test_unusable_report_is_refused_with_a_status_and_the_node_keeps_serving(unstarted_node) -> None:
    node = unstarted_node
    scp = StoreSCP(node.settings.node.model_copy(update={"port": free_port()}), node.db, node.store)
    _, node_port = scp.start()
    try:
        ae = AE(ae_title="PACS")
        ae.dimse_timeout = 10
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        answers = []
        no_transaction = Dataset()
        no_transaction.RetrieveAETitle = "PACS"
        for event_type, info in ((EVENT_ALL_COMMITTED, no_transaction), (7, no_transaction)):
            assoc = ae.associate("127.0.0.1", node_port, ae_title="DICOMNODE", ext_neg=[role])
            assert assoc.is_established
            status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
            answers.append(int(status.Status))
            assoc.release()
    finally:
        scp.stop()
    assert answers == [0x0115, 0x0113]  # invalid argument value (no Transaction UID), no such event type


@pytest.mark.parametrize("bad", [{"storage_commitment_timeout_s": 0}, {"storage_commitment_wait_s": -1}])
def test_commitment_times_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match="storage_commitment_"):
        committing_destination(104, **bad)


@pytest.mark.slow
def test_orthanc_commits_what_it_stored_on_a_new_association_to_the_node(
    unstarted_node, mr_series, mr_outputs, tmp_path
) -> None:
    """Orthanc (>= 1.6) is a Storage Commitment SCP that reports on a new association to the modality
    declared in its DicomModalities: here the node's Store SCP."""
    from tests.helpers.orthanc import OrthancServer, orthanc_binary

    if orthanc_binary() is None:
        pytest.skip("Orthanc not installed (Debian package 'orthanc'; .ci/run installs it)")
    node = unstarted_node
    reports_to_scp: list[str] = []

    class RecordingSCP(StoreSCP):
        def handle_commitment_report(self, event):
            reports_to_scp.append(event.assoc.requestor.ae_title)
            return super().handle_commitment_report(event)

    scp = RecordingSCP(node.settings.node.model_copy(update={"port": free_port()}), node.db, node.store)
    _, node_port = scp.start()
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={"node": ("DICOMNODE", node_port)})
    try:
        destination = Destination(
            name="pacs",
            ae_title=orthanc.ae_title,
            host="127.0.0.1",
            port=orthanc.dicom_port,
            storage_commitment=True,
            storage_commitment_wait_s=1,
        )
        job = run_until_settled(exporter_to(node, [destination]), node, job_to_pacs(node, mr_series, mr_outputs))
        held = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances")}
    finally:
        orthanc.stop()
        scp.stop()
    assert job.state == JobState.DONE, job.reason
    assert {e.state for e in job.exports} == {ExportState.COMMITTED}
    assert held == {o.sop_instance_uid for o in mr_outputs}
    assert reports_to_scp == [orthanc.ae_title]  # the report came on Orthanc's own association to the node


@pytest.mark.slow
def test_running_node_exports_to_orthanc_with_commitment_and_takes_the_report_on_its_own_port(
    start_node, mr_series, mr_outputs, tmp_path
) -> None:
    """The service as configured: its scheduled exporter sends, its Store SCP takes Orthanc's report."""
    from tests.helpers.orthanc import OrthancServer, orthanc_binary

    if orthanc_binary() is None:
        pytest.skip("Orthanc not installed (Debian package 'orthanc'; .ci/run installs it)")
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={"node": ("DICOMNODE", node_port)})
    try:
        node = start_node(
            DICOM_NODE__NODE__PORT=str(node_port),
            DICOM_NODE__DESTINATIONS__0__AE_TITLE=orthanc.ae_title,
            DICOM_NODE__DESTINATIONS__0__PORT=str(orthanc.dicom_port),
            DICOM_NODE__DESTINATIONS__0__STORAGE_COMMITMENT="true",
            DICOM_NODE__DESTINATIONS__0__STORAGE_COMMITMENT_WAIT_S="0",
        )
        job_id, _ = exporting_job_with(node, [o.path for o in mr_outputs], ["tps"], mr_source=mr_series[0])
        job = wait_for(lambda: (j := load_job(node.db, job_id)).state in (JobState.DONE, JobState.FAILED) and j, 60)
    finally:
        orthanc.stop()
    assert job.state == JobState.DONE, job.reason
    assert {e.state for e in job.exports} == {ExportState.COMMITTED}
    assert any("committed by ORTHANC" in e.message for e in job.events)


def test_commitment_outcomes_per_destination_are_in_the_metrics(unstarted_node, mr_series, mr_outputs) -> None:
    """One object committed and one refused by the report: `dicom_node_storage_commitments` counts each, per
    destination, from the export rows (so a report taken by another process counts too)."""
    from prometheus_client import CollectorRegistry

    from dicom_node.metrics import JobStoreCollector

    node = unstarted_node
    _, sr = mr_outputs
    registry = CollectorRegistry()
    registry.register(JobStoreCollector(node.db, lambda: 1, 0, ["pacs", "archive"]))

    def scraped() -> dict[tuple[str, str], float]:
        return {
            (s.labels["destination"], s.labels["outcome"]): s.value
            for family in registry.collect()
            if family.name == "dicom_node_storage_commitments"
            for s in family.samples
        }

    assert scraped() == {(d, o): 0 for d in ("archive", "pacs") for o in ("awaiting", "committed", "failed")}
    port = free_port()
    pacs = CommitmentSCP(port, report_on="same", fail={sr.sop_instance_uid})
    try:
        job_id = job_to_pacs(node, mr_series, mr_outputs)
        run_until_settled(exporter_to(node, [committing_destination(port, storage_commitment_wait_s=5)]), node, job_id)
    finally:
        pacs.stop()
    assert scraped() == {
        ("pacs", "awaiting"): 0,
        ("pacs", "committed"): 1,
        ("pacs", "failed"): 1,
        ("archive", "awaiting"): 0,
        ("archive", "committed"): 0,
        ("archive", "failed"): 0,
    }
