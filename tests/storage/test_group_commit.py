"""Group commit (`storage.ingest.GroupCommit`) on SQLite and PostgreSQL.

The contract: the rows of C-STOREs arriving together share one transaction,
and none of them is reported stored (so acknowledged by the SCP) before that
transaction committed. The commit lock is held by the test to make the
C-STOREs queue up deterministically; what a crash between commit and
acknowledgement does is covered by tests/reliability/test_crash_safety.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DataError, OperationalError

from storage.database import Database
from storage.ingest import InstanceMeta, StoreOutcome, group_commit, store_instance
from storage.instance_store import InstanceStore
from storage.models import Instance, Series

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY, SERIES = "1.2.826.0.1.9", "1.2.826.0.1.9.1"


def meta(k: int) -> InstanceMeta:
    return InstanceMeta(f"1.2.826.0.1.9.1.{k}", MR, STUDY, SERIES, EXPLICIT_LE, patient_id="GROUP")


def separately_locked(count: int, besides: tuple[str, ...] = ()) -> list[int]:
    """`count` instance numbers k > 0 whose SOP UIDs fall on different stripes of the per-UID lock
    (str hashes vary per process): two on one stripe would queue one behind the other, not both."""
    import storage.ingest as ingest

    chosen: list[int] = []
    stripes = {hash(uid) % len(ingest._LOCKS) for uid in besides}
    k = 0
    while len(chosen) < count:
        k += 1
        stripe = hash(meta(k).sop_instance_uid) % len(ingest._LOCKS)
        if stripe not in stripes:
            stripes.add(stripe)
            chosen.append(k)
    return chosen


def committed_rows(url: str) -> int:
    """Instance rows another connection sees: only committed ones."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM instances")).scalar_one()
    finally:
        engine.dispose()


def test_concurrent_rows_share_one_transaction_and_none_is_reported_before_it(job_store_url: str, tmp_path: Path):
    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"first: opens the series and its job") is StoreOutcome.STORED
    group = group_commit(db)
    transactions_before = group.transactions
    outcomes: dict[int, StoreOutcome] = {}
    senders = [
        threading.Thread(target=lambda k=k: outcomes.__setitem__(k, store_instance(db, store, meta(k), b"%d" % k)))
        for k in separately_locked(4)
    ]
    with group._commit_lock:  # a commit in progress: the four C-STOREs queue behind it
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while len(group._queue) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(group._queue) == 4
        time.sleep(0.2)
        assert outcomes == {}  # nobody reported stored
        assert all(sender.is_alive() for sender in senders)
        assert committed_rows(job_store_url) == 1
    for sender in senders:
        sender.join(60)
    assert outcomes == {k: StoreOutcome.STORED for k in separately_locked(4)}
    assert group.transactions == transactions_before + 1  # the four rows, one commit
    assert committed_rows(job_store_url) == 5
    with db.session() as session:
        assert session.scalar(select(Series.instance_count)) == 5
        paths = session.scalars(select(Instance.path)).all()
    assert all(store.absolute(path).is_file() for path in paths)
    db.dispose()


def test_a_failing_row_fails_alone(job_store_url: str, tmp_path: Path):
    """Retried row by row: the other C-STOREs of the batch are stored, the bad one gets the error."""
    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"first") is StoreOutcome.STORED
    group = group_commit(db)
    too_long = InstanceMeta(
        "1.2.826.0.1.9.1.99", MR, STUDY, SERIES, EXPLICIT_LE, patient_id="GROUP", calling_ae_title="X" * 400
    )
    results: dict[str, object] = {}  # keyed by sender, not by instance number (one may be 3)

    def send(name: str, k: int, instance: InstanceMeta) -> None:
        try:
            results[name] = store_instance(db, store, instance, b"%d" % k)
        except Exception as exc:
            results[name] = exc

    one, two = separately_locked(2, besides=(too_long.sop_instance_uid,))
    senders = [threading.Thread(target=send, args=(name, k, meta(k))) for name, k in (("one", one), ("two", two))]
    senders.append(threading.Thread(target=send, args=("too long", 3, too_long)))
    with group._commit_lock:
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while len(group._queue) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    for sender in senders:
        sender.join(60)
    if db.engine.dialect.name == "sqlite":  # SQLite does not enforce VARCHAR lengths: all three stored
        assert results == {"one": StoreOutcome.STORED, "two": StoreOutcome.STORED, "too long": StoreOutcome.STORED}
    else:
        assert results["one"] is StoreOutcome.STORED and results["two"] is StoreOutcome.STORED, results
        assert isinstance(results["too long"], DataError), results
        assert not store.absolute(store.instance_path(STUDY, SERIES, too_long.sop_instance_uid)).exists()
    with db.session() as session:
        stored = session.scalar(select(func.count()).select_from(Instance))
        assert session.scalar(select(Series.instance_count)) == stored
    db.dispose()


