"""The job store's side of series completion, on SQLite and PostgreSQL: which series await
routing at an injected instant, a note on a waiting job, and an incomplete series' failed job."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from storage.database import Database
from storage.ingest import InstanceMeta, StoreOutcome, store_instance
from storage.instance_store import InstanceStore
from storage.jobs import (
    RoutingOutcome,
    complete_series,
    load_job,
    note_on_received_job,
    retry_job,
    series_awaiting_routing,
    series_instance_paths,
)
from storage.models import JobState, Series
from tests.helpers.clock import FakeClock

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def store(db: Database, instances: InstanceStore, series_uid: str, count: int) -> None:
    for k in range(count):
        meta = InstanceMeta(f"{series_uid}.{k + 1}", MR, "1.2.3", series_uid, EXPLICIT_LE, patient_id="P1")
        assert store_instance(db, instances, meta, b"instance %s %d" % (series_uid.encode(), k)) is StoreOutcome.STORED


def test_series_await_routing_from_the_quiet_period_after_their_last_instance(job_store_url: str, tmp_path: Path):
    db, instances = Database(job_store_url), InstanceStore(tmp_path / "data")
    store(db, instances, "1.2.3.4", 3)
    with db.session() as session:
        series_id, last = session.execute(select(Series.id, Series.last_received_at)).one()
    clock = FakeClock()

    clock.set(last, 4.9)
    assert series_awaiting_routing(db, 5, clock) == []
    clock.set(last, 5)
    [awaiting] = series_awaiting_routing(db, 5, clock)
    assert (awaiting.series_id, awaiting.series_uid, awaiting.instance_count) == (series_id, "1.2.3.4", 3)
    assert awaiting.last_received_at == last
    assert series_instance_paths(db, series_id) == [f"instances/1.2.3/1.2.3.4/1.2.3.4.{k}.dcm" for k in (1, 2, 3)]

    assert note_on_received_job(db, series_id, "waiting for the rest: 3 of 5 images")
    outcome = RoutingOutcome(
        "brain-mr", "default", ["tps"], "incomplete series: 3 of 5", failed=True, completeness="incomplete: 3 of 5"
    )
    job = load_job(db, complete_series(db, series_id, outcome))
    assert job.state == JobState.FAILED and job.reason == "failed: incomplete series: 3 of 5"
    assert (job.rule_name, job.model, job.destinations) == ("brain-mr", "default", ["tps"])
    messages = [e.message for e in job.events]
    assert "waiting for the rest: 3 of 5 images" in messages and "completeness: incomplete: 3 of 5" in messages
    assert series_awaiting_routing(db, 5, clock) == []  # evaluated
    assert not note_on_received_job(db, series_id, "no received job any more")
    retry_job(db, job.id)  # the rule was kept: a physicist can run it as it is
    assert load_job(db, job.id).state == JobState.QUEUED
