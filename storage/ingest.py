"""Receiving one instance: durable file first, committed row second.

The Store SCP calls `store_instance` and may answer success only when it
returns. Policy for a SOP Instance UID that arrives again:
- same bytes (same sha256): idempotent, nothing is written (`DUPLICATE`);
- different bytes: the first stored instance is kept and stays the one used
  for processing; the new content is kept too, under
  `conflicts/<sop uid>/<sha256>.dcm`, so nothing is lost, and the outcome is
  `CONFLICT` (the SCP answers success and logs a warning for review);
- an instance whose file retention purged (`purged_at` set): stored again, the
  row pointed at the new file, and the series counts as a new delivery (a new
  job after the quiet period): the re-planning case months later.
Concurrent stores of the same SOP Instance UID are serialised by a striped lock.

The instance arrives as an `IncomingFile` the SCP streamed to `tmp/` (already
hashed), or as bytes (tests, tools). It is moved into place, never copied; a
duplicate or a failure discards it. Success means the file is fsync'd under
its name and its row committed.

Speed (issue #18): the common case, one more instance of a series already
receiving, is SQLAlchemy Core (read the series' state, insert the instance,
count it in SQL: `_insert_into_open_series`), and the rows of concurrent
C-STOREs share one transaction, so one WAL flush (`GroupCommit`); each is
acknowledged only after that commit. The ORM path with its job bookkeeping
runs only for the first instance of a series or of a new delivery
(`_commit_row_opening_job`).
"""

from __future__ import annotations

import enum
import threading
import weakref
from dataclasses import dataclass

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage.database import Database
from storage.instance_store import IncomingFile, InstanceStore, validate_uid
from storage.jobs import open_job_on_first_instance
from storage.models import Instance, Series, Study, utcnow

_LOCKS = [threading.Lock() for _ in range(64)]


class StoreOutcome(str, enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class InstanceMeta:
    """The header values the job store keeps for one received instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    series_description: str | None = None
    calling_ae_title: str | None = None
    source_address: str | None = None


def _get_or_create_series(session, meta: InstanceMeta) -> Series:
    series = session.scalar(select(Series).where(Series.series_uid == meta.series_uid))
    if series is not None:
        return series
    study = session.scalar(select(Study).where(Study.study_uid == meta.study_uid))
    if study is None:
        study = Study(
            study_uid=meta.study_uid,
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            study_date=meta.study_date,
            accession_number=meta.accession_number,
        )
        session.add(study)
    series = Series(
        series_uid=meta.series_uid,
        study=study,
        modality=meta.modality,
        series_description=meta.series_description,
    )
    session.add(series)
    return series


def store_instance(db: Database, store: InstanceStore, meta: InstanceMeta, data: bytes | IncomingFile) -> StoreOutcome:
    """Persist one encoded instance (file meta + data set) durably; see module doc.

    `data` is consumed: an `IncomingFile` is moved into place or discarded."""
    incoming = data if isinstance(data, IncomingFile) else store.incoming(data)
    try:
        validate_uid(meta.sop_class_uid, "SOP Class UID")
        validate_uid(meta.transfer_syntax_uid, "Transfer Syntax UID")
        relative = store.instance_path(meta.study_uid, meta.series_uid, meta.sop_instance_uid)
        digest = incoming.sha256
        lock = _LOCKS[hash(meta.sop_instance_uid) % len(_LOCKS)]
        with lock:
            with db.session() as session:
                existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid))
                purged = existing is not None and existing.purged_at is not None
                if existing is not None and not purged:
                    if existing.sha256 == digest:
                        return StoreOutcome.DUPLICATE
                    store.keep(incoming, f"conflicts/{meta.sop_instance_uid}/{digest}.dcm")
                    return StoreOutcome.CONFLICT
            store.place(incoming, relative)  # fsync'd before the row: see storage.instance_store
            try:
                if purged:
                    _restore_row(db, meta, relative, digest, incoming.size)
                else:
                    _commit_row(db, meta, relative, digest, incoming.size)
            except BaseException:
                store.remove(relative)
                raise
        return StoreOutcome.STORED
    finally:
        incoming.discard()


def _restore_row(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> None:
    """Point a purged instance's row at its re-sent file; the series becomes a new delivery."""
    with db.session() as session:
        instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)).one()
        instance.path, instance.sha256, instance.size_bytes = relative, digest, size
        instance.transfer_syntax_uid, instance.purged_at, instance.received_at = (
            meta.transfer_syntax_uid,
            None,
            utcnow(),
        )
        instance.calling_ae_title, instance.source_address = meta.calling_ae_title, meta.source_address
        series = instance.series
        if series.evaluated_at is not None and series.evaluated_at >= series.last_received_at:
            open_job_on_first_instance(session, series, meta.study_uid, meta.patient_id)
        series.last_received_at = utcnow()


_SERIES: Table = Series.__table__  # type: ignore[assignment]  # declarative tables are Tables
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_SERIES_STATE = select(_SERIES.c.id, _SERIES.c.evaluated_at, _SERIES.c.last_received_at).where(
    _SERIES.c.series_uid == bindparam("series_uid")
)
_INSERT_INSTANCE = insert(_INSTANCES)
# Counted in SQL: stores into one series over parallel associations read the
# row before their write transaction starts; `+= 1` in Python lost updates.
_COUNT_INSTANCE = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("series_id"))
    .values(
        instance_count=_SERIES.c.instance_count + 1,
        last_received_at=bindparam("now", type_=_SERIES.c.last_received_at.type),
    )
)