def test_an_evaluation_after_the_fast_path_took_its_time_opens_a_new_delivery(
    job_store_url: str, tmp_path: Path, monkeypatch
):
    """The watcher commits its evaluation after the fast path took the instance's timestamp but
    before its row is written: the row must not be counted into the evaluated delivery (it would
    never be routed)."""
    import storage.ingest as ingest
    from storage.jobs import RoutingOutcome, complete_series
    from storage.models import Job, JobState, utcnow

    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"first: opens the series and its job") is StoreOutcome.STORED
    with db.session() as session:
        series_id = session.scalars(select(Series.id)).one()
    real_now, raced = ingest.utcnow, []

    def now_then_evaluate():  # the fast path's timestamp, then the watcher commits its evaluation
        stamp = real_now()
        if not raced:
            raced.append(stamp)
            time.sleep(0.01)
            complete_series(db, series_id, RoutingOutcome(None, None, [], "no rule matched"))
        return stamp

    monkeypatch.setattr(ingest, "utcnow", now_then_evaluate)
    assert store_instance(db, store, meta(1), b"second, during the evaluation") is StoreOutcome.STORED
    assert raced  # the race was staged
    with db.session() as session:
        series = session.get(Series, series_id)
        assert series.instance_count == 2
        assert series.evaluated_at < series.last_received_at  # a new delivery the watcher will route
        states = sorted(j.state.value for j in session.scalars(select(Job)))
    assert states == sorted([JobState.REJECTED.value, JobState.RECEIVED.value]), states
    assert utcnow() >= series.last_received_at


def _send_queued(db: Database, store: InstanceStore, numbers: list[int]) -> dict[int, object]:
    """C-STOREs of `numbers` queued behind a held commit, then let go as one batch: their outcomes."""
    group = group_commit(db)
    results: dict[int, object] = {}

    def send(k: int) -> None:
        try:
            results[k] = store_instance(db, store, meta(k), b"%d" % k)
        except Exception as exc:
            results[k] = exc

    senders = [threading.Thread(target=send, args=(k,)) for k in numbers]
    with group._commit_lock:
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while len(group._queue) < len(numbers) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(group._queue) == len(numbers)
    for sender in senders:
        sender.join(60)
    return results


