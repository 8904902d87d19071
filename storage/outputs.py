"""The DICOM objects each attempt of a job wrote: what a re-run supersedes, what `jobs export --attempt` sends.

Decisions:
- A row per written object (`storage.models.Output`), added in the same
  transaction that records the attempt's result (`storage.jobs.record_outputs`,
  `hold_outputs`), so only a run that still held the job leaves rows: a run
  whose lease expired wrote files nobody will ever send or supersede.
- The result a re-run replaces is the latest row of the same output series
  (`latest_in_series`), whichever job or attempt wrote it, delivered or held:
  it is the last version a reader of that series may have seen. Its revision
  is the number of rows of that series so far.
- Rows are kept when retention purges the files (the history stays).
- After the job store was lost, `storage.reindex` rebuilds the rows from the files
  (`dicom-node store reindex`), so revisions continue where they were.
- Sending an attempt whose objects were superseded since (`jobs release` of a
  held job after a later job delivered, `jobs export --attempt N` of an older
  attempt) puts a lower revision after a higher one at the destination; it
  is allowed (a person's decision) but warned about (`newer_revisions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.database import Database
from storage.models import Job, Output


@dataclass(frozen=True)
class WrittenObject:
    """One object an attempt wrote, as the worker reports it (paths relative to the data directory)."""

    kind: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class PriorOutput:
    """The latest object of an output series, and how many that series holds (its revision)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    created_at: datetime
    job_id: int
    attempt: int
    revision: int


def add_outputs(session: Session, job: Job, objects: Sequence[WrittenObject]) -> None:
    """Record `objects` as written by the job's current attempt (call inside the recording transaction)."""
    for obj in objects:
        session.add(
            Output(
                job_id=job.id,
                attempt=job.attempts,
                kind=obj.kind,
                study_uid=job.study_uid,
                series_uid=obj.series_uid,
                sop_instance_uid=obj.sop_instance_uid,
                sop_class_uid=obj.sop_class_uid,
                path=obj.path,
            )
        )


def latest_in_series(db: Database, series_uids: Iterable[str]) -> dict[str, PriorOutput]:
    """By output series UID, the latest object written in it (series without any are left out)."""
    wanted = sorted(set(series_uids))
    if not wanted:
        return {}
    with db.session() as session:
        counts = dict(
            session.execute(
                select(Output.series_uid, func.count()).where(Output.series_uid.in_(wanted)).group_by(Output.series_uid)
            ).all()
        )
        latest = {}
        for series_uid in counts:
            row = session.scalars(
                select(Output).where(Output.series_uid == series_uid).order_by(Output.id.desc()).limit(1)
            ).one()
            latest[series_uid] = PriorOutput(
                study_uid=row.study_uid,
                series_uid=row.series_uid,
                sop_class_uid=row.sop_class_uid,
                sop_instance_uid=row.sop_instance_uid,
                created_at=row.created_at,
                job_id=row.job_id,
                attempt=row.attempt,
                revision=counts[series_uid],
            )
        return latest


def attempt_outputs(session: Session, job_id: int, attempt: int) -> list[tuple[str, str, str]]:
    """(SOP Instance UID, SOP Class UID, path) of what attempt `attempt` of a job wrote, in writing order."""
    rows = session.execute(
        select(Output.sop_instance_uid, Output.sop_class_uid, Output.path)
        .where(Output.job_id == job_id, Output.attempt == attempt)
        .order_by(Output.id)
    ).all()
    return [(sop, cls, path) for sop, cls, path in rows]


def output_path(db: Database, sop_instance_uid: str) -> str | None:
    """The path (relative to the data directory) of a written object, None if no row has it."""
    with db.session() as session:
        return session.scalar(select(Output.path).where(Output.sop_instance_uid == sop_instance_uid).limit(1))


def newer_revisions(session: Session, job_id: int, attempt: int) -> str | None:
    """A warning when objects of the job's `attempt` were superseded since (a later revision exists in
    their output series): sending them now puts a lower revision after a higher one. None if current."""
    mine = session.scalars(select(Output).where(Output.job_id == job_id, Output.attempt == attempt).order_by(Output.id))
    found = []
    for row in mine:
        in_series = select(Output).where(Output.series_uid == row.series_uid)
        newest = session.scalars(in_series.order_by(Output.id.desc()).limit(1)).one()
        if newest.id == row.id:
            continue
        count = select(func.count()).select_from(Output).where(Output.series_uid == row.series_uid)
        revision = session.scalar(count.where(Output.id <= row.id))
        latest = session.scalar(count)
        found.append(f"{row.kind} r{revision} < r{latest} (job {newest.job_id}, attempt {newest.attempt})")
    if not found:
        return None
    return (
        f"job {job_id} attempt {attempt} is not the newest result of its output series: {'; '.join(found)};"
        " the destination receives a lower revision after a higher one (the newer job's result is newer)"
    )


def newer_revisions_of(db: Database, job_id: int, attempt: int) -> str | None:
    """`newer_revisions` in a session of its own (the CLI prints it)."""
    with db.session() as session:
        return newer_revisions(session, job_id, attempt)
