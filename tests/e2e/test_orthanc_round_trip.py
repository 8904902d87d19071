"""A real PACS round trip: Orthanc pushes a T1-CE study to the node, the node returns RTSTRUCT and SR to Orthanc.

Orthanc is the C-STORE SCU (REST `/modalities/node/store`) and, as the node's
destination, the C-STORE SCP; its REST API is the oracle for what arrived.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.peers import free_port
from storage.jobs import list_jobs, load_job
from storage.models import JobState
from tests.dicom_node.conftest import wait_for
from tests.helpers.orthanc import OrthancServer, orthanc_binary

pytestmark = pytest.mark.slow


@pytest.fixture
def pacs_and_node(start_node, tmp_path: Path) -> Iterator[tuple[OrthancServer, object]]:
    if orthanc_binary() is None:
        pytest.skip("Orthanc not installed (Debian package 'orthanc'; .ci/run installs it)")
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={"node": ("DICOMNODE", node_port)})
    try:
        node = start_node(
            DICOM_NODE__NODE__PORT=str(node_port),
            DICOM_NODE__WORKER__COUNT="1",
            DICOM_NODE__DESTINATIONS__0__AE_TITLE=orthanc.ae_title,
            DICOM_NODE__DESTINATIONS__0__PORT=str(orthanc.dicom_port),
            DICOM_NODE__EXPORT__RETRY_INITIAL_S="0.5",
        )
        yield orthanc, node
    finally:
        orthanc.stop()


def test_orthanc_pushes_a_study_and_gets_rtstruct_and_sr_back_in_the_same_study(pacs_and_node, phantom_series) -> None:
    orthanc, node = pacs_and_node
    series = phantom_series(5151, orientation="axial", matrix=96, slices=20, n_lesions=2)
    orthanc.upload(series.files)
    (study_id,) = orthanc.get("/studies")
    orthanc.post("/modalities/node/store", {"Resources": [study_id], "Synchronous": True})

    def finished():
        jobs = [load_job(node.db, j.id) for j in list_jobs(node.db)]
        return (
            jobs if jobs and all(j.state in (JobState.DONE, JobState.FAILED, JobState.REJECTED) for j in jobs) else None
        )

    (job,) = wait_for(finished, timeout=300, interval=0.5)
    assert job.state == JobState.DONE, job.reason

    modalities = {}
    for series_id in orthanc.get(f"/studies/{study_id}")["Series"]:
        info = orthanc.get(f"/series/{series_id}")
        modalities[info["MainDicomTags"]["Modality"]] = info["Instances"]
    assert set(modalities) == {"MR", "RTSTRUCT", "SR"}, modalities
    assert len(modalities["MR"]) == len(series.files)
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    for kind in ("RTSTRUCT", "SR"):
        (instance_id,) = modalities[kind]
        path = node.store.root / f"from-orthanc-{kind}.dcm"
        path.write_bytes(orthanc.file(instance_id))
        returned = pydicom.dcmread(path)  # parses back as Part 10
        assert returned.Modality == kind
        assert returned.StudyInstanceUID == source.StudyInstanceUID
    rtstruct = pydicom.dcmread(node.store.root / "from-orthanc-RTSTRUCT.dcm")
    assert rtstruct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == source.FrameOfReferenceUID


def test_echo_both_ways(pacs_and_node) -> None:
    orthanc, node = pacs_and_node
    assert orthanc.post("/modalities/node/echo", {}) == {}  # Orthanc's C-ECHO SCU to the node
    echo = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "echo", "127.0.0.1", str(orthanc.dicom_port),
         "--aet", "DICOMNODE", "--aec", orthanc.ae_title],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stdout + echo.stderr
