"""The worker records a job's failure even when the job store is briefly busy (issue 13.10).

A database error while recording the failure left the job `running` until the
next restart; `storage.write_retry` now retries that write.
"""

from __future__ import annotations

import pydicom
import pytest
from sqlalchemy.exc import OperationalError

import dicom_node.worker
from dicom_node.export_targets import ExportTargets
from dicom_node.store_scp import instance_meta
from dicom_node.worker import ModelRegistry, run_job
from storage.ingest import store_instance
from storage.jobs import RoutingOutcome, claim_next_job, complete_series, load_job
from storage.models import JobState


def test_job_failure_is_recorded_after_the_store_was_busy(unstarted_node, mr_series, tmp_path, monkeypatch):
    node = unstarted_node
    for path in mr_series:
        ds = pydicom.dcmread(path)
        store_instance(
            node.db, node.store, instance_meta(ds, ds.file_meta.TransferSyntaxUID, "TEST"), path.read_bytes()
        )
    missing_model = tmp_path / "no-such-model"
    job_id = complete_series(node.db, 1, RoutingOutcome("r", str(missing_model), [], "test"))
    assert claim_next_job(node.db, "test") == job_id

    real = dicom_node.worker.fail_job
    busy: list[int] = []

    def busy_twice(*args, **kwargs):
        if len(busy) < 2:
            busy.append(1)
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_node.worker, "fail_job", busy_twice)
    run_job(job_id, node.db, node.store, ModelRegistry(), "cpu", "test", ExportTargets([]), max_attempts=3)

    job = load_job(node.db, job_id)
    assert busy == [1, 1]
    assert job.state == JobState.FAILED and "no-such-model" in job.reason, job.reason


@pytest.mark.parametrize("damage", ["short", "missing"])
def test_a_job_never_runs_on_an_instance_file_that_differs_from_what_was_received(unstarted_node, mr_series, damage):
    """A file damaged or lost behind its row (a power cut while its fsync ran, a failing disk): the
    job fails naming the instance and what to do, and is not retried (retrying cannot help)."""
    node = unstarted_node
    for path in mr_series:
        ds = pydicom.dcmread(path)
        store_instance(
            node.db, node.store, instance_meta(ds, ds.file_meta.TransferSyntaxUID, "TEST"), path.read_bytes()
        )
    damaged = pydicom.dcmread(mr_series[2], stop_before_pixels=True).SOPInstanceUID
    stored = next(node.store.root.rglob(f"{damaged}.dcm"))
    content = stored.read_bytes()
    if damage == "short":  # what a power cut leaves of a file whose fsync did not finish
        stored.write_bytes(content[: len(content) // 2])
    else:  # or of one whose rename did not reach the disk
        stored.unlink()
    job_id = complete_series(node.db, 1, RoutingOutcome("r", "default", [], "test"))
    assert claim_next_job(node.db, "test") == job_id

    run_job(job_id, node.db, node.store, ModelRegistry(), "cpu", "test", ExportTargets([]), max_attempts=3)

    job = load_job(node.db, job_id)
    assert job.state == JobState.FAILED, (job.state, job.reason)
    assert f"1 of the series' {len(mr_series)} instance files are missing or differ from what was received" in (
        job.reason
    )
    assert damaged in job.reason and "re-send the series" in job.reason
