"""Receiving one instance: durable file first, committed row second.

The Store SCP calls `store_instance` and may answer success only when it
returns. Policy for a SOP Instance UID that arrives again:
- same bytes (same sha256): idempotent, nothing is written (`DUPLICATE`);
- different bytes but the same content (another transfer syntax, other file
  meta, a lossless re-encoding: `storage.content_compare`): `DUPLICATE`;
- other content (a correction: demographics fix, merge, re-reconstruction):
  `CONFLICT`, handled by the conflict policy (`[storage] conflict_policy`):
  `keep-first` keeps the first version in use and the new one under
  `conflicts/<sop uid>/<sha256>.dcm`; `replace` keeps the old one there (a
  hard link) and renames the new one over the instance's path in one step, so
  a reader always finds a whole version. Nothing is lost either way, the SCP
  answers success (the data is safely kept), and a `conflict` event on the
  series' latest job says what changed (no patient data) and what was done
  (one event, counted up, for a series re-sent with the same correction). When
  a replacement changes anything but how and when the file was made
  (`content_compare.IMMATERIAL_KEYWORDS`), an evaluated series becomes a new
  delivery, as below; its queued job is cancelled (it must not run on a series
  being replaced), a running one finishes and is superseded by the new job.
  A re-send naming another study or series (compared with the stored row) is
  no correction but a re-used UID: refused, see Identity below;
- an instance whose file retention purged (`purged_at` set), or whose file is
  missing (a database backup restored after retention): stored again, the
  row pointed at the new file, and the series counts as a new delivery (a new
  job after the quiet period): the re-planning case months later.
Concurrent stores of the same SOP Instance UID are serialised by a striped lock.

Identity (a sender's UID error must not break another patient's series): a
series belongs to one study, and a study to one patient. An instance whose
SeriesInstanceUID is stored under another StudyInstanceUID, or whose PatientID
differs from the one recorded for its study (the StudyInstanceUID is stored
with another PatientID), is refused: `IdentityConflict`, which the SCP answers
with 0xC000 (`store.rejected` says which UIDs disagree; PatientIDs are never
written, only "PatientID differs"). Nothing of it is kept (its file is removed,
no row), and the stored series, its rows and its jobs are untouched. PatientIDs
compare as the SCP reads them (`store_scp.instance_meta`: absent or empty is
None, so None and "" are the same, and neither equals a value). Known cost:
a patient reconciliation (the registration corrected mid-exam, so a later
series of the study carries the corrected PatientID) is refused the same way;
the study row holds one PatientID, and a per-series identity needs a schema
change. The fast path
below counts an instance into its series only when that series' study has the
instance's StudyInstanceUID and PatientID (in the same UPDATE, no query more);
any other instance takes the job path, which checks and refuses
(`_get_or_create_series`). A SOP Instance UID stored already, re-sent with
other content naming another series or study, is refused the same way
(`_resolve_conflict`): a correction never moves an instance, and a sender's
re-used UIDs (another patient's series) must not vanish as "conflicts" of
the stored series.

The instance arrives as an `IncomingFile` the SCP streamed to `tmp/` (already
hashed), or as bytes (tests, tools). It is moved into place, never copied; a
duplicate or a failure discards it. Success means the file is fsync'd under
its name and its row committed.

Speed (issue #18): the common case, one more instance of a series already
receiving, is two statements compiled once (count the instance into its series
if that is still open and of the instance's study and patient; insert the
instance: `_insert_into_open_series`, `storage.database.DriverStatement`), and the rows of concurrent
C-STOREs share one transaction, so one WAL flush (`GroupCommit`); each is
acknowledged only after that commit. The ORM path with its job bookkeeping
runs only for the first instance of a series or of a new delivery, and for
an instance refused for its identity (`_commit_row_opening_job`). The file's
fsyncs run while that row commits (`_place_and_commit`): one storage flush round per instance instead of two,
with what a power cut in between can leave, and how it is repaired, there.
"""

from __future__ import annotations

import enum
import functools
import threading
import weakref
from dataclasses import dataclass

