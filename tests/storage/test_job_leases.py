"""Leases on a real SQLite job store: claimed with a lease, renewed by the holder only,
re-queued once expired (and only then), and a run that lost its lease records nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from storage.database import Database
from storage.ingest import InstanceMeta, store_instance
from storage.instance_store import InstanceStore
from storage.jobs import (
    LeaseLost,
    RoutingOutcome,
    claim_next_job,
    complete_series,
    fail_job,
    load_job,
    record_outputs,
    renew_lease,
    requeue_expired_leases,
    requeue_jobs_of,
)
from storage.models import EventKind, Job, JobState, utcnow

RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


@pytest.fixture
def queued_job(tmp_path: Path) -> Iterator[tuple[Database, int]]:
    """A job store with one queued job (a two-instance series routed to `tps`)."""
    db = Database(f"sqlite:///{tmp_path}/jobs.db")
    store = InstanceStore(tmp_path / "data")
    for k in range(2):
        meta = InstanceMeta(f"1.2.3.4.{k}", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
        store_instance(db, store, meta, b"DICM-ish bytes %d" % k)
    job_id = complete_series(db, 1, RoutingOutcome("r", "default", ["tps"], "test"))
    yield db, job_id
    db.dispose()


def expire(db: Database, job_id: int) -> None:
    """As if the holder's last heartbeat was long ago."""
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_claim_leases_the_job_and_only_its_holder_renews_it(queued_job):
    db, job_id = queued_job
    before = utcnow()
    assert claim_next_job(db, "hostA:11:aa:worker-0", lease_s=30) == job_id
    job = load_job(db, job_id)
    assert job.claimed_by == "hostA:11:aa:worker-0"
    assert before + timedelta(seconds=29) < job.lease_expires_at < utcnow() + timedelta(seconds=31)

    assert renew_lease(db, job_id, "hostA:11:aa:worker-0", lease_s=120)
    assert load_job(db, job_id).lease_expires_at > utcnow() + timedelta(seconds=100)
    # Another process on the same host (other pid and nonce) cannot renew, nor take it.
    assert not renew_lease(db, job_id, "hostA:12:bb:worker-0", lease_s=120)
    assert claim_next_job(db, "hostA:12:bb:worker-0") is None


def test_a_live_lease_is_never_requeued_an_expired_one_is_once(queued_job):
    db, job_id = queued_job
    claim_next_job(db, "hostA:11:aa:worker-0", lease_s=60)
    assert requeue_expired_leases(db, 3) == []
    assert load_job(db, job_id).state == JobState.RUNNING

    expire(db, job_id)
    assert requeue_expired_leases(db, 3) == [job_id]
    assert requeue_expired_leases(db, 3) == []
    job = load_job(db, job_id)
    assert job.state == JobState.QUEUED and job.lease_expires_at is None and job.attempts == 1
    requeued = [e for e in job.events if e.kind == EventKind.STATE][-1]
    assert "lease of hostA:11:aa:worker-0 expired" in requeued.message
    # Renewing after the fact does not bring the job back to the dead holder.
    assert not renew_lease(db, job_id, "hostA:11:aa:worker-0", lease_s=60)

    assert claim_next_job(db, "hostB:7:cc:worker-0") == job_id
    assert load_job(db, job_id).attempts == 2


def test_a_running_job_without_a_lease_counts_as_expired(queued_job):
    """Jobs claimed before leases existed have none; nothing renews them."""
    db, job_id = queued_job
    claim_next_job(db, "oldhost-worker-0")
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=None))
    assert requeue_expired_leases(db, 3) == [job_id]


def test_a_run_that_lost_its_lease_records_neither_outputs_nor_failure(queued_job):
    db, job_id = queued_job
    claim_next_job(db, "hostA:11:aa:worker-0")
    expire(db, job_id)
    requeue_expired_leases(db, 3)
    claim_next_job(db, "hostB:7:cc:worker-0")
    output = [("tps", "2.25.1", RTSTRUCT, "outputs/job-1/attempt-1/rt.dcm")]

    with pytest.raises(LeaseLost, match="no longer holds attempt 1"):
        record_outputs(db, job_id, "outputs/job-1/attempt-1", {}, output, holder=("hostA:11:aa:worker-0", 1))
    with pytest.raises(LeaseLost):
        fail_job(db, job_id, "late failure", holder=("hostA:11:aa:worker-0", 1))
    job = load_job(db, job_id)
    assert job.state == JobState.RUNNING and job.exports == [] and job.output_dir is None

    second = [("tps", "2.25.2", RTSTRUCT, "outputs/job-1/attempt-2/rt.dcm")]
    record_outputs(db, job_id, "outputs/job-1/attempt-2", {}, second, holder=("hostB:7:cc:worker-0", 2))
    job = load_job(db, job_id)
    assert job.state == JobState.EXPORTING and [e.sop_instance_uid for e in job.exports] == ["2.25.2"]


def test_the_jobs_of_a_dead_process_are_requeued_at_once_and_only_its_own(queued_job):
    db, job_id = queued_job
    claim_next_job(db, "hostA:11:aa:worker-0", lease_s=60)
    assert requeue_jobs_of(db, "hostA:11:a", 3) == []  # another process's id is not a prefix match
    assert requeue_jobs_of(db, "hostA:11:aab", 3) == []
    assert requeue_jobs_of(db, "hostA:11:aa", 3) == [job_id]
    job = load_job(db, job_id)
    assert job.state == JobState.QUEUED and job.attempts == 1
    assert (
        "hostA:11:aa:worker-0 is no longer running" in [e for e in job.events if e.kind == EventKind.STATE][-1].message
    )
