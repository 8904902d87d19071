"""After losing the job store, `store reindex` rebuilds the revision history of the results from the
output files, so that a re-run supersedes the latest of them instead of writing r1 again (issue 14).

The worker's `run_job` with a tiny real model writes the outputs; the database is deleted; the
`dicom-node store reindex` command (a separate process) rebuilds it; the re-run is checked in its files.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.commands.store import stored_instance_meta
from dicom_node.export_targets import ExportTargets
from dicom_node.worker import ModelRegistry, run_job
from storage.database import Database
from storage.ingest import store_instance
from storage.instance_store import InstanceStore
from storage.jobs import RoutingOutcome, claim_next_job, complete_series, load_job, retry_job
from storage.models import Job, JobState, Output
from storage.reindex import reindex
from storage.store_identity import check_and_bind
from tests.dicom_node.conftest import cli
from tests.dicom_node.test_reruns import package_without_bounds

pytestmark = pytest.mark.slow
WORKER = "test:1:aa:worker-0"


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny package that finds "lesions" on `mr_series` (so each run writes an RTSTRUCT and an SR)."""
    return package_without_bounds(
        tmp_path_factory.mktemp("reindex-model"),
        gtv_gain=50.0,
        thresholds={"gtv_probability": 0.5, "min_lesion_volume_mm3": 0.0},
    )


def run(db: Database, store: InstanceStore, job_id: int) -> dict[str, pydicom.Dataset]:
    """One attempt of `job_id` by the worker; its objects by kind (no destinations: it ends `done`)."""
    assert claim_next_job(db, WORKER) == job_id
    run_job(job_id, db, store, ModelRegistry(), "cpu", WORKER, ExportTargets([]), 3)
    job = load_job(db, job_id)
    assert job.state == JobState.DONE, job.reason
    folder = store.attempt_outputs(job_id, job.attempts)
    written = {str(ds.Modality): ds for ds in map(pydicom.dcmread, sorted(folder.glob("*.dcm")))}
    assert set(written) == {"RTSTRUCT", "SR"}
    return written


def predecessor_sr(sr: pydicom.Dataset) -> str:
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (reference,) = series.ReferencedSOPSequence
    return str(reference.ReferencedSOPInstanceUID)


def test_a_rerun_after_the_database_was_lost_and_reindexed_continues_the_revisions(
    node_env, mr_series, lesion_model
) -> None:
    data_dir = Path(node_env["DICOM_NODE__STORAGE__DATA_DIR"])
    store = InstanceStore(data_dir)
    url = f"sqlite:///{data_dir}/dicom-node.db"  # the node's default job store
    db = Database(url)
    check_and_bind(db, store)
    for path in mr_series:
        store_instance(db, store, stored_instance_meta(path), path.read_bytes())
    rule = RoutingOutcome("r", str(lesion_model), [], "test")
    job_id = complete_series(db, 1, rule)
    first = run(db, store, job_id)
    retry_job(db, job_id)
    second = run(db, store, job_id)  # r2, in the same output series
    assert [second[k].InstanceNumber for k in ("RTSTRUCT", "SR")] == [2, 2]
    db.dispose()
    for database_file in data_dir.glob("dicom-node.db*"):
        database_file.unlink()
    # Not the node's output: a file named as an RTSTRUCT that holds the SR; listed, left in place.
    impostor = store.attempt_outputs(job_id, 1) / f"RTSTRUCT_{second['SR'].SOPInstanceUID}.dcm"
    impostor.write_bytes(next(store.attempt_outputs(job_id, 2).glob("SR_*.dcm")).read_bytes())

    dry = cli(node_env, "store", "reindex", "--dry-run")
    assert dry.returncode == 1, dry.stderr  # 1: a file could not be indexed (the impostor)
    assert (
        "5 output files: 0 already known, would add 4 in 2 output series (the next re-run continues their"
        f" revisions), jobs to recreate for them: {job_id}, 1 not indexed"
    ) in dry.stdout
    assert f"output not indexed, left in place: {impostor.relative_to(data_dir).as_posix()}: its header" in dry.stdout
    db = Database(url)
    with db.session() as session:  # a dry run writes nothing
        assert session.scalars(select(Job)).all() == [] and session.scalars(select(Output)).all() == []
    db.dispose()

    done = cli(node_env, "store", "reindex")
    assert done.returncode == 1 and "added 4 in 2 output series" in done.stdout, done.stderr
    assert f"jobs recreated for them: {job_id}" in done.stdout and impostor.exists()
    db = Database(url)
    restored = load_job(db, job_id)
    assert (restored.state, restored.attempts, restored.series_uid) == (
        JobState.DONE,
        2,
        str(first["SR"].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID),
    )
    assert restored.reason is not None and "rebuilt by store reindex" in restored.reason
    # `jobs show` and the web view find the last attempt's lesions (its summary.json) and files again.
    assert restored.summary is not None and len(restored.summary["lesions"]) == 3
    assert [tuple(o) for o in restored.summary["outputs"]] == [
        (str(ds.SOPInstanceUID), str(ds.SOPClassUID), f"outputs/job-{job_id}/attempt-2/{kind}_{ds.SOPInstanceUID}.dcm")
        for kind, ds in sorted(second.items())
    ]

    # A later delivery of the series (say, a re-send months later): r3, naming r2, in the same series.
    later = complete_series(db, restored.series_id, rule)
    assert later != job_id  # a new id: it never writes into the old job's folder
    third = run(db, store, later)
    for kind in ("RTSTRUCT", "SR"):
        assert third[kind].SeriesInstanceUID == first[kind].SeriesInstanceUID
        assert third[kind].InstanceNumber == 3
    assert predecessor_sr(third["SR"]) == second["SR"].SOPInstanceUID
    rtstruct = third["RTSTRUCT"]
    assert rtstruct.StructureSetLabel.endswith(" r3")
    assert rtstruct.PredecessorStructureSetSequence[0].ReferencedSOPInstanceUID == second["RTSTRUCT"].SOPInstanceUID
    assert f"(job {job_id}, attempt 2)." in rtstruct.StructureSetDescription
    # The old folders are untouched.
    assert {p.name for p in store.attempt_outputs(job_id, 2).glob("*.dcm")} == {
        f"RTSTRUCT_{second['RTSTRUCT'].SOPInstanceUID}.dcm",
        f"SR_{second['SR'].SOPInstanceUID}.dcm",
    }

    again = reindex(db, store, stored_instance_meta)  # idempotent: the re-run's rows exist, nothing is added
    assert (again.output_files, again.outputs_known, again.outputs_added, again.jobs_restored) == (7, 6, 0, [])
    db.dispose()