import structlog
from sqlalchemy import Connection, Integer, Table, and_, bindparam, delete, insert, literal_column, or_, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from storage.content_compare import ContentDiff, compare_files
from storage.database import Database, DriverStatement
from storage.instance_store import IncomingFile, InstanceStore, sha256_file, validate_uid
from storage.jobs import cancel_superseded, event_row, open_job_on_first_instance
from storage.models import EventKind, Instance, Job, JobEvent, JobState, Series, Study, utcnow

_LOCKS = [threading.Lock() for _ in range(64)]
# Tries of a write that opens a study, series or job when another transaction may commit the same
# first (each IntegrityError means one did, so the conflicts are bounded: study, series, job).
_ATTEMPTS = 3
log = structlog.get_logger(__name__)


class StoreOutcome(str, enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


class ConflictPolicy(str, enum.Enum):
    """What a re-sent instance with other content does (`[storage] conflict_policy`)."""

    KEEP_FIRST = "keep-first"  # the first version stays in use; the new one is kept under conflicts/
    REPLACE = "replace"  # the new version becomes the instance; the old one is kept under conflicts/


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


class IdentityConflict(ValueError):
    """The instance's UIDs or PatientID contradict what is stored (module doc): refused, nothing kept.

    `summary`: the kind of conflict in a few words, for the sender (the C-STORE's Error Comment);
    the message, with the UIDs, is for the node's log.
    """

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


def _patient(patient_id: str | None) -> str | None:
    """A PatientID as compared: absent and empty are the same (`store_scp.instance_meta` reads both as None)."""
    return patient_id or None


def _get_or_create_series(session: Session, meta: InstanceMeta) -> Series:
    """The instance's series row, created with its study when new; `IdentityConflict` when the series is
    stored under another study, or its study with another PatientID (a sender's UID error: module doc)."""
    series = session.scalar(select(Series).where(Series.series_uid == meta.series_uid))
    if series is not None:
        stored = series.study
        if stored.study_uid != meta.study_uid:
            raise IdentityConflict(
                f"SeriesInstanceUID {meta.series_uid} is already stored in StudyInstanceUID {stored.study_uid}, "
                f"this instance names StudyInstanceUID {meta.study_uid}: not stored (one series, one study; "
                "the sender re-used a SeriesInstanceUID?)",
                "SeriesInstanceUID already stored in another study",
            )
        _check_patient(stored, meta)
        return series
    study = session.scalar(select(Study).where(Study.study_uid == meta.study_uid))
    if study is not None:
        _check_patient(study, meta)
    else:
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


def _check_patient(study: Study, meta: InstanceMeta) -> None:
    """`IdentityConflict` unless the instance's PatientID is its stored study's (no PatientID in the text: PHI)."""
    if _patient(study.patient_id) != _patient(meta.patient_id):
        raise IdentityConflict(
            f"PatientID differs: StudyInstanceUID {meta.study_uid} is already stored for another PatientID than "
            f"this instance's (SeriesInstanceUID {meta.series_uid}): not stored (one study, one patient; "
            "the sender re-used a StudyInstanceUID?)",
            "StudyInstanceUID already stored for another PatientID",
        )


def store_instance(
    db: Database,
    store: InstanceStore,
    meta: InstanceMeta,
    data: bytes | IncomingFile,
    conflict_policy: ConflictPolicy = ConflictPolicy.KEEP_FIRST,
) -> StoreOutcome:
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
            with db.engine.connect() as connection:
                existing = connection.execute(_EXISTING, {"sop_instance_uid": meta.sop_instance_uid}).first()
            purged = existing is not None and existing.purged_at is not None
            if existing is not None and not purged:
                intact = _holds(store, existing.path, existing.size_bytes, existing.sha256)
                if intact and existing.sha256 == digest:
                    store.sync(existing.path)  # a crashed process may have committed it before its fsync
                    return StoreOutcome.DUPLICATE
                if existing.sha256 != digest and (
                    intact or existing.path != relative or conflict_policy is ConflictPolicy.REPLACE
                ):  # other content: a correction (`replace` also completes an interrupted one)
                    return _resolve_conflict(db, store, meta, incoming, existing.path, existing.sha256, conflict_policy)
                # Its file is gone or damaged (a power cut, a restored backup) and this is the same
                # instance, or under keep-first there is no intact first version to keep: stored again.
            if existing is not None:
                refuse_moving(db, meta)  # before anything is written
                store.place(incoming, relative)  # fsync'd before the row (rare path)
                try:
                    _restore_row(db, meta, relative, digest, incoming.size)
                except BaseException:
                    store.remove(relative)
                    raise
            else:
                _place_and_commit(db, store, meta, incoming, relative)
        return StoreOutcome.STORED
    finally:
        incoming.discard()


def _holds(store: InstanceStore, relative: str, size: int, digest: str) -> bool:
    """Whether the stored file has the size and sha256 its row recorded (a re-send is rare: hashing
    it is cheap insurance against a file that a power cut left short, see `_place_and_commit`)."""
    path = store.absolute(relative)
    try:
        return path.stat().st_size == size and sha256_file(path) == digest
    except OSError:
        return False


def _place_and_commit(
    db: Database, store: InstanceStore, meta: InstanceMeta, incoming: IncomingFile, relative: str
) -> None:
    """The file renamed into place and its row committed in one storage flush round (issue #18).

    For an instance of a series that is receiving (the common case), the
    file's and its directory's fsyncs run while the row commits; success is
    reported only after all three. A power cut in between can leave a
    committed row whose file is short or missing, for an instance the sender
    was never told was stored: its re-send finds the file damaged (`_holds`)
    and stores it again, and no job runs on it
    (`dicom_node.worker.verified_series_files`). A failed fsync takes the row
    back out. The first instance of a series or delivery, which opens a job,
    keeps the order fsync, then commit (once per series)."""
    syncing = store.place_syncing(incoming, relative)
    row = _PendingRow(meta, relative, incoming.sha256, incoming.size)
    try:
        grouped = group_commit(db).insert(db, row)
    except BaseException:
        if isinstance(row.error, CommitOutcomeUnknown):  # the row may be committed: its file stays, durable
            syncing.wait()
        else:
            store.remove(relative)
        raise
    if not grouped:
        syncing.wait()
        try:
            _commit_row_opening_job(db, meta, relative, incoming.sha256, incoming.size)
        except BaseException:
            store.remove(relative)
            raise
        return
    try:
        syncing.wait(remove_on_failure=False)
    except OSError as failed:
        try:
            with db.engine.begin() as connection:  # the row out first (as if it had never arrived), then the file
                series_id = connection.execute(_SERIES_OF, {"uid": meta.sop_instance_uid}).scalar_one()
                connection.execute(_UNPLACED, {"uid": meta.sop_instance_uid})
                connection.execute(_UNCOUNT, {"series_id": series_id})
        except Exception as exc:  # the row stays: its file too (the worker's check finds it if it is bad)
            raise OSError(failed.errno, f"{failed.strerror}; and its row could not be taken back: {exc}") from failed
        store.remove(relative)
        raise


# While the series' latest job is in one of these, a repaired file joins its work: no new delivery.
_IN_PROGRESS = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING, JobState.HELD)


