"""The job store on both databases it supports: SQLite (embedded default) and a real PostgreSQL server.

What a department scaling out relies on: concurrent claiming hands each job to
exactly one worker (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL), and a
valid header with maximal-length values is stored, never refused.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.database import Database
from storage.ingest import InstanceMeta, StoreOutcome, store_instance
from storage.instance_store import InstanceStore
from storage.jobs import RoutingOutcome, claim_next_job, complete_series
from storage.models import Job, JobState, Study

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def queue_jobs(db: Database, store: InstanceStore, count: int) -> list[int]:
    jobs = []
    for k in range(count):
        meta = InstanceMeta(f"1.2.3.{k}.1", MR, f"1.2.3.{k}", f"1.2.3.{k}.9", EXPLICIT_LE, patient_id=f"P{k}")
        assert store_instance(db, store, meta, b"instance %d" % k) is StoreOutcome.STORED
        with db.session() as session:
            series_id = session.scalars(select(Job.series_id).where(Job.series_uid == meta.series_uid)).one()
        jobs.append(complete_series(db, series_id, RoutingOutcome("mr", "default", ["tps"], "test")))
    return jobs


def test_concurrent_workers_claim_each_job_exactly_once(job_store_url: str, tmp_path: Path) -> None:
    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    queued = queue_jobs(db, store, 20)
    claims: dict[str, list[int]] = {f"w{i}": [] for i in range(4)}
    start = threading.Barrier(len(claims))

    def work(worker_id: str) -> None:
        start.wait()
        while (job_id := claim_next_job(db, worker_id)) is not None:
            claims[worker_id].append(job_id)

    threads = [threading.Thread(target=work, args=(w,)) for w in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    claimed = [job for jobs in claims.values() for job in jobs]
    assert sorted(claimed) == sorted(queued)  # every job once, none twice
    with db.session() as session:
        rows = session.scalars(select(Job).where(Job.id.in_(queued))).all()
        assert {row.state for row in rows} == {JobState.RUNNING} and {row.attempts for row in rows} == {1}
    db.dispose()


def test_maximal_length_header_values_are_stored(job_store_url: str, tmp_path: Path) -> None:
    """PS3.5 maximum lengths: LO 64 (PatientID), PN 64 per component group, SH 16 (AccessionNumber)."""
    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    name = "=".join(["^".join(["N" * 12] * 5)] * 3)  # three component groups of 64 characters each
    meta = InstanceMeta(
        sop_instance_uid="1." + "2" * 62,  # a 64-character UID
        sop_class_uid=MR,
        study_uid="1." + "3" * 62,
        series_uid="1." + "4" * 62,
        transfer_syntax_uid=EXPLICIT_LE,
        patient_id="P" * 64,
        patient_name=name,
        study_date="20261130",
        accession_number="A" * 16,
        modality="MR",
        series_description="D" * 64,
        calling_ae_title="X" * 16,
    )
    assert store_instance(db, store, meta, b"maximal") is StoreOutcome.STORED
    with db.session() as session:
        study = session.scalars(select(Study)).one()
        assert (study.patient_id, study.accession_number, study.patient_name) == ("P" * 64, "A" * 16, name)
    db.dispose()


@pytest.mark.parametrize("job_store_url", ["postgresql"], indirect=True)
def test_the_postgresql_fixture_really_is_postgresql(job_store_url: str) -> None:
    db = Database(job_store_url)
    assert db.engine.dialect.name == "postgresql"
    db.dispose()
