"""Retention with a fake clock: purge only after export, keep the history."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from storage.database import Database
from storage.exports import RetryPolicy, record_attempt
from storage.ingest import InstanceMeta, store_instance
from storage.instance_store import InstanceStore
from storage.jobs import RoutingOutcome, claim_next_job, complete_series, load_job, record_outputs
from storage.models import Instance, JobState, utcnow
from storage.retention import purge_expired


def setup(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path}/jobs.db")
    store = InstanceStore(tmp_path / "data")
    for k in range(3):
        meta = InstanceMeta(f"1.2.3.4.{k}", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
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
        [("tps", "2.25.1", "1.2.840.10008.5.1.4.1.1.481.3", "outputs/rt.dcm")],
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