def _restore_row(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> None:
    """Point the row of a purged instance, or of one whose file is gone or damaged, at its re-sent
    file. An evaluated series becomes a new delivery (the re-planning case months after retention;
    a job that failed on the damaged file), unless its latest job is still in progress: that job
    checks the files before it runs, and finds the repaired one (no second delivery of one series).

    Retried once when another instance opened the delivery's job meanwhile (the one
    `received` job per series, `models.Job`): the retry joins that job. The job is inserted
    before the series row is updated, the order `_commit_row_opening_job` writes in, so that
    on PostgreSQL the two wait for each other instead of deadlocking. The caller has refused a
    re-send naming another series or study (`refuse_moving`) before writing anything."""
    for attempt in range(_ATTEMPTS):
        try:
            with db.session() as session:
                instance = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)
                ).one()
                series = instance.series
                latest = _latest_job(session, series.id)
                evaluated = series.evaluated_at is not None and series.evaluated_at >= series.last_received_at
                # A job in progress reads the repaired file: the series stays evaluated, no new delivery.
                joins_job = evaluated and latest is not None and latest.state in _IN_PROGRESS
                if evaluated and not joins_job:
                    open_job_on_first_instance(session, series, meta.study_uid, meta.patient_id)
                    session.flush()
                instance.path, instance.sha256, instance.size_bytes = relative, digest, size
                instance.transfer_syntax_uid, instance.purged_at, instance.received_at = (
                    meta.transfer_syntax_uid,
                    None,
                    utcnow(),
                )
                instance.calling_ae_title, instance.source_address = meta.calling_ae_title, meta.source_address
                if not joins_job:
                    series.last_received_at = utcnow()
            return
        except IntegrityError:
            if attempt == _ATTEMPTS - 1:
                raise


