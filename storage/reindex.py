"""Rebuild the job store's rows from the instance files: disaster recovery after losing the database.

`dicom-node store reindex` runs this with the node stopped, against the
(new, empty or restored) database the node will use. Decisions:

- Only `instances/<study>/<series>/<sop>.dcm` is read, header only
  (`stop_before_pixels`); `tmp/`, `conflicts/`, `outputs/` are not rows.
- A file whose path has a row is left alone, so a second run adds nothing
  (idempotent); a purged row whose file is back is pointed at it again.
- By default a reindexed series is marked evaluated (`evaluated_at` set, no
  job opened): after losing the database, months of old studies must not go
  through the model and to the TPS again. Only instances received from now on
  make it a new delivery. With `route`, rows are made exactly as when the
  instance arrives (`storage.ingest`): the first instance of a series opens a
  job in `received`, and after the quiet period the series watcher routes it,
  so every reindexed series is processed and delivered again. (A series that
  already has a `received` job, from a restored backup, is left unevaluated
  either way: that job is routed.) The job history itself is gone with the
  database.
- A row whose file is missing (an older backup restored, the file purged by
  retention after it) is marked purged (`purged_at`) and reported, so that a
  later re-send of the instance is stored again instead of answered as a
  duplicate.
- Nothing is deleted. A file that cannot be read, or whose UIDs do not match
  its path, is moved to `unindexed/` (same relative path) and reported: left
  under `instances/` without a row, start-up would remove it as a
  never-acknowledged leftover.
- The store id (`storage.store_identity`) is adopted only after the whole walk,
  so an interrupted reindex leaves start-up refusing (rather than deleting
  the files not yet indexed); run it again. A database that already belongs to
  another data directory is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from storage.database import Database
from storage.ingest import InstanceMeta, _commit_row, _get_or_create_series, _restore_row, instance_row
from storage.instance_store import InstanceStore, sha256_file
from storage.models import Instance, Job, JobState, Series, utcnow
from storage.store_identity import StoreMismatchError, bind, database_store_id, file_store_id

UNINDEXED_DIR = "unindexed"


@dataclass
class ReindexReport:
    """What one run found and did."""

    files: int = 0  # instance files under instances/
    known: int = 0  # already had their row
    added: int = 0  # rows created (or purged rows restored)
    series: set[str] = field(default_factory=set)  # Series Instance UIDs that got rows
    routed: bool = False  # True: each of `series` has a job in `received` (routed again); False: marked evaluated
    missing: list[str] = field(default_factory=list)  # rows whose file is missing: marked purged
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why); moved to unindexed/
    store_id: str | None = None


def reindex(
    db: Database,
    store: InstanceStore,
    read_meta: Callable[[Path], InstanceMeta],
    *,
    route: bool = False,
    dry_run: bool = False,
) -> ReindexReport:
    """Create the missing rows for the files under `instances/`, mark rows without a file purged (module doc).

    `read_meta` reads a stored file's header into the values the job store
    keeps (the Store SCP's reading, so rows look as if the instance had just
    arrived). `route`: open jobs so that the series are processed and
    delivered again; else they are marked evaluated. With `dry_run` nothing
    is written or moved."""
    on_disk, in_db = file_store_id(store), database_store_id(db)
    if on_disk and in_db and on_disk != in_db:
        raise StoreMismatchError(
            f"the job store ({db.url_for_humans}) belongs to another data directory (store id {in_db}, "
            f"{store.root} has {on_disk}): reindex into a new, empty database; nothing was changed"
        )
    with db.session() as session:
        known = set(session.scalars(select(Instance.path).where(Instance.purged_at.is_(None))))
    report = ReindexReport(routed=route)
    seen: set[str] = set()
    for path in sorted((store.root / "instances").rglob("*.dcm")):
        report.files += 1
        relative = path.relative_to(store.root).as_posix()
        seen.add(relative)
        if relative in known:
            report.known += 1
            continue
        try:
            meta = read_meta(path)
            expected = store.instance_path(meta.study_uid, meta.series_uid, meta.sop_instance_uid)
            if expected != relative:
                raise ValueError(f"its UIDs place it at {expected}")
        except Exception as exc:  # unreadable header, missing or invalid UIDs
            report.unreadable.append((relative, f"{exc.__class__.__name__}: {exc}"))
            if not dry_run:
                store.move(relative, f"{UNINDEXED_DIR}/{relative}")
            continue
        add = _add_row if route else _add_row_evaluated
        if not dry_run and not add(db, meta, relative, sha256_file(path), path.stat().st_size):
            report.known += 1  # indexed meanwhile (a second reindex, or a node using this database)
            continue
        report.added += 1
        report.series.add(meta.series_uid)
    report.missing = sorted(p for p in known - seen if not store.absolute(p).exists())
    if not dry_run:
        _mark_purged(db, report.missing)
        report.store_id = on_disk or in_db or uuid.uuid4().hex
        bind(db, store, report.store_id)
    return report


def _add_row(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> bool:
    """The instance's row, as `store_instance` makes it; False when it exists (not purged) already."""
    with db.session() as session:
        existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid))
        purged = existing is not None and existing.purged_at is not None
        if existing is not None and not purged:
            return False
    try:
        if purged:
            _restore_row(db, meta, relative, digest, size)
        else:
            _commit_row(db, meta, relative, digest, size)
    except IntegrityError:
        return False
    return True


def _add_row_evaluated(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> bool:
    """The instance's row without a new delivery: its series marked evaluated, no job opened (module
    doc), unless the series has a `received` job already. False when the row exists (not purged)."""
    try:
        with db.session() as session:
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid))
            if existing is not None and existing.purged_at is None:
                return False
            series = _get_or_create_series(session, meta)
            now = utcnow()
            if existing is None:
                session.add(instance_row(meta, series, relative, digest, size))
                session.flush()
                series.instance_count = Series.instance_count + 1
            else:  # purged, its file back
                existing.path, existing.sha256, existing.size_bytes = relative, digest, size
                existing.transfer_syntax_uid, existing.purged_at, existing.received_at = (
                    meta.transfer_syntax_uid,
                    None,
                    now,
                )
            session.flush()
            series.last_received_at = now
            receiving = session.scalar(
                select(Job.id).where(Job.series_id == series.id, Job.state == JobState.RECEIVED).limit(1)
            )
            if receiving is None:
                series.evaluated_at = now
    except IntegrityError:
        return False
    return True


def _mark_purged(db: Database, paths: list[str]) -> None:
    """Rows whose file is missing are purged: a re-send then stores the instance again."""
    now = utcnow()
    with db.session() as session:
        for start in range(0, len(paths), 500):
            session.execute(
                update(Instance)
                .where(Instance.path.in_(paths[start : start + 500]), Instance.purged_at.is_(None))
                .values(purged_at=now)
            )
