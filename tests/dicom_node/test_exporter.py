"""Exporter against real receivers: DCMTK storescp and pynetdicom SCPs that misbehave on purpose.

Helpers (jobs in `exporting`, exporters, test peers) live in tests/dicom_node/conftest.py.
"""

from __future__ import annotations

import pydicom
import pytest
from pydantic import ValidationError
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification
from typer.testing import CliRunner

from dicom_node import export_status
from dicom_node.cli import app
from dicom_node.export_targets import ExportTargets
from dicom_node.peers import free_port
from dicom_node.settings import Destination
from storage.exports import resend
from storage.jobs import load_job
from storage.models import ExportState, JobState
from tests.dicom_node.conftest import (
    EXAMPLE_CONFIG,
    MisbehavingSCP,
    assert_resend_delivers,
    exporter_for,
    exporter_to,
    exporting_job,
    exporting_job_with,
    run_until_settled,
    start_storescp,
    wait_for,
)

RTSTRUCT_CLASS, SR_CLASS = RTStructureSetStorage, "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def test_destination_down_at_first_then_up_is_delivered_by_retry(unstarted_node, mr_series, tmp_path):
    node = unstarted_node
    port = free_port()
    job_id, output = exporting_job(node, mr_series[0], ["tps"])
    exporter = exporter_for(node, port)

    exporter.run_once()  # nobody listens yet
    job = load_job(node.db, job_id)
    assert job.state == JobState.EXPORTING
    assert job.exports[0].attempts == 1 and job.exports[0].state == ExportState.PENDING
    assert "could not be reached" in job.exports[0].last_error

    received = tmp_path / "tps"
    tps = start_storescp(port, received)
    try:
        job = run_until_settled(exporter, node, job_id)
    finally:
        tps.terminate()
        tps.wait(10)
    assert job.state == JobState.DONE
    assert job.exports[0].attempts >= 2
    files = list(received.iterdir())
    assert len(files) == 1
    assert pydicom.dcmread(files[0]).SOPInstanceUID == pydicom.dcmread(output).SOPInstanceUID
    assert any("delivered" in e.message for e in job.events if e.kind.value == "export")


def test_destination_that_rejects_and_hangs_up_is_reported_as_rejecting(unstarted_node, mr_series, tmp_path):
    """DCMTK storescp --refuse closes right after its A-ASSOCIATE-RJ; the reason must still say
    "rejected" with the peer's reason, not "could not be reached" (that raced about 1 in 4).
    Rejected-permanent is not retried."""
    node = unstarted_node
    port = free_port()
    tps = start_storescp(port, tmp_path / "tps", "--refuse")
    try:
        for _ in range(8):
            job_id, _ = exporting_job(node, mr_series[0], ["tps"])
            job = run_until_settled(exporter_for(node, port), node, job_id)
            assert job.state == JobState.FAILED
            assert "rejected the association (Rejected Permanent, source Service User" in job.reason, job.reason
            assert job.exports[0].attempts == 1
    finally:
        tps.terminate()
        tps.wait(10)


@pytest.mark.parametrize(
    "behaviour, expected",
    [
        ({"status": 0xA700}, "answered failure status 0xA700 Failure (Refused: Out of Resources)"),
        ({"status": 0x0110}, "answered failure status 0x0110 Failure (Processing Failure)"),
        ({"delay": 3.0}, "did not answer"),
    ],
)
def test_transient_failure_is_retried_then_failed_with_reason_and_resendable(
    unstarted_node, mr_series, behaviour, expected
):
    node = unstarted_node
    port = free_port()
    job_id, _ = exporting_job(node, mr_series[0], ["tps"])
    scp = MisbehavingSCP(port, **behaviour)
    try:  # an attempt at the silent peer takes about 1.2 s: give-up after 4 s leaves room for 2 on a slow host
        job = run_until_settled(exporter_for(node, port, give_up_after_s=4.0, dimse_timeout_s=1.0), node, job_id)
    finally:
        scp.stop()
    assert job.state == JobState.FAILED
    assert job.exports[0].attempts >= 2
    assert expected in job.reason and "export to tps failed" in job.reason
    assert "giving up" in [e.message for e in job.events if e.kind.value == "export"][-1]

    # `dicom-node jobs export` path: re-send to a now healthy destination.
    assert_resend_delivers(node, job_id, port)


