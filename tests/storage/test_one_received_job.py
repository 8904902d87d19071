"""One `received` job per series (schema revision 0005), on SQLite and PostgreSQL.

Two first instances of a new delivery, stored at once, both look for the
series' open job and both insert one when neither sees the other's. The
races are staged deterministically: each thread's first look waits at a
barrier for the other's, so both have looked before either inserts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from alembic import command
from pydicom.data import get_testdata_file
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

import storage.ingest as ingest
from dicom_node.store_scp import instance_meta
from storage.database import Database, make_engine
from storage.ingest import (
    ConflictPolicy,
    InstanceMeta,
    StoreOutcome,
    _commit_row_opening_job,
    _restore_row,
    store_instance,
)
from storage.instance_store import InstanceStore
from storage.jobs import RoutingOutcome, complete_series, load_job
from storage.models import EventKind, Instance, Job, JobState, Series, Study, utcnow
from storage.schema import _config, current_revision, head_revision, upgrade

MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY, SERIES = "1.2.826.0.1.7", "1.2.826.0.1.7.1"


def meta(number: int) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid=f"{SERIES}.{number}",
        sop_class_uid=MR,
        study_uid=STUDY,
        series_uid=SERIES,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="P1",
    )


def add(db: Database, number: int) -> None:
    """The row of instance `number`, as the receive path's job path commits it (the file is not read)."""
    _commit_row_opening_job(db, meta(number), f"instances/{STUDY}/{SERIES}/{SERIES}.{number}.dcm", "0" * 64, 10)


def evaluated_series(db: Database) -> int:
    """A series received and routed (its job queued): its next instance is a new delivery."""
    add(db, 1)
    with db.session() as session:
        series_id = session.scalars(select(Series.id)).one()
    complete_series(db, series_id, RoutingOutcome("brain-mr", "default", [], "test"))
    return series_id


def interleaved(monkeypatch: pytest.MonkeyPatch, name: str = "open_job_on_first_instance") -> list[str]:
    """Make each thread's first call of `storage.ingest.<name>` (a look for the open job, or for
    the series) wait after it looked, until two threads have looked.

    Returns the names of the threads that passed the barrier together (both must, or the race
    was not staged)."""
    barrier = threading.Barrier(2, timeout=20)
    met: list[str] = []
    first = threading.local()
    real = getattr(ingest, name)

    def looking_together(*args):
        found = real(*args)  # looked, not yet inserted (no flush)
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
            met.append(threading.current_thread().name)
        return found

    monkeypatch.setattr(ingest, name, looking_together)
    return met