_SERIES: Table = Series.__table__  # type: ignore[assignment]  # declarative tables are Tables
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_EXISTING = select(_INSTANCES.c.path, _INSTANCES.c.sha256, _INSTANCES.c.size_bytes, _INSTANCES.c.purged_at).where(
    _INSTANCES.c.sop_instance_uid == bindparam("sop_instance_uid")
)
# A row whose file's fsync failed after the commit (`_place_and_commit`): taken back out.
_SERIES_OF = select(_INSTANCES.c.series_id).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
_UNPLACED = delete(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
_UNCOUNT = (
    update(_SERIES).where(_SERIES.c.id == bindparam("series_id")).values(instance_count=_SERIES.c.instance_count - 1)
)
# The common case, once per instance (`_insert_into_open_series`): two statements, run as
# `DriverStatement`s, and no RETURNING (any SQLite 3, any backend). Counted in SQL: stores
# into one series over parallel associations would lose updates with `+= 1` in Python. Only
# while the series is open, decided in the UPDATE itself, so an evaluation the watcher
# committed meanwhile cannot be missed (no row matches: the instance takes the job path, a
# new delivery). Open: never evaluated, or evaluated before its last instance and before
# `now`; the second half matters when clocks disagree (another host's clock ahead, or ours
# stepped back): counting would set `last_received_at` to a `now` at or before the
# evaluation and close the delivery with this instance in it, never routed.
# Only into a series of the instance's study and patient (the module doc's identity rule): any
# other instance matches no row and takes the job path, which refuses it (`_get_or_create_series`).
# A subquery on the studies' unique StudyInstanceUID, no statement more; NULL-safe for PatientID.
_NOW = bindparam("now", type_=_SERIES.c.last_received_at.type)
_SERIES_UID = bindparam("series_uid", type_=_SERIES.c.series_uid.type)
_STUDY_UID = bindparam("study_uid", type_=_STUDIES.c.study_uid.type)
_PATIENT_ID = bindparam("patient_id", type_=_STUDIES.c.patient_id.type)
_COUNT_INTO_OPEN_SERIES = (
    update(_SERIES)
    .where(
        _SERIES.c.series_uid == _SERIES_UID,
        _SERIES.c.study_id
        == select(_STUDIES.c.id)
        .where(_STUDIES.c.study_uid == _STUDY_UID, _STUDIES.c.patient_id.is_not_distinct_from(_PATIENT_ID))
        .scalar_subquery(),
        or_(
            _SERIES.c.evaluated_at.is_(None),
            and_(_SERIES.c.evaluated_at < _SERIES.c.last_received_at, _SERIES.c.evaluated_at < _NOW),
        ),
    )
    .values(instance_count=_SERIES.c.instance_count + literal_column("1", Integer), last_received_at=_NOW)
)
_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "path",
    "sha256",
    "size_bytes",
    "calling_ae_title",
    "source_address",
    "received_at",
)
_INSERT_INSTANCE = (
    insert(_INSTANCES)
    .values(
        {name: bindparam(name, type_=_INSTANCES.c[name].type) for name in _INSTANCE_COLUMNS}
        | {"series_id": select(_SERIES.c.id).where(_SERIES.c.series_uid == _SERIES_UID).scalar_subquery()}
    )
    .inline()  # no implicit RETURNING of the new id: nothing reads it
)