def test_a_row_whose_series_is_evaluated_meanwhile_leaves_its_batch_and_the_batch_commits(
    job_store_url: str, tmp_path: Path, monkeypatch
):
    """One batch, two series. The watcher evaluates one of them while the batch runs, before that
    row is written: that row writes nothing and opens a new delivery through the job path; the
    other row commits in the batch's one attempt (no rollback, no row-by-row retry)."""
    import storage.ingest as ingest
    from storage.ingest import GroupCommit
    from storage.jobs import RoutingOutcome, complete_series
    from storage.models import Job, JobState

    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    other_series = f"{SERIES}.2"

    def other(k: int) -> InstanceMeta:
        return InstanceMeta(f"{other_series}.{k}", MR, STUDY, other_series, EXPLICIT_LE, patient_id="GROUP")

    assert store_instance(db, store, meta(0), b"opens the receiving series") is StoreOutcome.STORED
    assert store_instance(db, store, other(0), b"opens the other series") is StoreOutcome.STORED
    with db.session() as session:
        evaluated_id = session.scalars(select(Series.id).where(Series.series_uid == other_series)).one()
    real_now, raced = ingest.utcnow, []

    def now_then_evaluate():  # the first row's timestamp, then the watcher commits its evaluation
        stamp = real_now()
        if not raced:
            raced.append(stamp)
            complete_series(db, evaluated_id, RoutingOutcome(None, None, [], "no rule matched"))
        return stamp

    attempts: list[int] = []
    real_run = GroupCommit._run

    def counted_run(self, database, batch):
        attempts.append(len(batch))
        return real_run(self, database, batch)

    monkeypatch.setattr(GroupCommit, "_run", counted_run)
    group = group_commit(db)
    evaluated_k, receiving_k = separately_locked(2)
    results: dict[str, object] = {}
    first = threading.Thread(
        target=lambda: results.__setitem__("evaluated", store_instance(db, store, other(evaluated_k), b"e"))
    )
    second = threading.Thread(
        target=lambda: results.__setitem__("receiving", store_instance(db, store, meta(receiving_k), b"r"))
    )
    with group._commit_lock:  # both queue behind it, in this order: one batch
        first.start()
        deadline = time.monotonic() + 60
        while len(group._queue) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        second.start()
        while len(group._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(group._queue) == 2
        monkeypatch.setattr(ingest, "utcnow", now_then_evaluate)
    first.join(60)
    second.join(60)
    assert raced  # the evaluation came between the batch's start and the row's write
    assert results == {"evaluated": StoreOutcome.STORED, "receiving": StoreOutcome.STORED}
    assert attempts == [2], attempts  # the batch ran once: nothing rolled back and retried row by row
    assert committed_rows(job_store_url) == 4
    with db.session() as session:
        receiving = session.scalars(select(Series).where(Series.series_uid == SERIES)).one()
        evaluated = session.get(Series, evaluated_id)
        assert (receiving.instance_count, evaluated.instance_count) == (2, 2)
        assert evaluated.evaluated_at < evaluated.last_received_at  # a new delivery the watcher will route
        states = sorted(j.state.value for j in session.scalars(select(Job).where(Job.series_id == evaluated_id)))
    assert states == sorted([JobState.REJECTED.value, JobState.RECEIVED.value]), states
    db.dispose()


def test_the_fast_path_does_not_count_into_a_series_evaluated_after_its_now(job_store_url: str, tmp_path: Path):
    """Another host whose clock is ahead evaluated the series and then received into it, both in
    our future: counting here would set `last_received_at` to our `now`, before the evaluation,
    and close the delivery with this instance in it. The job path takes it instead."""
    from datetime import timedelta

    from storage.models import utcnow

    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"opens the series") is StoreOutcome.STORED
    with db.session() as session:
        series = session.scalars(select(Series)).one()
        series.evaluated_at = utcnow() + timedelta(hours=1)
        series.last_received_at = utcnow() + timedelta(hours=2)
    group = group_commit(db)
    rows = group.rows
    assert store_instance(db, store, meta(1), b"the next instance") is StoreOutcome.STORED
    assert group.rows == rows  # not counted by the fast path
    assert committed_rows(job_store_url) == 2
    db.dispose()


def test_a_database_error_fails_the_batch_once_not_row_by_row(job_store_url: str, tmp_path: Path, monkeypatch):
    """A database locked past its busy timeout (or gone) is not one row's fault: the batch's
    C-STOREs all fail after one attempt, instead of each retrying alone and waiting the timeout
    out again (a 16-row batch stalled every sender for 16 busy timeouts)."""
    import storage.ingest as ingest

    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"first") is StoreOutcome.STORED
    attempts: list[int] = []

    def locked(connection, row):
        attempts.append(1)
        raise OperationalError("INSERT INTO instances", {}, Exception("database is locked"))

    monkeypatch.setattr(ingest, "_insert_into_open_series", locked)
    numbers = separately_locked(3)
    results = _send_queued(db, store, numbers)
    assert len(attempts) == 1
    assert all(isinstance(results[k], OperationalError) for k in numbers), results
    assert committed_rows(job_store_url) == 1
    assert len(list((store.root / "instances").rglob("*.dcm"))) == 1  # the failed C-STOREs left no file
    db.dispose()


