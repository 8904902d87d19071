"""End to end with real peers: DCMTK storescu -> the node (demo model) -> DCMTK storescp (the TPS).

Also: a corrupt series fails with its reason while the next study completes,
and a SIGKILL during inference followed by a restart completes the job once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.peers import free_port
from dicom_node.settings import load_settings
from storage.database import Database
from storage.jobs import list_jobs, load_job
from storage.models import EventKind, JobState
from tests.dicom_node.conftest import require_tool, start_storescp, storescu, wait_for
from tests.helpers.dciodvfy import dciodvfy_messages
from tests.helpers.node_processes import NodeProcess, clean_env

EXPECTED_STAGES = {"load", "preprocess", "model", "postprocess", "write outputs"}


@pytest.fixture
def study(phantom_series):
    """`study(seed, patient_id, **kw) -> files`: a small axial phantom (96x96, 20 slices, 2 lesions by default)."""

    def make(seed: int, patient_id: str, **kw) -> list[Path]:
        kw = {"orientation": "axial", "matrix": 96, "slices": 20, "n_lesions": 2, **kw}
        return list(phantom_series(seed, patient_id=patient_id, **kw).files)

    return make


def received_by_modality(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        found.setdefault(pydicom.dcmread(path, stop_before_pixels=True).Modality, []).append(path)
    return found


@pytest.fixture
def tps(tmp_path):
    port = free_port()
    folder = tmp_path / "tps"
    process = start_storescp(port, folder)
    yield port, folder
    process.terminate()
    process.wait(10)


def node_with_tps(start_node, tps_port: int, **env: str):
    return start_node(
        DICOM_NODE__WORKER__COUNT="1",
        DICOM_NODE__DESTINATIONS__0__PORT=str(tps_port),
        DICOM_NODE__EXPORT__RETRY_INITIAL_S="0.5",
        **env,
    )


def finished(node, count: int):
    jobs = [load_job(node.db, j.id) for j in list_jobs(node.db)]
    done = [j for j in jobs if j.state in (JobState.DONE, JobState.FAILED, JobState.REJECTED)]
    return sorted(done, key=lambda j: j.id) if len(done) >= count else None


def test_storescu_to_node_to_storescp_with_valid_outputs(start_node, tps, study):
    tps_port, tps_folder = tps
    node = node_with_tps(start_node, tps_port)
    files = study(3101, "E2E0001")
    assert storescu(node.address[1], files).returncode == 0

    (job,) = wait_for(lambda: finished(node, 1), timeout=300, interval=0.5)
    assert job.state == JobState.DONE, job.reason
    states = [e.state.value for e in job.events if e.kind == EventKind.STATE]
    assert states == ["received", "queued", "running", "exporting", "done"]
    stages = {e.message for e in job.events if e.kind == EventKind.STAGE}
    assert EXPECTED_STAGES <= stages, stages
    assert all(e.duration_s is not None and e.duration_s >= 0 for e in job.events if e.kind == EventKind.STAGE)

    received = received_by_modality(tps_folder)
    assert len(received.get("RTSTRUCT", [])) == 1 and len(received.get("SR", [])) == 1
    for path in received["RTSTRUCT"] + received["SR"]:
        errors, _ = dciodvfy_messages(path)
        assert errors == [], f"{path.name}: {errors}"
    rtstruct = pydicom.dcmread(received["RTSTRUCT"][0])
    source = pydicom.dcmread(files[0])
    assert rtstruct.StudyInstanceUID == source.StudyInstanceUID
    assert rtstruct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == source.FrameOfReferenceUID
    assert "DEMO" in rtstruct.StructureSetLabel.upper() or "DEMO" in rtstruct.SeriesDescription.upper()
    assert job.summary["egfr"]["call"] in ("mutant", "wild type", "not assessable")


def test_one_study_t1ce_t2_and_nan_geometry_only_the_t1ce_is_contoured(start_node, tps, study, edited_series):
    """Issue 12's guarantee: a T2 and a T1-CE of one study sent together, plus a third series
    of that study with a NaN slice position. Only the T1-CE reaches the TPS; the other two jobs
    say why not."""
    tps_port, tps_folder = tps
    node = node_with_tps(start_node, tps_port)
    t1ce = study(3111, "E2E0002")
    study_uid = str(pydicom.dcmread(t1ce[0], stop_before_pixels=True).StudyInstanceUID)
    t2 = edited_series(study(3112, "E2E0002"), StudyInstanceUID=study_uid, SeriesDescription="AX T2 FLAIR")
    nan = edited_series(study(3113, "E2E0002", slices=12), StudyInstanceUID=study_uid)
    nan = edited_series(nan, [5], ImagePositionPatient=["NaN", "0", "0"])
    assert storescu(node.address[1], t1ce + t2 + nan).returncode == 0

    jobs = wait_for(lambda: finished(node, 3), timeout=300, interval=0.5)
    by_series = {j.series_uid: j for j in jobs}
    uid = {
        name: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        for name, files in (("t1ce", t1ce), ("t2", t2), ("nan", nan))
    }
    assert by_series[uid["t1ce"]].state == JobState.DONE, by_series[uid["t1ce"]].reason
    rejected = by_series[uid["t2"]]
    assert rejected.state == JobState.REJECTED and "T2" in rejected.reason, rejected.reason
    failed = by_series[uid["nan"]]
    assert failed.state == JobState.FAILED and "non-finite ImagePositionPatient" in failed.reason, failed.reason

    received = received_by_modality(tps_folder)
    assert len(received.get("RTSTRUCT", [])) == 1 and len(received.get("SR", [])) == 1, received
    rtstruct = pydicom.dcmread(received["RTSTRUCT"][0])
    referenced = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == uid["t1ce"]


def test_corrupt_series_fails_with_reason_and_next_study_completes(start_node, tps, study):
    tps_port, tps_folder = tps
    node = node_with_tps(start_node, tps_port, DICOM_NODE__SERIES__PARTIAL_QUIET_PERIOD_S="5")
    corrupt = study(3202, "E2EBAD1", slices=16)
    del corrupt[7]  # a missing slice in the middle: a gap the loader must name
    good = study(3303, "E2EGOOD", slices=16)
    assert storescu(node.address[1], corrupt).returncode == 0
    assert storescu(node.address[1], good).returncode == 0

    first, second = wait_for(lambda: finished(node, 2), timeout=300, interval=0.5)
    assert first.patient_id == "E2EBAD1" and first.state == JobState.FAILED
    assert "missing" in first.reason.lower() or "gap" in first.reason.lower(), first.reason
    assert "incomplete series" in first.reason, first.reason  # found by the watcher, before any pixel is read
    assert second.patient_id == "E2EGOOD" and second.state == JobState.DONE, second.reason
    assert len(received_by_modality(tps_folder).get("RTSTRUCT", [])) == 1


def test_sigkill_during_inference_then_restart_completes_the_job_once(node_env, tps, tmp_path, study):
    tps_port, tps_folder = tps
    port = free_port()
    env = {
        **node_env,
        "DICOM_NODE__NODE__PORT": str(port),
        "DICOM_NODE__WORKER__COUNT": "1",
        "DICOM_NODE__DESTINATIONS__0__PORT": str(tps_port),
        "DICOM_NODE__EXPORT__RETRY_INITIAL_S": "0.5",
        "DICOM_NODE__LOGGING__FORMAT": "json",
    }
    config = Path(__file__).resolve().parents[2] / "config" / "node.example.toml"
    db = Database(load_settings(config, env=env).storage.resolved_database_url)
    files = study(3404, "E2EKILL", matrix=128, slices=40)

    log = tmp_path / "serve.log"
    process = NodeProcess(["serve", "--config", str(config)], log, clean_env(**env))
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [require_tool("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(port)], capture_output=True
                ).returncode
                == 0
            ),
            timeout=60,
        )
        assert storescu(port, files).returncode == 0
        wait_for(lambda: any(j.state == JobState.RUNNING for j in list_jobs(db)), timeout=120, interval=0.05)
        time.sleep(0.5)  # inside the pipeline (model loading / preprocessing)
        process.kill()
        (job,) = list_jobs(db)
        assert job.state == JobState.RUNNING  # killed mid-run: nothing got further

        process.start()  # the restart, on the same data dir
        done = wait_for(
            lambda: (j := list_jobs(db)[0]).state in (JobState.DONE, JobState.FAILED) and j, timeout=300, interval=0.5
        )
    finally:
        process.stop()
    job = load_job(db, done.id)
    assert job.state == JobState.DONE, job.reason
    assert job.attempts == 2
    # Re-queued at the restart, as the job of the dead previous incarnation (not after its 60 s lease).
    assert any(
        e.message.startswith("re-queued (attempt 1 of 3 ended: interrupted run: ")
        and "is no longer running" in e.message
        for e in job.events
    )
    received = received_by_modality(tps_folder)
    assert len(received.get("RTSTRUCT", [])) == 1 and len(received.get("SR", [])) == 1


def test_demo_command_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "demo", "--out", str(out), "--matrix", "96", "--slices", "20"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Stage timings" in result.stdout and "EGFR" in result.stdout
    assert "RTSTRUCT" in result.stdout and "NOT FOR CLINICAL USE" in result.stdout
    modalities = received_by_modality(out / "tps-received")
    assert set(modalities) == {"RTSTRUCT", "SR"}
    assert (out / "overlay.png").stat().st_size > 10_000
