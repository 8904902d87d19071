"""End to end, the "held" guarantee: a series that makes the model report hundreds of lesions
reaches no TPS. DCMTK `storescu` -> the node (one worker, a deliberately weak model) -> DCMTK
`storescp` as the TPS; after a person's release the 300-odd-ROI RTSTRUCT and the SR that arrive
are valid DICOM (dciodvfy).
"""

from __future__ import annotations

import subprocess

import pydicom
import pytest

from dicom_node.peers import free_port
from storage.exports import due_exports
from storage.jobs import list_jobs, load_job, release_job
from storage.models import JobState
from tests.dicom_node.conftest import require_tool, wait_for
from tests.helpers.dciodvfy import dciodvfy_messages


@pytest.mark.slow
def test_hundreds_of_detections_are_held_and_nothing_reaches_the_tps(
    start_node, small_axial_series, firing_model, monkeypatch, tmp_path
):
    monkeypatch.setenv("DICOM_NODE_MODEL", str(firing_model))
    tps_port, tps_folder = free_port(), tmp_path / "tps"
    tps_folder.mkdir()
    tps = subprocess.Popen(
        [require_tool("storescp"), "-aet", "TPS", "-od", str(tps_folder), str(tps_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        node = start_node(
            DICOM_NODE__WORKER__COUNT="1",
            DICOM_NODE__DESTINATIONS__0__PORT=str(tps_port),
            DICOM_NODE__EXPORT__RETRY_INITIAL_S="0.5",
            DICOM_NODE__SERIES__QUIET_PERIOD_S="3",
        )
        sent = subprocess.run(
            [require_tool("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.address[1])]
            + [str(f) for f in small_axial_series.files],
            capture_output=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr

        (job,) = wait_for(lambda: [j for j in list_jobs(node.db) if j.state == JobState.HELD], timeout=300)
        job = load_job(node.db, job.id)
        assert job.reason.startswith("held: ") and "limit" in job.reason, job.reason
        count = len(job.summary["lesions"])
        # An exporter round now (not a wait for the scheduled ones): nothing of the held job is due.
        assert job.exports == [] and node.exporter.run_once() == 0 and due_exports(node.db) == []
        assert list(tps_folder.iterdir()) == []

        release_job(node.db, job.id, "e2e", "checking what a TPS would get")
        wait_for(lambda: load_job(node.db, job.id).state == JobState.DONE, timeout=120)
        received = {pydicom.dcmread(p, stop_before_pixels=True).Modality: p for p in tps_folder.iterdir()}
        assert sorted(received) == ["RTSTRUCT", "SR"]
        assert len(pydicom.dcmread(received["RTSTRUCT"]).StructureSetROISequence) == count
        for path in received.values():
            errors, _ = dciodvfy_messages(path)
            assert errors == [], f"{path.name}: {errors[:5]}"
    finally:
        tps.terminate()
        tps.wait(10)