def test_a_commit_whose_answer_was_lost_is_found_committed(job_store_url: str, tmp_path: Path, monkeypatch):
    """The COMMIT reached the database but its answer was lost (the connection dropped): the
    rows are in the store, so they are reported stored, not failed (their files are kept)."""
    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"first") is StoreOutcome.STORED
    dialect = db.engine.dialect
    real_commit = dialect.do_commit
    lost: list[int] = []

    def commit_then_drop(dbapi_connection):
        real_commit(dbapi_connection)
        if not lost:
            lost.append(1)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(dialect, "do_commit", commit_then_drop)
    numbers = separately_locked(3)
    results = _send_queued(db, store, numbers)
    assert lost == [1]
    assert results == {k: StoreOutcome.STORED for k in numbers}
    assert committed_rows(job_store_url) == 4
    with db.session() as session:
        paths = session.scalars(select(Instance.path)).all()
        assert session.scalar(select(Series.instance_count)) == 4
    assert all(store.absolute(path).is_file() for path in paths)
    db.dispose()


def test_a_commit_whose_outcome_cannot_be_read_keeps_the_files(job_store_url: str, tmp_path: Path, monkeypatch):
    """The COMMIT failed and the database cannot be asked whether it happened: the C-STOREs fail
    (never acknowledged) but their files stay, since their rows may exist; a file without a row
    is removed at start-up, a row without its file would be a lost instance."""
    import storage.ingest as ingest

    db = Database(job_store_url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"first") is StoreOutcome.STORED
    dialect = db.engine.dialect
    real_commit = dialect.do_commit

    dropped: list[int] = []

    def commit_then_drop(dbapi_connection):
        real_commit(dbapi_connection)
        dropped.append(1)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    real_connect = db.engine.connect

    def connect_until_dropped():
        if dropped:  # the database is gone now: nobody can ask it
            raise OperationalError("connect", {}, Exception("could not connect to server"))
        return real_connect()

    monkeypatch.setattr(dialect, "do_commit", commit_then_drop)
    monkeypatch.setattr(db.engine, "connect", connect_until_dropped)
    numbers = separately_locked(2)
    results = _send_queued(db, store, numbers)
    monkeypatch.undo()
    assert all(isinstance(results[k], ingest.CommitOutcomeUnknown) for k in numbers), results
    for k in numbers:
        assert store.absolute(store.instance_path(STUDY, SERIES, meta(k).sop_instance_uid)).is_file()
    db.dispose()


def test_a_postgresql_connection_ended_by_the_server_leaves_the_outcome_unknown(
    postgres_server, tmp_path: Path, monkeypatch
):
    """The server ends the committing connection mid-transaction (`pg_terminate_backend`: what a
    restart or a failover does). SQLAlchemy marks that error `connection_invalidated`, and a
    COMMIT sent on a dropped connection may still become durable, so the rows not found
    committed are not failed outright: the C-STOREs fail with `CommitOutcomeUnknown` (never
    acknowledged) and their files stay (start-up removes those no row names)."""
    import storage.ingest as ingest

    url = postgres_server.create_database(f"t{time.monotonic_ns()}")
    db = Database(url)
    store = InstanceStore(tmp_path / "data")
    assert store_instance(db, store, meta(0), b"first") is StoreOutcome.STORED
    real_insert = ingest._insert_into_open_series
    ended: list[int] = []
    admin = create_engine(url)

    def insert_then_end_the_connection(connection, row):
        inserted = real_insert(connection, row)
        if not ended:
            pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            ended.append(pid)
        return inserted

    monkeypatch.setattr(ingest, "_insert_into_open_series", insert_then_end_the_connection)
    numbers = separately_locked(2)
    try:
        results = _send_queued(db, store, numbers)
    finally:
        admin.dispose()
    monkeypatch.undo()
    assert len(ended) == 1
    assert all(isinstance(results[k], ingest.CommitOutcomeUnknown) for k in numbers), results
    assert committed_rows(url) == 1  # the ended transaction wrote nothing
    for k in numbers:
        assert store.absolute(store.instance_path(STUDY, SERIES, meta(k).sop_instance_uid)).is_file()
    db.dispose()