@pytest.mark.parametrize(
    "behaviour, expected",
    [
        ({"status": 0xA900}, "0xA900 Failure (Data Set Does Not Match SOP Class)"),
        ({"status": 0xA9FF}, "0xA9FF Failure"),
        ({"status": 0xC000}, "0xC000 Failure (Cannot Understand)"),
        ({"status": 0x0122}, "0x0122 Failure (Refused: SOP Class Not Supported)"),
        ({"ae_title": "NOT_TPS"}, "rejected the association (Rejected Permanent"),
    ],
)
def test_permanent_failure_is_not_retried_and_is_resendable(unstarted_node, mr_series, behaviour, expected):
    node = unstarted_node
    port = free_port()
    job_id, _ = exporting_job(node, mr_series[0], ["tps"])
    scp = MisbehavingSCP(port, **behaviour)
    try:  # give-up far away: only the classification can end the job within the test's 30 s
        job = run_until_settled(exporter_for(node, port, give_up_after_s=3600), node, job_id)
    finally:
        scp.stop()
    assert job.state == JobState.FAILED
    assert job.exports[0].attempts == 1 and len(scp.received) <= 1
    assert expected in job.reason and "export to tps failed" in job.reason
    assert "not retried (permanent failure" in [e.message for e in job.events if e.kind.value == "export"][-1]
    assert_resend_delivers(node, job_id, port)


def test_rejected_transient_association_is_retried_until_delivered(unstarted_node, mr_series):
    """A busy peer (its association limit reached) answers A-ASSOCIATE-RJ rejected-transient: retry, then deliver."""
    node = unstarted_node
    port = free_port()
    peer = AE(ae_title="TPS")
    peer.add_supported_context(pydicom.dcmread(mr_series[0]).SOPClassUID)
    peer.add_supported_context(Verification)
    peer.maximum_associations = 1
    stored = []
    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: stored.append(1) or 0x0000)]
    )
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", port, ae_title="TPS")
    assert held.is_established
    try:
        job_id, _ = exporting_job(node, mr_series[0], ["tps"])
        exporter = exporter_for(node, port, give_up_after_s=3600)
        exporter.run_once()
        export = load_job(node.db, job_id).exports[0]
        assert export.state == ExportState.PENDING and "Rejected Transient" in export.last_error, export.last_error
        held.release()
        job = run_until_settled(exporter, node, job_id)
        assert job.state == JobState.DONE and job.exports[0].attempts >= 2 and stored == [1]
    finally:
        server.shutdown()


def test_destination_refusing_sr_does_not_stall_it_or_others(unstarted_node, mr_series, mr_outputs):
    """Issue 13.1: a TPS that takes RTSTRUCT but not Comprehensive 3D SR made pynetdicom raise ValueError;
    the row stayed first and every round aborted on it, so the PACS got 0 of 4 objects.

    Now: the PACS gets all 4, the TPS both RTSTRUCTs, and the TPS's SR rows fail at once with the reason."""
    node = unstarted_node
    tps_port, pacs_port = free_port(), free_port()
    tps = MisbehavingSCP(tps_port, contexts=[RTSTRUCT_CLASS])
    pacs = MisbehavingSCP(pacs_port, ae_title="PACS")
    exporter = exporter_to(
        node,
        [
            Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=tps_port),
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port),
        ],
        give_up_after_s=3600,
    )
    sources = [o.path for o in mr_outputs]
    try:
        job_ids = [exporting_job_with(node, sources, ["tps", "pacs"], mr_source=mr_series[0])[0] for _ in range(2)]
        jobs = [run_until_settled(exporter, node, job_id) for job_id in job_ids]
    finally:
        tps.stop()
        pacs.stop()
    assert sorted(c for c, _, _ in pacs.received) == sorted([RTSTRUCT_CLASS, SR_CLASS] * 2)
    assert [c for c, _, _ in tps.received] == [RTSTRUCT_CLASS] * 2
    for job in jobs:
        assert job.state == JobState.FAILED
        by_row = {(e.destination, e.sop_class_uid): e for e in job.exports}
        assert by_row[("pacs", SR_CLASS)].state == ExportState.DONE
        assert by_row[("tps", RTSTRUCT_CLASS)].state == ExportState.DONE
        refused = by_row[("tps", SR_CLASS)]
        assert refused.state == ExportState.FAILED and refused.attempts == 1
        assert "TPS@127.0.0.1" in refused.last_error
        assert "does not accept Comprehensive 3D SR Storage: presentation context rejected" in refused.last_error
        assert "leave SR out of this destination's `objects`" in refused.last_error
        assert "export to tps failed" in job.reason and "pacs" not in job.reason


