"""Exporter against real receivers: DCMTK storescp and pynetdicom SCPs that misbehave on purpose."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.exporter import Exporter
from dicom_node.settings import Destination, ExportSettings
from dicom_node.store_scp import instance_meta
from storage.exports import resend
from storage.ingest import store_instance
from storage.jobs import RoutingOutcome, claim_next_job, complete_series, load_job, record_outputs
from storage.models import ExportState, JobState
from tests.dicom_node.conftest import require_tool, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exporting_job(node, source: Path, destinations: list[str]) -> tuple[int, Path]:
    """A job in `exporting` whose one output is a copy of `source` (any storable object)."""
    ds = pydicom.dcmread(source)
    store_instance(node.db, node.store, instance_meta(ds, ds.file_meta.TransferSyntaxUID, "TEST"), source.read_bytes())
    job_id = complete_series(node.db, 1, RoutingOutcome("r", "default", destinations, "test"))
    assert claim_next_job(node.db, "test") == job_id
    out_dir = node.store.root / "outputs" / f"job-{job_id}" / "attempt-1"
    out_dir.mkdir(parents=True)
    output = out_dir / "result.dcm"
    shutil.copy(source, output)
    relative = output.relative_to(node.store.root).as_posix()
    outputs = [(str(ds.SOPInstanceUID), str(ds.SOPClassUID), relative)]
    record_outputs(
        node.db,
        job_id,
        out_dir.relative_to(node.store.root).as_posix(),
        {"outputs": outputs},
        [(d, *outputs[0]) for d in destinations],
    )
    return job_id, output


def exporter_for(
    node, port: int, *, give_up_after_s: float = 60, dimse_timeout_s: float = 5, ae_title: str = "TPS"
) -> Exporter:
    destination = Destination(name="tps", ae_title=ae_title, host="127.0.0.1", port=port)
    settings = ExportSettings(retry_initial_s=0.1, retry_max_interval_s=0.2, give_up_after_s=give_up_after_s)
    return Exporter(node.db, node.store, [destination], settings, "DICOMNODE", dimse_timeout_s)


def run_until_settled(exporter: Exporter, node, job_id: int, timeout: float = 30) -> object:
    def settled():
        exporter.run_once()
        job = load_job(node.db, job_id)
        return job if job.state in (JobState.DONE, JobState.FAILED) else None

    return wait_for(settled, timeout=timeout, interval=0.15)


def start_storescp(port: int, out_dir: Path, *options: str) -> subprocess.Popen:
    """DCMTK storescp on 127.0.0.1:`port`, ready when echoscu gets an answer (accepted or rejected)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", "TPS", "-od", str(out_dir), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    answer = "Association Rejected" if "--refuse" in options else "Received Echo Response"
    echo = [require_tool("echoscu"), "-v", "-aec", "TPS", "127.0.0.1", str(port)]
    wait_for(
        lambda: answer in subprocess.run(echo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout,
        timeout=10,
    )
    return process


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


class MisbehavingSCP:
    """A pynetdicom Store SCP answering every C-STORE with `status` after `delay` seconds."""

    def __init__(self, port: int, status: int = 0x0000, delay: float = 0.0, ae_title: str = "TPS"):
        self.received = 0
        self.status, self.delay = status, delay
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.require_called_aet = True
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle)])

    def handle(self, event):
        time.sleep(self.delay)
        self.received += 1
        return self.status

    def stop(self):
        self.server.shutdown()


def test_destination_that_rejects_and_hangs_up_is_reported_as_rejecting(unstarted_node, mr_series, tmp_path):
    """DCMTK storescp --refuse closes right after its A-ASSOCIATE-RJ; the reason must still say
    "rejected" with the peer's reason, not "could not be reached" (that raced about 1 in 4)."""
    node = unstarted_node
    port = free_port()
    tps = start_storescp(port, tmp_path / "tps", "--refuse")
    try:
        for _ in range(8):
            job_id, _ = exporting_job(node, mr_series[0], ["tps"])
            job = run_until_settled(exporter_for(node, port, give_up_after_s=0.5), node, job_id)
            assert job.state == JobState.FAILED
            assert "rejected the association (Rejected Permanent, source Service User" in job.reason, job.reason
    finally:
        tps.terminate()
        tps.wait(10)


@pytest.mark.parametrize(
    "behaviour, expected",
    [
        ({"status": 0xA700}, "answered failure status 0xA700"),
        ({"ae_title": "NOT_TPS"}, "rejected the association"),
        ({"delay": 3.0}, "did not answer"),
    ],
)
def test_failing_destination_is_retried_then_failed_with_reason_and_resendable(
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

    # `dicom-node jobs export` path: re-send to a now healthy destination.
    assert_resend_delivers(node, job_id, port)


def assert_resend_delivers(node, job_id: int, port: int) -> None:
    """Re-send a failed job's exports (as `dicom-node jobs export`) to a healthy SCP on `port`."""
    good = MisbehavingSCP(port)
    try:
        assert resend(node.db, job_id, ["tps"]) == 1
        job = run_until_settled(exporter_for(node, port), node, job_id)
    finally:
        good.stop()
    assert job.state == JobState.DONE and good.received == 1
