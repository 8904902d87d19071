"""Job state transitions, events and claiming: the only code that changes a job.

Every transition is one committed row change plus one event row, so the
physicist's timeline (`dicom-node jobs show`) is exactly what happened.
Claiming uses `SELECT ... FOR UPDATE SKIP LOCKED` (PostgreSQL; ignored by
SQLite, where writes are serialised anyway) followed by a conditional
`UPDATE ... WHERE state = 'queued'`, so two workers never run the same job.

Series that arrive again after they were evaluated: the new instances join
the stored series and, after a new quiet period, the whole series is
evaluated again and a new job is created; earlier jobs stay in the history.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, selectinload

from storage.database import Database
from storage.models import (
    TERMINAL_STATES,
    EventKind,
    Export,
    Instance,
    Job,
    JobEvent,
    JobState,
    Series,
    utcnow,
)

# Which states may follow which; anything else is a programming error.
ALLOWED = {
    JobState.RECEIVED: {JobState.QUEUED, JobState.REJECTED, JobState.FAILED},
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED},
    JobState.RUNNING: {JobState.EXPORTING, JobState.DONE, JobState.FAILED, JobState.QUEUED},
    JobState.EXPORTING: {JobState.DONE, JobState.FAILED, JobState.EXPORTING},
    JobState.DONE: {JobState.QUEUED, JobState.EXPORTING},
    JobState.FAILED: {JobState.QUEUED, JobState.EXPORTING},
    JobState.REJECTED: {JobState.QUEUED},
}


class JobNotFound(LookupError):
    pass


class InvalidTransition(RuntimeError):
    pass


def event_row(session: Session, job: Job, kind: EventKind, message: str, **fields) -> None:
    session.add(JobEvent(job=job, kind=kind, message=message, **fields))


def set_state(
    session: Session, job: Job, state: JobState, message: str, *, reason: str | None = None, details: str | None = None
) -> None:
    if state not in ALLOWED[job.state]:
        raise InvalidTransition(f"job {job.id}: {job.state.value} -> {state.value} is not allowed")
    now = utcnow()
    job.state = state
    job.updated_at = now
    if reason is not None or state in (JobState.QUEUED, JobState.RUNNING):
        job.reason = reason
    if state == JobState.RUNNING:
        job.started_at = now
        job.finished_at = None
    if state in TERMINAL_STATES:
        job.finished_at = now
    event_row(session, job, EventKind.STATE, message, state=state, details=details)


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return job


def open_job_on_first_instance(session: Session, series: Series, study_uid: str, patient_id: str | None) -> Job:
    """The `received` job of a series, created when its first new instance arrives."""
    job = session.scalar(select(Job).where(Job.series_id == series.id, Job.state == JobState.RECEIVED))
    if job is None:
        job = Job(
            series=series,
            study_uid=study_uid,
            series_uid=series.series_uid,
            patient_id=patient_id,
            state=JobState.RECEIVED,
        )
        session.add(job)
        event_row(session, job, EventKind.STATE, "receiving instances", state=JobState.RECEIVED)
    return job


def series_ready_for_routing(db: Database, quiet_period_s: float) -> list[int]:
    """Series ids whose last new instance is older than the quiet period and not yet evaluated."""
    cutoff = utcnow() - timedelta(seconds=quiet_period_s)
    with db.session() as session:
        rows = session.scalars(
            select(Series.id)
            .where(
                Series.last_received_at <= cutoff,
                or_(Series.evaluated_at.is_(None), Series.evaluated_at < Series.last_received_at),
            )
            .order_by(Series.last_received_at)
        )
        return list(rows)


def stored_instance_paths(db: Database) -> set[str]:
    """Relative paths of every instance file the store has a row for."""
    with db.session() as session:
        return set(session.scalars(select(Instance.path).where(Instance.purged_at.is_(None))))


def first_instance_path(db: Database, series_id: int) -> str | None:
    with db.session() as session:
        return session.scalar(
            select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id).limit(1)
        )


@dataclass(frozen=True)
class RoutingOutcome:
    """What the series watcher decided for one complete series."""

    rule_name: str | None
    model: str | None
    destinations: list[str]
    reason: str  # why it matched, why nothing matched, or why routing failed
    failed: bool = False  # routing itself failed (e.g. a malformed value): the job fails, not rejected


def complete_series(db: Database, series_id: int, outcome: RoutingOutcome) -> int:
    """Mark a series evaluated; queue or reject its job. Returns the job id."""
    with db.session() as session:
        series = session.get(Series, series_id)
        job = session.scalar(select(Job).where(Job.series_id == series_id, Job.state == JobState.RECEIVED))
        if job is None:  # evaluated before, new instances since: a new job
            job = Job(
                series=series,
                study_uid=series.study.study_uid,
                series_uid=series.series_uid,
                patient_id=series.study.patient_id,
                state=JobState.RECEIVED,
            )
            session.add(job)
            event_row(session, job, EventKind.STATE, "series received again", state=JobState.RECEIVED)
        series.evaluated_at = utcnow()
        job.instance_count = series.instance_count
        event_row(session, job, EventKind.LOG, f"series complete: {series.instance_count} instances")
        if outcome.failed:
            set_state(session, job, JobState.FAILED, f"failed: {outcome.reason}", reason=f"failed: {outcome.reason}")
        elif outcome.rule_name is None:
            set_state(
                session, job, JobState.REJECTED, f"rejected: {outcome.reason}", reason=f"rejected: {outcome.reason}"
            )
        else:
            job.rule_name = outcome.rule_name
            job.model = outcome.model
            job.destinations = list(outcome.destinations)
            set_state(session, job, JobState.QUEUED, f"queued: {outcome.reason}")
        session.flush()
        return job.id


def claim_next_job(db: Database, worker_id: str) -> int | None:
    """Atomically move the oldest queued job to `running` for this worker."""
    with db.session() as session:
        candidate = session.scalar(
            select(Job.id)
            .where(Job.state == JobState.QUEUED)
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if candidate is None:
            return None
        claimed = session.execute(
            update(Job)
            .where(Job.id == candidate, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                claimed_by=worker_id,
                started_at=utcnow(),
                updated_at=utcnow(),
                finished_at=None,
                reason=None,
                attempts=Job.attempts + 1,
            )
        ).rowcount
        if claimed != 1:
            return None
        job = session.get(Job, candidate)
        session.refresh(job)
        event_row(
            session, job, EventKind.STATE, f"running on {worker_id} (attempt {job.attempts})", state=JobState.RUNNING
        )
        return candidate


def transition(
    db: Database, job_id: int, state: JobState, message: str, *, reason: str | None = None, details: str | None = None
) -> None:
    with db.session() as session:
        set_state(session, get_job(session, job_id), state, message, reason=reason, details=details)


def add_event(
    db: Database,
    job_id: int,
    kind: EventKind,
    message: str,
    *,
    duration_s: float | None = None,
    details: str | None = None,
) -> None:
    with db.session() as session:
        event_row(session, get_job(session, job_id), kind, message, duration_s=duration_s, details=details)


def fail_job(db: Database, job_id: int, reason: str, exc: BaseException | None = None) -> None:
    """Record a failure with its readable reason and, if any, the stack trace."""
    details = "".join(traceback.format_exception(exc)) if exc is not None else None
    with db.session() as session:
        job = get_job(session, job_id)
        event_row(session, job, EventKind.ERROR, reason, details=details)
        set_state(session, job, JobState.FAILED, f"failed: {reason}", reason=reason)


def retry_job(db: Database, job_id: int) -> None:
    """Queue a finished job again (`dicom-node jobs retry`)."""
    with db.session() as session:
        job = get_job(session, job_id)
        if job.state not in TERMINAL_STATES:
            raise InvalidTransition(
                f"job {job_id} is {job.state.value}; only done, failed or rejected jobs can be retried"
            )
        if job.state == JobState.REJECTED and job.rule_name is None:
            raise InvalidTransition(
                f"job {job_id} matched no routing rule; fix the rules and re-send the series instead"
            )
        set_state(session, job, JobState.QUEUED, "queued again by retry")


def resume_interrupted(db: Database, worker_prefix: str) -> list[int]:
    """On start-up: this host's jobs left `running` go back to `queued`.

    Only jobs claimed by workers named `<worker_prefix>...` (this host) are
    touched, so a restarting host never steals jobs running on another one.
    """
    with db.session() as session:
        jobs = session.scalars(
            select(Job).where(Job.state == JobState.RUNNING, Job.claimed_by.startswith(worker_prefix))
        ).all()
        for job in jobs:
            set_state(session, job, JobState.QUEUED, f"re-queued after an interrupted run on {job.claimed_by}")
        return [job.id for job in jobs]


def record_outputs(
    db: Database, job_id: int, output_dir: str, summary: dict, exports: list[tuple[str, str, str, str]]
) -> None:
    """Store a job's results and its export rows (destination, sop uid, class uid, path);
    then move it to `exporting`, or `done` if there is nothing to send."""
    with db.session() as session:
        job = get_job(session, job_id)
        job.output_dir = output_dir
        job.summary = summary
        for destination, sop_uid, class_uid, path in exports:
            session.add(
                Export(job=job, destination=destination, sop_instance_uid=sop_uid, sop_class_uid=class_uid, path=path)
            )
        if exports:
            set_state(
                session,
                job,
                JobState.EXPORTING,
                f"exporting {len(exports)} object(s) to {', '.join(sorted({e[0] for e in exports}))}",
            )
        else:
            set_state(session, job, JobState.DONE, "done (no destinations configured)")


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None = None
    since: datetime | None = None
    until: datetime | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    limit: int = 100


def list_jobs(db: Database, flt: JobFilter = JobFilter()) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(flt.limit)
    if flt.state is not None:
        query = query.where(Job.state == flt.state)
    if flt.since is not None:
        query = query.where(Job.created_at >= flt.since)
    if flt.until is not None:
        query = query.where(Job.created_at < flt.until)
    if flt.patient_id is not None:
        query = query.where(Job.patient_id == flt.patient_id)
    if flt.study_uid is not None:
        query = query.where(Job.study_uid == flt.study_uid)
    with db.session() as session:
        return list(session.scalars(query).all())


def load_job(db: Database, job_id: int) -> Job:
    """A job with its events and exports loaded, for display."""
    with db.session() as session:
        job = session.scalar(
            select(Job).where(Job.id == job_id).options(selectinload(Job.events), selectinload(Job.exports))
        )
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        return job
