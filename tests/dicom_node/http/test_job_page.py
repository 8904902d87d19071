"""A job run end to end, seen through the operations view: pages in headless Chromium, downloads, metrics.

One inference run (module fixture `done_job`) serves every test here. The job
page's screenshot is saved under the test's tmp folder and its path printed
(`pytest -s` shows it); docs/screenshots/job-page.png is a copy for review.
"""

from __future__ import annotations

import io

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage.jobs import load_job
from storage.models import Study
from tests.dicom_node.http.conftest import node_url, request

pytestmark = pytest.mark.slow


def test_job_page_in_headless_chromium(done_job, browser, tmp_path, record_property) -> None:
    url = node_url(done_job.service)
    job = load_job(done_job.service.db, done_job.job_id)
    summary = job.summary
    overlay = request(f"{url}/jobs/{job.id}/overlay.png")  # drawn once, then served from disk
    assert overlay.status == 200 and overlay.body.startswith(b"\x89PNG")

    screenshot = tmp_path / "job-page.png"
    dom = browser(f"{url}/jobs/{job.id}", screenshot=screenshot)
    print(f"\njob page screenshot: {screenshot}")
    record_property("screenshot", str(screenshot))  # in the JUnit XML report too
    assert screenshot.stat().st_size > 20_000
    assert f"Job {job.id}" in dom and "done" in dom
    assert "DEMO MODEL" in dom  # the shipped package is a demo: said on the page
    for lesion in summary["lesions"]:
        assert lesion["name"] in dom and f"{lesion['volume_cm3']:.3f}" in dom
    assert f"EGFR:</strong> {summary['egfr']['call']}" in dom
    for stage in ("load", "preprocess", "model", "postprocess", "write outputs"):
        assert f"<td>{stage}</td>" in dom
    # exports per destination, delivered on the first attempt, no error
    assert dom.count("<td>tps</td>") == len(job.exports) == 2
    assert 'id="overlay" src="/jobs/' in dom
    assert f'href="/jobs/{job.id}/outputs/RTSTRUCT"' in dom and f'href="/jobs/{job.id}/outputs/SR"' in dom

    listing = browser(f"{url}/jobs?state=done&refresh=0")
    assert f'href="/jobs/{job.id}"' in listing and job.study_uid in listing
    assert "No job matches." in browser(f"{url}/jobs?state=failed&refresh=0")
    associations = browser(f"{url}/associations?refresh=0")
    assert "MR_SCANNER" in associations and "released" in associations
    destinations = browser(f"{url}/destinations")
    assert "delivered to TPS@127.0.0.1" in destinations
    system = browser(f"{url}/system")
    assert "mtsa" in system and "DEMO - not for clinical use" in system and "alive" in system


def test_downloads_are_the_delivered_objects(done_job) -> None:
    url = node_url(done_job.service)
    job = load_job(done_job.service.db, done_job.job_id)
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in done_job.tps.received()}
    for name, modality in (("RTSTRUCT", "RTSTRUCT"), ("SR", "SR")):
        reply = request(f"{url}/jobs/{job.id}/outputs/{name}")
        assert reply.status == 200 and reply.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(reply.body))
        assert ds.Modality == modality and ds.SOPInstanceUID in received
    assert request(f"{url}/jobs/{job.id}/outputs/..%2F..%2Fdicom-node.db").status == 404


def test_metrics_cover_the_job_and_carry_no_patient_data(done_job) -> None:
    service = done_job.service
    text = request(f"{node_url(service)}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "dicom_node_instances_received",
        "dicom_node_bytes_received",
        "dicom_node_cstore_handling_seconds",
        "dicom_node_associations_active",
        "dicom_node_associations",
        "dicom_node_associations_rejected",
        "dicom_node_jobs",
        "dicom_node_jobs_held",
        "dicom_node_stage_duration_seconds",
        "dicom_node_export_attempts",
        "dicom_node_exports_pending",
        "dicom_node_export_oldest_pending_age_seconds",
        "dicom_node_disk_free_bytes",
    }
    assert expected <= set(families)

    samples = [s for family in families.values() for s in family.samples]

    def value(name: str, **labels) -> float:
        return next(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    files = load_job(service.db, done_job.job_id).instance_count
    assert files == len(done_job.files)
    assert value("dicom_node_instances_received_total", calling_ae="MR_SCANNER", outcome="stored") == files
    assert value("dicom_node_cstore_handling_seconds_count") == files
    assert value("dicom_node_jobs", state="done") == 1
    assert value("dicom_node_export_attempts_total", destination="tps", outcome="delivered") == 2
    assert value("dicom_node_stage_duration_seconds_count", stage="model") == 1
    assert value("dicom_node_disk_free_bytes") > 0

    with service.db.session() as session:
        study = session.query(Study).one()
        patient = {study.patient_name, study.patient_id, study.study_uid, study.accession_number} - {None, ""}
    labels = {v for family in families.values() for s in family.samples for v in s.labels.values()}
    leaked = [p for p in patient for label in labels if p in label or label and label in p and len(label) > 3]
    assert leaked == [], f"patient data in metric labels: {leaked}"
    assert str(study.patient_name).split("^")[0] not in text


def test_reexport_from_the_job_page_is_delivered_and_recorded(done_job) -> None:
    """Last in this module: it sends the outputs again (the tests above read the first delivery)."""
    from storage.models import JobState
    from tests.dicom_node.conftest import wait_for
    from tests.dicom_node.http.conftest import basic

    service = done_job.service
    url = node_url(service)
    reply = request(f"{url}/jobs/{done_job.job_id}/export", method="POST", auth=basic("alice"), data=b"destination=tps")
    assert reply.status == 303 and "2%20export" in reply.headers["location"]
    job = wait_for(lambda: (j := load_job(service.db, done_job.job_id)).state == JobState.DONE and j, timeout=60)
    assert "export by alice (physicist) from the web view: 2 export(s) pending again" in [e.message for e in job.events]
    assert all(e.attempts == 2 for e in job.exports)
    metrics = request(f"{url}/metrics").text
    assert 'dicom_node_export_attempts_total{destination="tps",outcome="delivered"} 4.0' in metrics