def test_objects_filter_makes_no_sr_rows_for_a_tps(unstarted_node, mr_series, mr_outputs):
    """`objects = ["RTSTRUCT"]` for the TPS: no SR row for it, so the job ends `done`; a re-send keeps the filter."""
    node = unstarted_node
    tps_port, pacs_port = free_port(), free_port()
    destinations = [
        Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=tps_port, objects=["RTSTRUCT"]),
        Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port, objects=["RTSTRUCT", "SR"]),
    ]
    targets = ExportTargets(destinations)
    tps = MisbehavingSCP(tps_port, contexts=[RTSTRUCT_CLASS])
    pacs = MisbehavingSCP(pacs_port, ae_title="PACS")
    exporter = exporter_to(node, destinations, give_up_after_s=3600)
    try:
        job_id, _ = exporting_job_with(
            node, [o.path for o in mr_outputs], ["tps", "pacs"], targets, mr_source=mr_series[0]
        )
        rows = {(e.destination, e.sop_class_uid) for e in load_job(node.db, job_id).exports}
        assert rows == {("tps", RTSTRUCT_CLASS), ("pacs", RTSTRUCT_CLASS), ("pacs", SR_CLASS)}
        job = run_until_settled(exporter, node, job_id)
        assert job.state == JobState.DONE
        outputs = [tuple(o) for o in job.summary["outputs"]]
        assert resend(node.db, job_id, None, outputs, targets.wants) == 3
        assert run_until_settled(exporter, node, job_id).state == JobState.DONE
    finally:
        tps.stop()
        pacs.stop()
    assert [c for c, _, _ in tps.received] == [RTSTRUCT_CLASS] * 2
    assert len(pacs.received) == 4
    assert {(e.destination, e.sop_class_uid) for e in load_job(node.db, job_id).exports} == rows


def test_jobs_export_after_leaving_the_refused_sr_out_ends_done(unstarted_node, node_env, mr_series, mr_outputs):
    """The operator's path after the TPS refused the SR: set its `objects = ["RTSTRUCT"]`, then
    `dicom-node jobs export`. The refused SR row goes, the RTSTRUCT is re-sent, the job ends `done`."""
    node = unstarted_node
    port = free_port()
    tps = MisbehavingSCP(port, contexts=[RTSTRUCT_CLASS])
    try:
        job_id, _ = exporting_job_with(node, [o.path for o in mr_outputs], ["tps"], mr_source=mr_series[0])
        assert run_until_settled(exporter_for(node, port, give_up_after_s=3600), node, job_id).state == JobState.FAILED
        env = {
            **node_env,
            "DICOM_NODE__DESTINATIONS__0__PORT": str(port),
            "DICOM_NODE__DESTINATIONS__0__OBJECTS": '["RTSTRUCT"]',
        }
        result = CliRunner().invoke(app, ["jobs", "export", str(job_id), "--config", str(EXAMPLE_CONFIG)], env=env)
        assert result.exit_code == 0, result.output
        assert f"job {job_id}: 1 export(s) pending" in result.output
        job = run_until_settled(exporter_for(node, port), node, job_id)
    finally:
        tps.stop()
    assert job.state == JobState.DONE, job.reason
    assert [e.sop_class_uid for e in job.exports] == [RTSTRUCT_CLASS]
    assert [c for c, _, _ in tps.received] == [RTSTRUCT_CLASS] * 2
    assert any("SR no longer sent there" in e.message for e in job.events)