def receive_and_run(db: Database, store: InstanceStore, mr_series: list[Path], rule: RoutingOutcome) -> int:
    check_and_bind(db, store)
    for path in mr_series:
        store_instance(db, store, stored_instance_meta(path), path.read_bytes())
    job_id = complete_series(db, 1, rule)
    run(db, store, job_id)
    return job_id


def test_reindex_into_a_new_job_store_restores_the_jobs_ids_and_routes_after_them(
    job_store_url, tmp_path, mr_series, lesion_model
) -> None:
    """SQLite and PostgreSQL: a job recreated under its own id; `--route`'s new job comes after it."""
    store = InstanceStore(tmp_path / "data")
    old = Database(f"sqlite:///{tmp_path}/old.db")
    rule = RoutingOutcome("r", str(lesion_model), [], "test")
    first_job = receive_and_run(old, store, mr_series, rule)
    second_job = complete_series(old, 1, rule)  # a later delivery: job 2, r2
    second = run(old, store, second_job)
    old.dispose()
    db = Database(job_store_url)

    report = reindex(db, store, stored_instance_meta, route=True)

    assert (report.outputs_added, len(report.output_series), report.jobs_restored) == (4, 2, [1, 2])
    with db.session() as session:
        jobs = [(j.id, j.state) for j in session.scalars(select(Job).order_by(Job.id))]
        rows = session.scalars(select(Output).order_by(Output.id)).all()
    assert jobs == [(first_job, JobState.DONE), (second_job, JobState.DONE), (3, JobState.RECEIVED)]
    assert [(r.job_id, r.kind) for r in rows] == [(1, "RTSTRUCT"), (2, "RTSTRUCT"), (1, "SR"), (2, "SR")]
    later = complete_series(db, 1, rule)  # the routed job
    assert later == 3
    third = run(db, store, later)
    assert [third[k].InstanceNumber for k in ("RTSTRUCT", "SR")] == [3, 3]
    assert predecessor_sr(third["SR"]) == second["SR"].SOPInstanceUID
    db.dispose()


def test_after_restoring_an_older_backup_the_later_attempts_get_their_rows(tmp_path, mr_series, lesion_model) -> None:
    store = InstanceStore(tmp_path / "data")
    database = tmp_path / "jobs.db"
    db = Database(f"sqlite:///{database}")
    rule = RoutingOutcome("r", str(lesion_model), [], "test")
    job_id = receive_and_run(db, store, mr_series, rule)
    db.dispose()
    backup = database.read_bytes()  # attempt 1 only
    db = Database(f"sqlite:///{database}")
    retry_job(db, job_id)
    second = run(db, store, job_id)
    db.dispose()
    database.write_bytes(backup)  # the backup restored
    db = Database(f"sqlite:///{database}")

    report = reindex(db, store, stored_instance_meta)

    assert (report.outputs_known, report.outputs_added, report.jobs_restored) == (2, 2, [])
    assert load_job(db, job_id).attempts == 2  # its next attempt is 3: attempt-2/ is never written again
    retry_job(db, job_id)
    third = run(db, store, job_id)
    assert load_job(db, job_id).attempts == 3
    assert third["SR"].InstanceNumber == 3 and predecessor_sr(third["SR"]) == second["SR"].SOPInstanceUID
    db.dispose()