def _commit_row(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> None:
    """Insert the instance row: grouped with concurrent ones when its series is receiving, else with the job opened."""
    if not group_commit(db).insert(db, _PendingRow(meta, relative, digest, size)):
        _commit_row_opening_job(db, meta, relative, digest, size)


@dataclass
class _PendingRow:
    """One instance row waiting for its transaction; `done` once that committed or failed."""

    meta: InstanceMeta
    relative: str
    digest: str
    size: int
    done: bool = False
    inserted: bool = False  # False when done: its series needs the job path
    error: Exception | None = None


class GroupCommit:
    """Commits the instance rows of concurrent C-STOREs in one transaction: one WAL flush for all.

    The first thread to arrive commits every row queued by then, its own
    included; threads arriving meanwhile queue theirs and wait on the commit
    lock (no busy-wait on the database's write lock); the first of them commits
    the next batch. A row is reported (and its C-STORE acknowledged) only after
    the transaction that holds it committed. A thread alone commits its own row
    without a hand-off. A failing batch is retried row by row, so an error is
    reported to the C-STORE it belongs to.
    """

    def __init__(self) -> None:
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._queue: list[_PendingRow] = []
        self.transactions = 0  # committed batches and rows: what grouping saved, for tests and benchmarks
        self.rows = 0

    def insert(self, db: Database, row: _PendingRow) -> bool:
        """Commit `row` (with whatever else is queued); False if its series needs the job path."""
        with self._queue_lock:
            self._queue.append(row)
        with self._commit_lock:
            if not row.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._run(db, batch)
        if row.error is not None:
            raise row.error
        return row.inserted

    def _run(self, db: Database, batch: list[_PendingRow]) -> None:
        try:
            with db.engine.begin() as connection:
                inserted = [_insert_into_open_series(connection, row) for row in batch]
        except Exception as exc:
            if len(batch) > 1:
                for row in batch:
                    self._run(db, [row])
            else:
                batch[0].error, batch[0].done = exc, True
            return
        except BaseException as exc:  # interrupted: no row of this batch is reported committed
            for row in batch:
                row.error, row.done = RuntimeError(f"commit interrupted: {exc!r}"), True
            raise
        self.transactions += 1
        self.rows += sum(inserted)
        for row, ok in zip(batch, inserted, strict=True):
            row.inserted, row.done = ok, True


_GROUPS: weakref.WeakKeyDictionary[Database, GroupCommit] = weakref.WeakKeyDictionary()
_GROUPS_LOCK = threading.Lock()


def group_commit(db: Database) -> GroupCommit:
    """The one `GroupCommit` of a job store (per `Database` object)."""
    with _GROUPS_LOCK:
        group = _GROUPS.get(db)
        if group is None:
            group = _GROUPS[db] = GroupCommit()
        return group


def _insert_into_open_series(connection: Connection, row: _PendingRow) -> bool:
    """The instance row and its series' count, in the caller's transaction. False (nothing
    written) when the series is new or was evaluated since its last instance (a new delivery)."""
    meta = row.meta
    series = connection.execute(_SERIES_STATE, {"series_uid": meta.series_uid}).first()
    if series is None or (series.evaluated_at is not None and series.evaluated_at >= series.last_received_at):
        return False
    now = utcnow()
    connection.execute(
        _INSERT_INSTANCE,
        {
            "sop_instance_uid": meta.sop_instance_uid,
            "sop_class_uid": meta.sop_class_uid,
            "series_id": series.id,
            "transfer_syntax_uid": meta.transfer_syntax_uid,
            "path": row.relative,
            "sha256": row.digest,
            "size_bytes": row.size,
            "calling_ae_title": meta.calling_ae_title,
            "source_address": meta.source_address,
            "received_at": now,
        },
    )
    connection.execute(_COUNT_INSTANCE, {"series_id": series.id, "now": now})
    return True


def _commit_row_opening_job(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> None:
    """Insert the first instance row of a series or delivery, with its job; retry once if
    another thread created the study/series."""
    for attempt in range(2):
        try:
            with db.session() as session:
                series = _get_or_create_series(session, meta)
                if series.id is None or (
                    series.evaluated_at is not None and series.evaluated_at >= series.last_received_at
                ):  # first instance of the series, or of a new delivery after evaluation
                    session.flush()
                    open_job_on_first_instance(session, series, meta.study_uid, meta.patient_id)
                session.add(
                    Instance(
                        sop_instance_uid=meta.sop_instance_uid,
                        sop_class_uid=meta.sop_class_uid,
                        series=series,
                        transfer_syntax_uid=meta.transfer_syntax_uid,
                        path=relative,
                        sha256=digest,
                        size_bytes=size,
                        calling_ae_title=meta.calling_ae_title,
                        source_address=meta.source_address,
                    )
                )
                session.flush()  # the series row exists, so the count below is an UPDATE
                # Counted in SQL: stores into one series over parallel associations read
                # the row before their write transaction starts; `+= 1` lost updates.
                series.instance_count = Series.instance_count + 1
                series.last_received_at = utcnow()
            return
        except IntegrityError:
            if attempt == 1:
                raise
