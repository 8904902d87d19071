"""The worker records a job's failure even when the job store is briefly busy (issue 13.10).

A database error while recording the failure left the job `running` until the
next restart; `storage.write_retry` now retries that write.
"""

from __future__ import annotations

import pydicom
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
