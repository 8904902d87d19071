"""Retention with a fake clock: purge only after export, keep the history."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from storage.database import Database
from storage.exports import RetryPolicy, record_attempt
from storage.ingest import InstanceMeta, StoreOutcome, store_instance
from storage.instance_store import InstanceStore
from storage.jobs import (
    RoutingOutcome,
    claim_next_job,
    complete_series,
    fail_job,
    hold_outputs,
    load_job,
    record_outputs,
)
from storage.models import Instance, Job, JobState, Study, utcnow
from storage.retention import purge_expired

MR = "1.2.840.10008.5.1.4.1.1.4"
RT = "1.2.840.10008.5.1.4.1.1.481.3"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def setup(tmp_path: Path, patient: tuple[str, str] | None = None):
    db = Database(f"sqlite:///{tmp_path}/jobs.db")
    store = InstanceStore(tmp_path / "data")
    patient_id, patient_name = patient or (None, None)
    for k in range(3):
        meta = InstanceMeta(
            f"1.2.3.4.{k}", MR, "1.2.3", "1.2.3.4", EXPLICIT_LE, patient_id=patient_id, patient_name=patient_name
        )
        store_instance(db, store, meta, b"DICM-ish bytes %d" % k)
    job_id = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    claim_next_job(db, "w")
    out_dir = store.root / "outputs" / f"job-{job_id}" / "attempt-1"
    out_dir.mkdir(parents=True)
    (out_dir / "rt.dcm").write_bytes(b"rt")
    record_outputs(
        db,
        job_id,
        out_dir.relative_to(store.root).as_posix(),
        {},
        [("tps", "2.25.1", RT, "outputs/rt.dcm")],
    )
    return db, store, job_id


def test_nothing_is_purged_before_export_then_purged_after_age(tmp_path):
    db, store, job_id = setup(tmp_path)
    later = utcnow() + timedelta(days=400)
    # Still exporting: never purged, however old.
    assert purge_expired(db, store, retention_days=30, now=later) == 0
    assert len(list((store.root / "instances").rglob("*.dcm"))) == 3

    export_id = load_job(db, job_id).exports[0].id
    record_attempt(db, export_id, True, "delivered", RetryPolicy(1, 1, 60))
    assert load_job(db, job_id).state == JobState.DONE

    # Done but younger than the retention period: kept.
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=29)) == 0
    # Older: files go, rows and history stay.
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=31)) == 3
    assert not list((store.root / "instances").rglob("*.dcm"))
    assert not (store.root / "outputs" / f"job-{job_id}").exists()
    with db.session() as session:
        assert all(i.purged_at is not None for i in session.scalars(select(Instance)).all())
    job = load_job(db, job_id)
    assert job.state == JobState.DONE and job.purged_at is not None
    assert "retention" in job.events[-1].message
    # Idempotent.
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=60)) == 0


def deliver(db, job_id: int) -> None:
    export_id = load_job(db, job_id).exports[0].id
    record_attempt(db, export_id, True, "delivered", RetryPolicy(1, 1, 60))


def test_a_failed_earlier_job_does_not_keep_a_delivered_series_forever(tmp_path):
    db, store, first = setup(tmp_path)
    fail_job(db, first, "model crashed")
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=400)) == 0  # latest failed: kept
    store_instance(db, store, InstanceMeta("1.2.3.4.9", MR, "1.2.3", "1.2.3.4", EXPLICIT_LE), b"late instance")
    second = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "re-run"))
    assert second != first
    claim_next_job(db, "w")
    record_outputs(db, second, f"outputs/job-{second}/attempt-1", {}, [("tps", "2.25.2", RT, "outputs/rt2.dcm")])
    deliver(db, second)
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=31)) == 4
    assert load_job(db, first).purged_at is not None and load_job(db, second).purged_at is not None


def test_conflicting_resends_are_purged_with_their_series(tmp_path):
    db, store, job_id = setup(tmp_path)
    meta = InstanceMeta("1.2.3.4.0", MR, "1.2.3", "1.2.3.4", EXPLICIT_LE)
    store_instance(db, store, meta, b"different content for the same SOP Instance UID")
    assert list(store.conflicts("1.2.3.4.0").iterdir())
    deliver(db, job_id)
    purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=31))
    assert not store.conflicts("1.2.3.4.0").exists()


def test_the_latest_job_not_done_keeps_everything(tmp_path):
    db, store, job_id = setup(tmp_path)
    fail_job(db, job_id, "export refused")
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=400)) == 0
    assert len(list((store.root / "instances").rglob("*.dcm"))) == 3


def test_patient_identifiers_are_pseudonymised_after_retention_when_configured(tmp_path):
    db, store, job_id = setup(tmp_path, patient=("PAT001", "DOE^JANE"))
    deliver(db, job_id)
    purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=31), pseudonymise=True)
    with db.session() as session:
        study = session.scalars(select(Study)).one()
        job = session.get(Job, job_id)
        assert study.patient_name is None
        assert study.patient_id.startswith("PSEUDO-") and "PAT001" not in study.patient_id
        assert job.patient_id == study.patient_id  # the same patient keeps the same pseudonym
    key = (store.root / "pseudonym.key").stat()
    assert key.st_mode & 0o077 == 0  # readable by the service user only


def test_without_pseudonymisation_identifiers_stay(tmp_path):
    db, store, job_id = setup(tmp_path, patient=("PAT002", "ROE^JOHN"))
    deliver(db, job_id)
    purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=31))
    with db.session() as session:
        assert session.scalars(select(Study.patient_id)).one() == "PAT002"


def test_an_earlier_held_result_is_never_purged_under_a_physicists_eyes(tmp_path):
    """Review reproduction: job 1 held, the series re-delivered and job 2 done: nothing is purged."""
    db = Database(f"sqlite:///{tmp_path}/jobs.db")
    store = InstanceStore(tmp_path / "data")
    for k in range(3):
        store_instance(db, store, InstanceMeta(f"1.2.3.4.{k}", MR, "1.2.3", "1.2.3.4", EXPLICIT_LE), b"bytes %d" % k)
    first = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    claim_next_job(db, "w")
    hold_outputs(db, first, f"outputs/job-{first}/attempt-1", {"outputs": []}, ["31 lesions, limit 30"])
    store_instance(db, store, InstanceMeta("1.2.3.4.9", MR, "1.2.3", "1.2.3.4", EXPLICIT_LE), b"late instance")
    second = complete_series(db, 1, RoutingOutcome("r", "default", [], "re-delivery"))
    claim_next_job(db, "w")
    record_outputs(db, second, f"outputs/job-{second}/attempt-1", {}, [])  # nothing to send: done
    assert load_job(db, second).state == JobState.DONE
    assert purge_expired(db, store, retention_days=1, now=utcnow() + timedelta(days=2)) == 0
    assert load_job(db, first).purged_at is None and load_job(db, first).state == JobState.HELD


def test_a_resend_after_purge_is_stored_again_and_opens_a_new_job(tmp_path):
    """The re-planning case: months after retention, the same series is sent again."""
    db, store, job_id = setup(tmp_path)
    deliver(db, job_id)
    assert purge_expired(db, store, retention_days=30, now=utcnow() + timedelta(days=31)) == 3
    meta = InstanceMeta("1.2.3.4.0", MR, "1.2.3", "1.2.3.4", EXPLICIT_LE)
    assert store_instance(db, store, meta, b"DICM-ish bytes 0") == StoreOutcome.STORED  # not a silent duplicate
    with db.session() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == "1.2.3.4.0")).one()
        assert row.purged_at is None and store.absolute(row.path).read_bytes() == b"DICM-ish bytes 0"
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
    assert len(jobs) == 2 and jobs[-1].state == JobState.RECEIVED  # routed again after the quiet period