def test_objects_filter_is_validated():
    with pytest.raises(ValidationError, match="RTSTRUCT"):
        Destination(name="tps", ae_title="TPS", host="h", port=104, objects=["RTSTRUCT", "PDF"])
    with pytest.raises(ValidationError, match="at least 1"):
        Destination(name="tps", ae_title="TPS", host="h", port=104, objects=[])
    assert Destination(name="pacs", ae_title="PACS", host="h", port=104).objects == ["RTSTRUCT", "SR", "SEG"]


def test_destination_accepting_no_proposed_context_is_reported_as_such(unstarted_node, mr_series, mr_outputs):
    """A peer that accepts the association but none of its contexts is misconfigured, not unreachable."""
    node = unstarted_node
    port = free_port()
    tps = MisbehavingSCP(port, contexts=[CTImageStorage])
    try:
        job_id, _ = exporting_job_with(node, [o.path for o in mr_outputs], ["tps"], mr_source=mr_series[0])
        job = run_until_settled(exporter_for(node, port, give_up_after_s=3600), node, job_id)
    finally:
        tps.stop()
    assert job.state == JobState.FAILED and tps.received == []
    assert all(e.state == ExportState.FAILED and e.attempts == 1 for e in job.exports)
    assert "TPS@127.0.0.1" in job.reason and "accepted none of the proposed presentation contexts" in job.reason
    assert "RT Structure Set Storage" in job.reason and "Comprehensive 3D SR Storage" in job.reason
    assert "could not be reached" not in job.reason


def test_tls_files_that_cannot_be_loaded_fail_only_that_destination(unstarted_node, mr_series, tmp_path):
    """Issue 13.1: a ConfigError from the TLS files was raised outside the `try` and stalled every destination."""
    node = unstarted_node
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    port = free_port()
    pacs = MisbehavingSCP(port, ae_title="PACS")
    exporter = exporter_to(
        node,
        [
            Destination(
                name="tps", ae_title="TPS", host="127.0.0.1", port=free_port(), tls={"enabled": True, "ca_file": bad_ca}
            ),
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port),
        ],
        give_up_after_s=3600,
    )
    try:
        job_id, _ = exporting_job(node, mr_series[0], ["tps", "pacs"])
        job = run_until_settled(exporter, node, job_id)
    finally:
        pacs.stop()
    assert len(pacs.received) == 1
    by_destination = {e.destination: e for e in job.exports}
    assert by_destination["pacs"].state == ExportState.DONE
    assert by_destination["tps"].state == ExportState.FAILED and by_destination["tps"].attempts == 1
    assert f"TLS cannot be set up: tls: cannot load CA file {bad_ca}" in job.reason


@pytest.mark.parametrize(
    "code, delivered, permanent",
    [
        (0x0000, True, False),
        (0xB000, True, False),
        (0xB007, True, False),
        (0xA700, False, False),
        (0xA7FF, False, False),
        (0x0213, False, False),
        (0x0110, False, False),
        (0xFE00, False, False),
        (0xA900, False, True),
        (0xA9FF, False, True),
        (0xC000, False, True),
        (0xCFFF, False, True),
        (0x0122, False, True),
        (0x0124, False, True),
        (0x0117, False, True),
    ],
)
def test_status_classification(code, delivered, permanent):
    """PS3.4 Table B.2-1 and PS3.7 Annex C, as decided in dicom_node/export_status.py."""
    assert export_status.delivered(code) is delivered
    if not delivered:
        assert export_status.is_permanent(code) is permanent


def test_recording_an_attempt_is_retried_when_the_store_is_busy(unstarted_node, mr_series, monkeypatch):
    """A database error while recording left the row unrecorded; now the write is retried."""
    from sqlalchemy.exc import OperationalError

    import dicom_node.exporter

    node = unstarted_node
    real = dicom_node.exporter.record_attempt
    failures = []

    def busy_then_real(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError("UPDATE exports", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_node.exporter, "record_attempt", busy_then_real)
    port = free_port()
    scp = MisbehavingSCP(port)
    try:
        job_id, _ = exporting_job(node, mr_series[0], ["tps"])
        exporter_for(node, port).run_once()
    finally:
        scp.stop()
    job = wait_for(lambda: (j := load_job(node.db, job_id)).state == JobState.DONE and j, timeout=5)
    assert len(failures) == 2 and job.exports[0].attempts == 1 and len(scp.received) == 1