def run_both(*targets: Callable[[], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


def received_jobs(db: Database, series_id: int) -> list[Job]:
    with db.session() as session:
        return list(session.scalars(select(Job).where(Job.series_id == series_id, Job.state == JobState.RECEIVED)))


@pytest.fixture
def db(job_store_url: str):
    database = Database(job_store_url)
    yield database
    database.dispose()


def test_a_second_received_job_of_a_series_is_refused_by_the_schema(db: Database) -> None:
    series_id = evaluated_series(db)
    with db.session() as session:
        series = session.get(Series, series_id)
        for _ in range(2):  # other states are not limited
            session.add(Job(series=series, study_uid=STUDY, series_uid=SERIES, state=JobState.DONE))
        session.add(Job(series=series, study_uid=STUDY, series_uid=SERIES, state=JobState.RECEIVED))
    with pytest.raises(IntegrityError), db.session() as session:
        series = session.get(Series, series_id)
        session.add(Job(series=series, study_uid=STUDY, series_uid=SERIES, state=JobState.RECEIVED))


def test_two_first_instances_of_a_new_delivery_at_once_open_one_job(db: Database, monkeypatch) -> None:
    series_id = evaluated_series(db)
    met = interleaved(monkeypatch)
    errors = run_both(lambda: add(db, 2), lambda: add(db, 3))
    assert errors == []
    assert len(met) == 2  # both looked before either inserted: the race happened
    opened = received_jobs(db, series_id)
    assert len(opened) == 1  # before revision 0005: two
    with db.session() as session:
        series = session.get(Series, series_id)
        assert series.instance_count == 3
        assert session.scalar(select(func.count()).select_from(Instance)) == 3
        assert session.scalar(select(func.count()).select_from(Job)) == 2  # the routed one and the new delivery
    assert series.evaluated_at < series.last_received_at  # awaiting routing: the watcher routes the one job
    routed = complete_series(db, series_id, RoutingOutcome("brain-mr", "default", [], "test"))
    assert routed == opened[0].id
    assert load_job(db, routed).instance_count == 3


def test_two_instances_of_a_brand_new_series_at_once_open_one_job(db: Database, monkeypatch) -> None:
    """Both look for the series before either creates it: the series' unique UID refuses the second
    (PostgreSQL: once the first commits), whose retry finds the series receiving and joins its job."""
    met = interleaved(monkeypatch, "_get_or_create_series")
    errors = run_both(lambda: add(db, 1), lambda: add(db, 2))
    assert errors == [] and len(met) == 2
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        series = session.scalars(select(Series)).one()
        assert series.instance_count == 2
        jobs = list(session.scalars(select(Job)))
    assert [j.state for j in jobs] == [JobState.RECEIVED]


def test_a_purged_instance_re_sent_while_another_opens_the_delivery_joins_it(db: Database, monkeypatch) -> None:
    """`_restore_row` (a re-send after retention) races a new instance's first row: one job."""
    series_id = evaluated_series(db)
    with db.session() as session:
        session.scalars(select(Instance)).one().purged_at = utcnow()
        session.scalars(select(Job)).one().state = JobState.DONE  # retention purges the files of ended jobs
    met = interleaved(monkeypatch)
    restore = lambda: _restore_row(db, meta(1), f"instances/{STUDY}/{SERIES}/{SERIES}.1.dcm", "1" * 64, 11)  # noqa: E731
    errors = run_both(restore, lambda: add(db, 2))
    assert errors == [] and len(met) == 2
    assert len(received_jobs(db, series_id)) == 1
    with db.session() as session:
        restored = session.scalars(select(Instance).where(Instance.sop_instance_uid == meta(1).sop_instance_uid)).one()
        assert restored.purged_at is None and restored.sha256 == "1" * 64


def test_upgrade_from_0004_settles_duplicate_received_jobs(job_store_url: str) -> None:
    """A database that already holds two `received` jobs of one series upgrades: the oldest stays
    the open delivery, the later one is cancelled with a reason and an event, and the index exists."""
    engine = make_engine(job_store_url)
    with engine.begin() as connection:
        command.upgrade(_config(connection), "0004")
        now = {"now": "2026-11-01 10:00:00+00:00"}
        connection.execute(text("INSERT INTO studies (id, study_uid, created_at) VALUES (1, '1.2.3', :now)"), now)
        for series_id in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO series (id, series_uid, study_id, instance_count, first_received_at, "
                    "last_received_at) VALUES (:id, :uid, 1, 0, :now, :now)"
                ),
                {"id": series_id, "uid": f"1.2.3.{series_id}", **now},
            )
        # series 1: three received jobs (ids 1, 2, 4) and a done one; series 2: one received job (id 3)
        for job_id, series_id, state in [
            (1, 1, "RECEIVED"),
            (2, 1, "RECEIVED"),
            (3, 2, "RECEIVED"),
            (4, 1, "RECEIVED"),
        ]:
            connection.execute(
                text(
                    "INSERT INTO jobs (id, series_id, study_uid, series_uid, state, destinations, attempts, "
                    "instance_count, created_at, updated_at) "
                    "VALUES (:id, :series, '1.2.3', :uid, :state, '[]', 0, 0, :now, :now)"
                ),
                {"id": job_id, "series": series_id, "uid": f"1.2.3.{series_id}", "state": state, **now},
            )
        connection.execute(
            text(
                "INSERT INTO jobs (id, series_id, study_uid, series_uid, state, destinations, attempts, "
                "instance_count, created_at, updated_at) VALUES (5, 1, '1.2.3', '1.2.3.1', 'DONE', '[]', 1, 0, "
                ":now, :now)"
            ),
            now,
        )
    assert upgrade(engine) == ("0004", head_revision()) and current_revision(engine) == "0005"
    engine.dispose()
    db = Database(job_store_url)
    with db.session() as session:
        states = {job_id: state for job_id, state in session.execute(select(Job.id, Job.state))}
    assert states == {
        1: JobState.RECEIVED,
        2: JobState.CANCELLED,
        3: JobState.RECEIVED,
        4: JobState.CANCELLED,
        5: JobState.DONE,
    }
    for job_id in (2, 4):
        job = load_job(db, job_id)
        assert job.reason is not None and "job 1 is its delivery" in job.reason and job.finished_at is not None
        assert [(e.kind, e.state) for e in job.events] == [(EventKind.STATE, JobState.CANCELLED)]
    with pytest.raises(IntegrityError), db.session() as session:
        series = session.get(Series, 2)
        session.add(Job(series=series, study_uid="1.2.3", series_uid="1.2.3.2", state=JobState.RECEIVED))
    db.dispose()


def test_a_replacement_and_a_new_instance_opening_the_delivery_at_once_open_one_job(
    job_store_url: str, tmp_path: Path, monkeypatch
) -> None:
    """`_replace` (a correction of an evaluated series, conflict policy `replace`) races the first
    new instance of the series: one new job, and the routed one is cancelled as superseded."""
    db, store = Database(job_store_url), InstanceStore(tmp_path / "data")
    base = Path(str(get_testdata_file("MR_small.dcm")))
    send(db, store, base, ConflictPolicy.REPLACE)
    with db.session() as session:
        series_id = session.scalars(select(Series.id)).one()
    routed = complete_series(db, series_id, RoutingOutcome("brain-mr", "default", [], "test"))
    corrected = pydicom.dcmread(base)
    corrected.PatientName = "Corrected^Name"
    corrected.save_as(tmp_path / "corrected.dcm")
    another = pydicom.dcmread(base)
    stripe = hash(str(another.SOPInstanceUID)) % len(ingest._LOCKS)
    suffix = 2  # a SOP UID on another stripe of the per-UID lock (str hashes vary per process): on the
    while hash(f"{another.SOPInstanceUID}.{suffix}") % len(ingest._LOCKS) == stripe:  # same one, the two
        suffix += 1  # would queue one behind the other, and the staged race would wait out its barrier
    another.SOPInstanceUID = f"{another.SOPInstanceUID}.{suffix}"
    another.save_as(tmp_path / "another.dcm")
    met = interleaved(monkeypatch)
    outcomes: list[StoreOutcome] = []
    errors = run_both(
        lambda: outcomes.append(send(db, store, tmp_path / "corrected.dcm", ConflictPolicy.REPLACE)),
        lambda: outcomes.append(send(db, store, tmp_path / "another.dcm", ConflictPolicy.REPLACE)),
    )
    assert errors == [] and len(met) == 2
    assert sorted(o.value for o in outcomes) == ["conflict", "stored"]
    assert len(received_jobs(db, series_id)) == 1
    assert load_job(db, routed).state == JobState.CANCELLED  # it ran on the first version
    with db.session() as session:
        assert session.get(Series, series_id).instance_count == 2
        assert session.scalars(select(Study.patient_name)).one() == "Corrected^Name"
    db.dispose()


def send(db: Database, store: InstanceStore, path: Path, policy: ConflictPolicy) -> StoreOutcome:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = instance_meta(ds, ds.file_meta.TransferSyntaxUID, "PACS", "127.0.0.1")
    return store_instance(db, store, meta, path.read_bytes(), policy)


def test_the_migrations_make_the_index_the_models_declare(job_store_url: str) -> None:
    engine = make_engine(job_store_url)
    with engine.begin() as connection:
        command.upgrade(_config(connection), "head")
    [index] = [i for i in inspect(engine).get_indexes("jobs") if i["name"] == "uq_jobs_received_series"]
    engine.dispose()
    where = next(str(v) for k, v in index["dialect_options"].items() if k.endswith("_where"))
    assert (index["column_names"], bool(index["unique"]), "'RECEIVED'" in where) == (["series_id"], True, True)
    [declared] = [i for i in Job.__table__.indexes if i.name == "uq_jobs_received_series"]
    assert declared.unique and [c.name for c in declared.columns] == ["series_id"]