@functools.lru_cache(maxsize=8)
def _open_series_statements(dialect: Dialect) -> tuple[DriverStatement, DriverStatement]:
    """The count and the insert of `_insert_into_open_series`, compiled for `dialect` once
    (a dialect belongs to one engine; a few job stores in one process at most)."""
    return DriverStatement(_COUNT_INTO_OPEN_SERIES, dialect), DriverStatement(_INSERT_INSTANCE, dialect)


class CommitOutcomeUnknown(Exception):
    """The row's transaction failed and whether it committed cannot be read now: its file stays
    (a file without a row is removed at start-up; a row without its file would be worse)."""


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
    without a hand-off. A row whose series is no longer open writes nothing
    and goes to the job path; the batch's others commit. A batch that fails
    for one row's sake (a constraint, a value the database refuses) is retried
    row by row, so the error goes to the C-STORE it belongs to; one that fails
    for the database's sake (locked past the busy timeout, connection lost) is
    not: every row fails at once rather than each waiting out the timeout
    again, except those found committed after all (`_settle_failed`).
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
        except (IntegrityError, DataError) as exc:  # one row's fault, nothing written
            if len(batch) > 1:  # the others are not to fail for it: each alone
                for row in batch:
                    self._run(db, [row])
            else:
                batch[0].error, batch[0].done = exc, True
            return
        except Exception as exc:  # the database's fault (locked, connection lost): not retried row by row
            self._settle_failed(db, batch, exc)
            return
        except BaseException as exc:  # interrupted: no row of this batch is reported committed
            for row in batch:
                row.error, row.done = CommitOutcomeUnknown(f"commit interrupted: {exc!r}"), True
            raise
        self.transactions += 1
        self.rows += sum(inserted)
        for row, ok in zip(batch, inserted, strict=True):
            row.inserted, row.done = ok, True

    @staticmethod
    def _settle_failed(db: Database, batch: list[_PendingRow], exc: Exception) -> None:
        """After a failed transaction, which rows are in the store anyway: a COMMIT whose answer
        was lost (the connection dropped) may have happened. Those are reported inserted (they
        are); the others fail with `exc`, or with `CommitOutcomeUnknown` when that cannot be read."""
        try:
            with db.engine.connect() as connection:
                stored = {
                    (uid, sha)
                    for uid, sha in connection.execute(
                        select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.sha256).where(
                            _INSTANCES.c.sop_instance_uid.in_([row.meta.sop_instance_uid for row in batch])
                        )
                    )
                }
        except Exception as unreadable:
            for row in batch:
                row.error = CommitOutcomeUnknown(f"{exc}; whether the row was committed is unknown: {unreadable}")
                row.done = True
            return
        # A dropped connection (not "locked", not a refusal) may belong to a COMMIT still being made
        # durable (PostgreSQL waiting on its WAL or a replica): a row not seen yet may still appear.
        lost = bool(getattr(exc, "connection_invalidated", False))
        for row in batch:
            if (row.meta.sop_instance_uid, row.digest) in stored:
                row.inserted = True
            elif lost:
                row.error = CommitOutcomeUnknown(f"{exc}; the row was not found committed, but may still be")
            else:
                row.error = exc
            row.done = True


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
    written) when the series is new, was evaluated since its last instance (a new delivery), or
    belongs to another study or patient (refused on the job path: module doc)."""
    meta = row.meta
    count, insert_instance = _open_series_statements(connection.dialect)
    now = utcnow()
    series = {"series_uid": meta.series_uid, "study_uid": meta.study_uid, "patient_id": _patient(meta.patient_id)}
    if count.execute(connection, series | {"now": now}).rowcount != 1:
        return False
    insert_instance.execute(
        connection,
        {
            "sop_instance_uid": meta.sop_instance_uid,
            "sop_class_uid": meta.sop_class_uid,
            "series_uid": meta.series_uid,
            "transfer_syntax_uid": meta.transfer_syntax_uid,
            "path": row.relative,
            "sha256": row.digest,
            "size_bytes": row.size,
            "calling_ae_title": meta.calling_ae_title,
            "source_address": meta.source_address,
            "received_at": now,
        },
    )
    return True


def instance_row(meta: InstanceMeta, series: Series, relative: str, digest: str, size: int) -> Instance:
    """The ORM row of one stored instance file (the receive path and `store reindex` both build it here)."""
    return Instance(
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


def _commit_row_opening_job(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> None:
    """Insert the first instance row of a series or delivery, with its job; retry once if
    another thread created the study/series or opened the delivery's job meanwhile.

    Two first instances stored at once both find no job and insert one; the schema allows one
    `received` job per series (`models.Job`), so the second insert fails. The retry reads the
    series again: no longer evaluated (the first one's row moved `last_received_at`), so its
    instance joins that delivery and no second job is opened."""
    for attempt in range(_ATTEMPTS):
        try:
            with db.session() as session:
                series = _get_or_create_series(session, meta)
                if series.id is None or (
                    series.evaluated_at is not None and series.evaluated_at >= series.last_received_at
                ):  # first instance of the series, or of a new delivery after evaluation
                    session.flush()
                    open_job_on_first_instance(session, series, meta.study_uid, meta.patient_id)
                session.add(instance_row(meta, series, relative, digest, size))
                session.flush()  # the series row exists, so the count below is an UPDATE
                # Counted in SQL: stores into one series over parallel associations read
                # the row before their write transaction starts; `+= 1` lost updates.
                series.instance_count = Series.instance_count + 1
                series.last_received_at = utcnow()
            return
        except IntegrityError:
            if attempt == _ATTEMPTS - 1:
                raise


# -- a re-sent instance with other bytes (rare: corrections) ------------------------------------------

# Study and series columns a replacement refreshes from the new version's header.
_STUDY_KEYWORDS = frozenset({"PatientID", "PatientName", "StudyDate", "AccessionNumber"})
_SERIES_KEYWORDS = frozenset({"Modality", "SeriesDescription"})


def _resolve_conflict(
    db: Database,
    store: InstanceStore,
    meta: InstanceMeta,
    incoming: IncomingFile,
    stored_path: str,
    stored_sha: str,
    policy: ConflictPolicy,
) -> StoreOutcome:
    """Other bytes for a stored SOP Instance UID: the same content (DUPLICATE) or a conflict under `policy`.

    Runs under the instance's lock; the content is compared outside any transaction. A re-send naming
    another series or study is no correction: `IdentityConflict`, nothing kept (module doc)."""
    refuse_moving(db, meta)
    incoming.finish()
    diff = compare_files(store.absolute(stored_path), incoming.path)
    if diff.same_content and policy is ConflictPolicy.REPLACE:
        diff = _interrupted_replacement(store, meta.sop_instance_uid, stored_path, stored_sha, incoming) or diff
    if diff.same_content:
        store.sync(stored_path)  # as for a byte-identical re-send (`store_instance`)
        return StoreOutcome.DUPLICATE
    uid, digest = meta.sop_instance_uid, incoming.sha256
    if policy is ConflictPolicy.REPLACE:
        _replace(db, store, meta, incoming, stored_path, stored_sha, diff)
        return StoreOutcome.CONFLICT
    kept = f"conflicts/{uid}/{digest}.dcm"
    already_kept = store.absolute(kept).exists()  # the same correction sent again: one event is enough
    store.keep(incoming, kept)
    if not already_kept:
        action = "the first version stays in use, the new one is kept under conflicts/<SOP Instance UID>/"
        with db.session() as session:
            series_id = session.scalar(select(Instance.series_id).where(Instance.sop_instance_uid == uid))
            latest = _latest_job(session, series_id) if series_id is not None else None
            if latest is not None:
                _conflict_event(session, latest, uid, f"{diff.describe()}; {policy.value}: {action}")
    log.info("store.conflict_kept", sop_instance_uid=uid, changed=diff.keywords, policy=policy.value)
    return StoreOutcome.CONFLICT


def _replace(
    db: Database,
    store: InstanceStore,
    meta: InstanceMeta,
    incoming: IncomingFile,
    stored_path: str,
    stored_sha: str,
    diff: ContentDiff,
) -> None:
    """The new version becomes the instance; the old one is kept under `conflicts/`, so nothing is lost.

    Order, so that the instance's path always holds a whole version and a crash loses nothing: the
    old file is kept under `conflicts/` by a hard link (or a copy), the new one renamed over the
    path in one step (directory fsync'd), then the row is committed. When the commit fails the old
    content is put back. (A crash before the commit leaves the new file under the old row's sha256;
    the sender, which got no success, re-sends and `_resolve_conflict` completes the replacement.)"""
    uid = meta.sop_instance_uid
    previous = f"conflicts/{uid}/{stored_sha}.dcm"
    had_file = store.absolute(stored_path).exists()  # else (lost outside the node) there is nothing to keep
    kept_before = store.absolute(previous).exists()  # the same version was kept earlier
    if had_file and not kept_before:
        store.keep_copy(stored_path, previous)
    try:
        store.keep(incoming, stored_path)  # readers see the old version or the new one, never no file
        # Once more when another instance opened the delivery's job meanwhile (one `received`
        # job per series, `models.Job`): the retry finds it open and joins it.
        for attempt in range(_ATTEMPTS):
            try:
                with db.session() as session:
                    instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
                    instance.sha256, instance.size_bytes, instance.transfer_syntax_uid = (
                        incoming.sha256,
                        incoming.size,
                        meta.transfer_syntax_uid,
                    )
                    instance.sop_class_uid, instance.received_at = meta.sop_class_uid, utcnow()
                    instance.calling_ae_title, instance.source_address = meta.calling_ae_title, meta.source_address
                    series = instance.series
                    latest = _latest_job(session, series.id)  # before a new delivery's job exists
                    if _STUDY_KEYWORDS.intersection(diff.keywords):
                        study = series.study
                        study.patient_id, study.patient_name = meta.patient_id, meta.patient_name
                        study.study_date, study.accession_number = meta.study_date, meta.accession_number
                    material = diff.material
                    text = f"{diff.describe()}; replace: the new version is the instance now, "
                    text += (
                        "the previous one is kept under conflicts/<SOP Instance UID>/; "
                        if had_file
                        else "its file was lost; "
                    )
                    if material:
                        evaluated = series.evaluated_at is not None and series.evaluated_at >= series.last_received_at
                        if evaluated and latest is not None:  # this job's outputs used the first version
                            new_job = open_job_on_first_instance(session, series, meta.study_uid, meta.patient_id)
                            session.flush()
                            cancelled = cancel_superseded(session, series.id, new_job)
                            if cancelled:
                                log.info("store.superseded_jobs_cancelled", jobs=cancelled, new_job=new_job.id)
                            event_row(
                                session,
                                latest,
                                EventKind.CONFLICT,
                                f"instance {uid} re-sent with other content: "
                                f"{text}the series is evaluated again as a new delivery: job {new_job.id}",
                            )
                            latest = new_job
                        elif latest is not None and latest.state == JobState.RECEIVED:  # a new delivery is open already
                            cancel_superseded(session, series.id, latest)  # e.g. a job held before more slices came
                        series.last_received_at = utcnow()
                        text += "the series is evaluated again as a new delivery after the quiet period"
                    else:
                        text += "only when and by whom the file was made changed, so the series is not evaluated again"
                    # The series row is written after the job is inserted (the order of `_commit_row_opening_job`).
                    if _SERIES_KEYWORDS.intersection(diff.keywords):
                        series.modality, series.series_description = meta.modality, meta.series_description
                    if latest is not None:
                        _conflict_event(session, latest, uid, text)
                break
            except IntegrityError:
                if attempt == _ATTEMPTS - 1:
                    raise
    except BaseException:  # the sender gets a failure status; the first version is back
        if had_file:
            store.keep_copy(previous, stored_path)
            if not kept_before:
                store.remove(previous)
        else:
            store.remove(stored_path)
        raise
    log.info(
        "store.conflict_replaced",
        sop_instance_uid=uid,
        changed=diff.keywords,
        material=diff.material,
        new_delivery=bool(diff.material),
    )


def _interrupted_replacement(
    store: InstanceStore, uid: str, stored_path: str, stored_sha: str, incoming: IncomingFile
) -> ContentDiff | None:
    """A replacement interrupted before its row was committed (a crash): the stored file already is
    this re-send while the row names the previous version, kept under `conflicts/`. The diff against
    that version, so that the re-send completes the replacement; None otherwise (rare path: one hash)."""
    previous = store.absolute(f"conflicts/{uid}/{stored_sha}.dcm")
    if not previous.exists() or sha256_file(store.absolute(stored_path)) != incoming.sha256:
        return None
    diff = compare_files(previous, incoming.path)
    return None if diff.same_content else diff


def refuse_moving(db: Database, meta: InstanceMeta) -> None:
    """`IdentityConflict` when the SOP Instance UID's row (stored, purged or with its file lost) belongs
    to another series or study than `meta` names: a re-used UID, never a correction (module doc)."""
    moved = _placement_changes(db, meta)
    if moved:
        raise IdentityConflict(
            f"SOP Instance UID {meta.sop_instance_uid} is already stored in another {_moved_what(moved)}; this "
            f"instance names SeriesInstanceUID {meta.series_uid} (StudyInstanceUID {meta.study_uid}): not stored "
            "(a SOP Instance UID names one instance; the sender re-used it?)",
            "SOPInstanceUID already stored in another series or study",
        )


def _placement_changes(db: Database, meta: InstanceMeta) -> list[str]:
    """Which of study and series the re-send names differently from the stored row.

    Read from the row, not from the content diff: a stored file that cannot be
    read gives a diff without keywords, and the guard must hold then too."""
    with db.session() as session:
        series_uid, study_uid = session.execute(
            select(Series.series_uid, Study.study_uid)
            .join(Instance, Instance.series_id == Series.id)
            .join(Study, Study.id == Series.study_id)
            .where(Instance.sop_instance_uid == meta.sop_instance_uid)
        ).one()
    moved = []
    if meta.series_uid != series_uid:
        moved.append("SeriesInstanceUID")
    if meta.study_uid != study_uid:
        moved.append("StudyInstanceUID")
    return sorted(moved)


def _moved_what(keywords: list[str]) -> str:
    return "study" if "StudyInstanceUID" in keywords else "series"


def _latest_job(session: Session, series_id: int) -> Job | None:
    return session.scalar(select(Job).where(Job.series_id == series_id).order_by(Job.id.desc()).limit(1))


_RESENT = " re-sent with other content: "


def _conflict_event(session: Session, job: Job, sop_instance_uid: str, text: str) -> None:
    """A `conflict` event on `job`; a whole series re-sent with the same correction is one event.

    When the job's last event is a conflict event with the same `text`, it is
    counted up ("12 instances (latest <uid>) re-sent ...") instead of adding a line per instance."""
    last = session.scalar(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc()).limit(1))
    if last is not None and last.kind == EventKind.CONFLICT and _RESENT in last.message:
        head, last_text = last.message.split(_RESENT, 1)
        if last_text == text:
            count = 1 if head.startswith("instance ") else int(head.split(" ", 1)[0])
            last.message = f"{count + 1} instances (latest {sop_instance_uid}){_RESENT}{text}"
            last.at = utcnow()
            return
    event_row(session, job, EventKind.CONFLICT, f"instance {sop_instance_uid}{_RESENT}{text}")
