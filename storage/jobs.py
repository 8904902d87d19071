"""Job state transitions, events and claiming: the only code that changes a job.

Every transition is one committed row change plus one event row, so the
physicist's timeline (`dicom-node jobs show`) is exactly what happened.
Claiming uses `SELECT ... FOR UPDATE SKIP LOCKED` (PostgreSQL; ignored by
SQLite, where writes are serialised anyway) followed by a conditional
`UPDATE ... WHERE state = 'queued'`, so two workers never run the same job;
and never two jobs of one source series at once (`claim_next_job`), so that
re-runs write their revisions one after the other.

Leases: a claimed job carries `lease_expires_at`, which its worker's heartbeat
renews (`renew_lease`). A `running` job goes back to the queue only when its
holder is known to be dead: its lease has expired (`requeue_expired_leases`),
or its process is known to have exited (`requeue_jobs_of`, for the previous
holder of a process slot on this host: `dicom_node.incarnation`). Never
because another process on the same host started. `requeue_job` is the one
place where an interrupted run is re-queued (its attempt was counted when it
was claimed; a cap on attempts belongs there). A worker whose lease was lost
cannot record anything any more: `record_outputs` and `fail_job` check the
holder and its attempt in the same transaction (`LeaseLost`).

Series that arrive again after they were evaluated: the new instances join
the stored series and, after a new quiet period, the whole series is
evaluated again and a new job is created; earlier jobs stay in the history.
When a series is complete is the watcher's decision
(`dicom_node.series_watcher`); `series_awaiting_routing` lists the candidates.

Attempt cap (`[worker] max_attempts`): an attempt that ends without a result
for a reason that may not recur (an internal error, or a worker that died
mid-job and left it `running`, found by `requeue_job`) re-queues the job
until it has been tried `max_attempts` times; then it is `failed` with "gave up
after N attempts: <last reason>". A series the engine refuses (`fail_job`) is
not retried: the same input gives the same answer. `jobs retry` is a person's
decision and always queues once more.

Held jobs (`hold_outputs`, `release_job`, `cancel_job`): a result the
plausibility gate stopped is recorded without export rows; a person releases
it (export rows created, `exporting`) or cancels it. Both record who and why
in the event history. A `replace` correction of the series' instances cancels
a held job (`cancel_superseded`): its result was computed on the earlier version.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, exists, or_, select, update
from sqlalchemy.orm import Session, aliased, selectinload

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
from storage.outputs import WrittenObject, add_outputs, newer_revisions

# Which states may follow which; anything else is a programming error.
ALLOWED = {
    JobState.RECEIVED: {JobState.QUEUED, JobState.REJECTED, JobState.FAILED},
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {
        JobState.EXPORTING,
        JobState.DONE,
        JobState.FAILED,
        JobState.QUEUED,
        JobState.REJECTED,
        JobState.HELD,
    },
    JobState.EXPORTING: {JobState.DONE, JobState.FAILED, JobState.EXPORTING},
    JobState.DONE: {JobState.QUEUED, JobState.EXPORTING},
    JobState.FAILED: {JobState.QUEUED, JobState.EXPORTING, JobState.CANCELLED},
    JobState.REJECTED: {JobState.QUEUED},
    JobState.HELD: {JobState.EXPORTING, JobState.DONE, JobState.CANCELLED},
    JobState.CANCELLED: {JobState.QUEUED},
}
#: States a person may end with `jobs cancel`. A running job is not among them: the
#: worker cannot be interrupted mid-inference; cancel it once it is held or failed.
CANCELLABLE = frozenset({JobState.QUEUED, JobState.HELD, JobState.FAILED})
#: States `jobs retry` queues again.
RETRYABLE = frozenset({JobState.DONE, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED})


class JobNotFound(LookupError):
    pass


class InvalidTransition(RuntimeError):
    pass


class LeaseLost(RuntimeError):
    """The worker no longer holds the job (its lease expired and the job was re-queued)."""


# Seconds a claim stays valid without a heartbeat; `[worker] lease_s` defaults to this.
DEFAULT_LEASE_S = 60.0


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
    """The `received` job of a series, created when its first new instance arrives.

    Look, then insert: two first instances stored at once can both insert. The schema keeps one
    `received` job per series (`models.Job`), so the later flush raises `IntegrityError`; the
    callers (`storage.ingest`) retry their transaction, which then finds this job and joins it."""
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


@dataclass(frozen=True)
class AwaitingSeries:
    """A series with instances not yet evaluated (the watcher decides whether it is complete)."""

    series_id: int
    series_uid: str
    instance_count: int
    last_received_at: datetime


def series_awaiting_routing(
    db: Database, quiet_period_s: float, clock: Callable[[], datetime] = utcnow
) -> list[AwaitingSeries]:
    """Series not yet evaluated whose last new instance is at least `quiet_period_s` old, oldest first.

    `clock`: the current UTC time (injected by tests)."""
    cutoff = clock() - timedelta(seconds=quiet_period_s)
    with db.session() as session:
        rows = session.execute(
            select(Series.id, Series.series_uid, Series.instance_count, Series.last_received_at)
            .where(
                Series.last_received_at <= cutoff,
                or_(Series.evaluated_at.is_(None), Series.evaluated_at < Series.last_received_at),
            )
            .order_by(Series.last_received_at)
        )
        return [AwaitingSeries(*row) for row in rows]


def note_on_received_job(db: Database, series_id: int, message: str) -> bool:
    """A log event on the series' `received` job (why it waits); False if it has none."""
    with db.session() as session:
        job = session.scalar(select(Job).where(Job.series_id == series_id, Job.state == JobState.RECEIVED))
        if job is None:
            return False
        event_row(session, job, EventKind.LOG, message)
        return True


def series_instance_paths(db: Database, series_id: int) -> list[str]:
    """Relative paths of a series' stored instances, in order of arrival."""
    with db.session() as session:
        return list(
            session.scalars(
                select(Instance.path)
                .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
                .order_by(Instance.id)
            )
        )


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
    failed: bool = False  # the job fails with `reason` (routing failed, or a rule matched an incomplete series)
    completeness: str | None = None  # what the series' completeness verdict rests on (job history)


def complete_series(db: Database, series_id: int, outcome: RoutingOutcome) -> int:
    """Mark a series evaluated; queue or reject its job. Returns the job id."""
    with db.session() as session:
        series = session.get(Series, series_id)
        if series is None:
            raise LookupError(f"series {series_id} does not exist")
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
        if outcome.completeness is not None:
            event_row(session, job, EventKind.LOG, f"completeness: {outcome.completeness}")
        if outcome.rule_name is not None:  # also when failed: `jobs retry` then runs it as routed
            job.rule_name = outcome.rule_name
            job.model = outcome.model
            job.destinations = list(outcome.destinations)
        if outcome.failed:
            set_state(session, job, JobState.FAILED, f"failed: {outcome.reason}", reason=f"failed: {outcome.reason}")
        elif outcome.rule_name is None:
            set_state(
                session, job, JobState.REJECTED, f"rejected: {outcome.reason}", reason=f"rejected: {outcome.reason}"
            )
        else:
            set_state(session, job, JobState.QUEUED, f"queued: {outcome.reason}")
        session.flush()
        return job.id


def _no_running_job_of_its_series() -> ColumnElement[bool]:
    """True for a job whose source series has no other job `running` (the claim's serialisation)."""
    other = aliased(Job)
    return ~exists().where(other.series_id == Job.series_id, other.state == JobState.RUNNING, other.id != Job.id)


#: Candidates one claim looks at before giving up until the next poll (each lost race excludes one series).
_CLAIM_TRIES = 5


def claim_next_job(db: Database, worker_id: str, lease_s: float = DEFAULT_LEASE_S) -> int | None:
    """Atomically move the oldest claimable queued job to `running` for this worker, leased for `lease_s`.

    Jobs of one source series run one at a time: a job is not claimed while
    another job of its series is `running`. A run reads the latest output of its
    output series before inference (its predecessor, `storage.outputs`) and
    records its own outputs in the transaction that ends `running`; so, with
    this rule, the read-then-write of revisions is never interleaved and two
    runs can never both write r2 naming the same r1. `running` is enough:
    `exporting`, `held` and `done` are entered in the same transaction that
    records the outputs rows. The series row is locked (PostgreSQL) before the
    conditional UPDATE re-checks the rule, so two claimers of two jobs of one
    series wait for each other and the second sees the first `running`; SQLite
    serialises the UPDATEs anyway.
    """
    lost_series: list[int] = []
    with db.session() as session:
        for _ in range(_CLAIM_TRIES):
            row = session.execute(
                select(Job.id, Job.series_id)
                .where(Job.state == JobState.QUEUED, _no_running_job_of_its_series(), Job.series_id.not_in(lost_series))
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            candidate, series_id = row
            session.execute(select(Series.id).where(Series.id == series_id).with_for_update())
            now = utcnow()
            claimed = session.execute(
                update(Job)
                .where(Job.id == candidate, Job.state == JobState.QUEUED, _no_running_job_of_its_series())
                .values(
                    state=JobState.RUNNING,
                    claimed_by=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    started_at=now,
                    updated_at=now,
                    finished_at=None,
                    reason=None,
                    output_dir=None,  # a new attempt never carries the previous attempt's outputs
                    summary=None,
                    attempts=Job.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
            if claimed != 1:  # taken meanwhile, or another job of its series started: try another series
                lost_series.append(series_id)
                continue
            job = get_job(session, candidate)
            session.refresh(job)
            event_row(
                session,
                job,
                EventKind.STATE,
                f"running on {worker_id} (attempt {job.attempts})",
                state=JobState.RUNNING,
            )
            return candidate
        return None


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


def fail_job(
    db: Database,
    job_id: int,
    reason: str,
    exc: BaseException | None = None,
    *,
    holder: tuple[str, int] | None = None,
) -> None:
    """Record a failure with its readable reason and, if any, the stack trace.

    `holder` (worker id, attempt): fail only if that run still holds the job, else `LeaseLost`.
    """
    details = "".join(traceback.format_exception(exc)) if exc is not None else None
    with db.session() as session:
        if holder is not None:
            check_holder(session, job_id, *holder)
        job = get_job(session, job_id)
        event_row(session, job, EventKind.ERROR, reason, details=details)
        set_state(session, job, JobState.FAILED, f"failed: {reason}", reason=reason)


def reject_job(db: Database, job_id: int, reason: str, *, holder: tuple[str, int] | None = None) -> None:
    """A running job whose series the model does not accept (input screening): rejected, with why.

    `holder` as for `fail_job`."""
    with db.session() as session:
        if holder is not None:
            check_holder(session, job_id, *holder)
        job = get_job(session, job_id)
        set_state(session, job, JobState.REJECTED, f"rejected: {reason}", reason=f"rejected: {reason}")


def give_up_or_requeue(
    session: Session, job: Job, reason: str, max_attempts: int, *, details: str | None = None
) -> bool:
    """After an attempt that ended without a result: queue the job again, or fail it
    for good once it has been tried `max_attempts` times. Returns True when re-queued."""
    event_row(session, job, EventKind.ERROR, reason, details=details)
    if job.attempts >= max_attempts:
        final = f"gave up after {job.attempts} attempts: {reason}"
        set_state(session, job, JobState.FAILED, f"failed: {final}", reason=final)
        return False
    set_state(session, job, JobState.QUEUED, f"re-queued (attempt {job.attempts} of {max_attempts} ended: {reason})")
    return True


def retry_after_error(
    db: Database,
    job_id: int,
    reason: str,
    max_attempts: int,
    exc: BaseException | None = None,
    *,
    holder: tuple[str, int] | None = None,
) -> bool:
    """An internal error ended the attempt: `give_up_or_requeue`, with the stack trace.

    `holder` as for `fail_job`."""
    details = "".join(traceback.format_exception(exc)) if exc is not None else None
    with db.session() as session:
        if holder is not None:
            check_holder(session, job_id, *holder)
        return give_up_or_requeue(session, get_job(session, job_id), reason, max_attempts, details=details)


def retry_job(db: Database, job_id: int) -> None:
    """Queue a finished or cancelled job again (`dicom-node jobs retry`)."""
    with db.session() as session:
        job = get_job(session, job_id)
        if job.state not in RETRYABLE:
            raise InvalidTransition(
                f"job {job_id} is {job.state.value}; only done, failed, rejected or cancelled jobs can be retried"
                + (" (release or cancel a held job)" if job.state == JobState.HELD else "")
            )
        if job.state == JobState.REJECTED and job.rule_name is None:
            raise InvalidTransition(
                f"job {job_id} matched no routing rule; fix the rules and re-send the series instead"
            )
        set_state(session, job, JobState.QUEUED, "queued again by retry")


def renew_lease(db: Database, job_id: int, worker_id: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Extend the lease of a job this worker runs; False if it no longer holds the job."""
    with db.session() as session:
        renewed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.claimed_by == worker_id)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        ).rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
        return renewed == 1


def check_holder(session: Session, job_id: int, worker_id: str, attempt: int) -> None:
    """Raise `LeaseLost` unless `worker_id`'s run number `attempt` still holds the job.

    An UPDATE rather than a SELECT, so that the row is write-locked (SQLite: the
    database) until the caller's transaction commits: nobody can re-queue the job
    between this check and the caller's own change.
    """
    held = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state == JobState.RUNNING,
            Job.claimed_by == worker_id,
            Job.attempts == attempt,
        )
        .values(updated_at=utcnow())
    ).rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
    if held != 1:
        raise LeaseLost(f"job {job_id}: {worker_id} no longer holds attempt {attempt} (lease expired, re-queued)")


def requeue_job(session: Session, job: Job, reason: str, max_attempts: int) -> bool:
    """Put a `running` job whose holder is dead back in the queue, or fail it for good.

    The one path for re-queueing an interrupted run: its attempt was counted
    when it was claimed (`Job.attempts`), so the cap applies here
    (`give_up_or_requeue`): a job that kills its worker is not re-run forever.
    Returns True when re-queued.
    """
    job.lease_expires_at = None
    return give_up_or_requeue(session, job, reason, max_attempts)


def requeue_expired_leases(db: Database, max_attempts: int) -> list[int]:
    """Re-queue running jobs whose lease has expired (their worker stopped renewing it).

    A running job without a lease (claimed before leases existed) counts as expired.
    """
    expired = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < utcnow())
    return _requeue_running(db, expired, "the lease of {holder} expired", max_attempts)


def requeue_jobs_of(db: Database, process_id: str, max_attempts: int) -> list[int]:
    """Re-queue the running jobs of a process known to be dead, whatever their leases.

    `process_id` is the `host:pid:nonce` its workers' ids start with (`<process_id>:worker-N`).
    """
    return _requeue_running(
        db, Job.claimed_by.startswith(f"{process_id}:"), "{holder} is no longer running", max_attempts
    )


def _requeue_running(db: Database, condition: ColumnElement[bool], why: str, max_attempts: int) -> list[int]:
    """Re-queue running jobs matching `condition`; each is checked again under its row lock,
    so that a lease renewed or a job finished meanwhile is left alone."""
    matching = (Job.state == JobState.RUNNING) & condition
    with db.session() as session:
        candidates = session.scalars(select(Job.id).where(matching).order_by(Job.id)).all()
    requeued = []
    for job_id in candidates:
        with db.session() as session:
            job = session.scalar(select(Job).where(Job.id == job_id, matching).with_for_update(skip_locked=True))
            if job is None:
                continue
            # SQLite takes no row lock on SELECT: this conditional UPDATE is the guard there.
            guard = update(Job).where(Job.id == job_id, matching).values(updated_at=utcnow())
            if session.execute(guard).rowcount != 1:  # type: ignore[attr-defined]  # an UPDATE's CursorResult
                continue
            session.refresh(job)
            if requeue_job(session, job, f"interrupted run: {why.format(holder=job.claimed_by)}", max_attempts):
                requeued.append(job_id)
    return requeued


def record_outputs(
    db: Database,
    job_id: int,
    output_dir: str,
    summary: dict,
    exports: list[tuple[str, str, str, str]],
    *,
    holder: tuple[str, int] | None = None,
    objects: Sequence[WrittenObject] = (),
) -> None:
    """Store a job's results and its export rows (destination, sop uid, class uid, path);
    then move it to `exporting`, or `done` if there is nothing to send.

    `holder` (worker id, attempt): record only if that run still holds the job, else
    `LeaseLost`, so that a run whose lease expired never delivers a second set of outputs.
    `objects`: the DICOM objects the attempt wrote (`storage.outputs`, what re-runs supersede)."""
    with db.session() as session:
        if holder is not None:
            check_holder(session, job_id, *holder)
        job = get_job(session, job_id)
        job.output_dir = output_dir
        job.summary = summary
        add_outputs(session, job, objects)
        _queue_exports(session, job, exports, "")


def _queue_exports(session: Session, job: Job, exports: list[tuple[str, str, str, str]], prefix: str) -> None:
    """Add the export rows (of the job's current attempt) and move the job to `exporting` (`done` when none)."""
    for destination, sop_uid, class_uid, path in exports:
        session.add(
            Export(
                job=job,
                destination=destination,
                sop_instance_uid=sop_uid,
                sop_class_uid=class_uid,
                path=path,
                attempt=job.attempts,
            )
        )
    if exports:
        destinations = ", ".join(sorted({e[0] for e in exports}))
        set_state(session, job, JobState.EXPORTING, f"{prefix}exporting {len(exports)} object(s) to {destinations}")
    else:
        set_state(
            session,
            job,
            JobState.DONE,
            f"{prefix}done (nothing to send: no destinations, or their `objects` filters leave out every output)",
        )


def hold_outputs(
    db: Database,
    job_id: int,
    output_dir: str,
    summary: dict,
    reasons: list[str],
    *,
    holder: tuple[str, int] | None = None,
    objects: Sequence[WrittenObject] = (),
) -> None:
    """Store a job's results without export rows and move it to `held` with the gate's reasons; then
    to `cancelled` when a `replace` correction superseded this attempt while it ran (`cancel_superseded`).

    `holder` and `objects` as for `record_outputs`."""
    reason = "held: " + "; ".join(reasons)
    with db.session() as session:
        if holder is not None:
            check_holder(session, job_id, *holder)
        job = get_job(session, job_id)
        job.output_dir = output_dir
        job.summary = summary
        add_outputs(session, job, objects)
        set_state(session, job, JobState.HELD, f"{reason} (nothing sent; release or cancel)", reason=reason)
        if (newer := _superseding_job(session, job)) is not None:  # computed on a version since replaced
            cancelled = _held_reason(JobState.HELD, _superseded_reason(newer))
            set_state(session, job, JobState.CANCELLED, cancelled, reason=cancelled)


def release_job(
    db: Database, job_id: int, user: str, note: str = "", wants: Callable[[str, str], bool] | None = None
) -> int:
    """A person accepts a held result: its outputs go to the job's destinations.

    The export rows are made from the outputs recorded at hold time
    (`summary["outputs"]`: sop uid, class uid, path), keeping those that
    `wants(destination, sop_class_uid)` accepts (the destinations' `objects`
    filters; all when None). Returns their number. A result superseded meanwhile by a later
    job is still released, with a warning event (`storage.outputs.newer_revisions`).
    """
    with db.session() as session:
        job = get_job(session, job_id)
        if job.state != JobState.HELD:
            why = f" ({job.reason})" if job.state == JobState.CANCELLED and job.reason else ""
            raise InvalidTransition(f"job {job_id} is {job.state.value}{why}; only a held job can be released")
        if job.purged_at is not None:
            raise InvalidTransition(f"job {job_id}'s outputs were purged by retention; nothing left to release")
        outputs = (job.summary or {}).get("outputs", [])
        exports = [
            (dest, *output)
            for dest in job.destinations
            for output in outputs
            if wants is None or wants(dest, output[1])
        ]
        job.reason = None  # the hold's reason stays in the event history
        if exports and (warning := newer_revisions(session, job_id, job.attempts)) is not None:
            event_row(session, job, EventKind.LOG, f"warning: {warning}")
        _queue_exports(session, job, exports, f"released by {user}{_because(note)}; ")
        return len(exports)


def cancel_job(db: Database, job_id: int, user: str, note: str = "") -> None:
    """A person ends a held, queued or failed job (`cancelled`); nothing is sent.

    The change is a conditional UPDATE on the state read, so a worker claiming
    the same queued job at the same moment either wins (the cancel is refused)
    or finds it cancelled.
    """
    with db.session() as session:
        job = get_job(session, job_id)
        state = job.state
        if state not in CANCELLABLE:
            hint = " (let it finish, then cancel it if it is held or failed)" if state == JobState.RUNNING else ""
            raise InvalidTransition(
                f"job {job_id} is {state.value}; only queued, held or failed jobs can be cancelled{hint}"
            )
        now = utcnow()
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == state)
            .values(
                state=JobState.CANCELLED, updated_at=now, finished_at=now, reason=f"cancelled by {user}{_because(note)}"
            )
        ).rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
        if changed != 1:
            raise InvalidTransition(f"job {job_id} changed state while being cancelled; look again")
        session.refresh(job)
        event_row(session, job, EventKind.STATE, job.reason or "cancelled", state=JobState.CANCELLED)


#: How a running job learns that a `replace` correction superseded it (`cancel_superseded`): an event
#: starting with this, which `hold_outputs` looks for on the attempt that was running then.
SUPERSEDED_WHILE_RUNNING = "superseded while running by job"


def _superseded_reason(new_job_id: int) -> str:
    return f"cancelled: superseded by job {new_job_id} (instances of the series were replaced by corrected versions)"


def cancel_superseded(session: Session, series_id: int, new_job: Job) -> list[int]:
    """End the series' jobs that `new_job` supersedes (a `replace` correction made the series a new
    delivery, `new_job`); the ids of those cancelled. Call in the replacement's transaction.

    - queued: cancelled, it must not run on a series whose instances are being replaced;
    - held: cancelled, its outputs were computed on the earlier version and must never be released
      (`release_job` refuses a cancelled job and says why);
    - running: cannot be interrupted; an event records the supersession, and if that attempt ends
      held, `hold_outputs` cancels it the same way (a result it delivers is superseded by `new_job`'s).

    The same conditional UPDATE as `cancel_job`: a queued job a worker claims at this moment runs, and
    is then treated as running; a held job a person releases at this moment is delivered, and its
    result superseded by `new_job`'s."""
    reason = _superseded_reason(new_job.id)
    cancelled = []
    others = select(Job).where(
        Job.series_id == series_id,
        Job.state.in_((JobState.QUEUED, JobState.HELD, JobState.RUNNING)),
        Job.id != new_job.id,
    )
    for job in session.scalars(others).all():
        state = job.state
        if state != JobState.RUNNING:
            now = utcnow()
            changed = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == state)
                .values(state=JobState.CANCELLED, updated_at=now, finished_at=now, reason=_held_reason(state, reason))
            ).rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
            session.refresh(job)
            if changed == 1:
                event_row(session, job, EventKind.STATE, job.reason or reason, state=JobState.CANCELLED)
                cancelled.append(job.id)
                continue
        if job.state == JobState.RUNNING and _superseding_job(session, job) is None:  # once per attempt
            event_row(
                session,
                job,
                EventKind.LOG,
                f"{SUPERSEDED_WHILE_RUNNING} {new_job.id} (attempt {job.attempts}; instances of the series were"
                " replaced by corrected versions): if this attempt ends held, it is cancelled; its result is never"
                " released",
            )
    return cancelled


def _held_reason(state: JobState, reason: str) -> str:
    """The cancellation reason; for a held job, also why its outputs are never released."""
    if state != JobState.HELD:
        return reason
    return f"{reason}; its held outputs were computed on the earlier version and are never released"


def _superseding_job(session: Session, job: Job) -> int | None:
    """The job that superseded `job`'s current attempt while it ran (`cancel_superseded`), None if none.

    Matched by the attempt number in the marker, not by time: the marker is stamped on the
    receiving host and `started_at` on the worker's, whose clocks may differ."""
    markers = session.scalars(
        select(JobEvent.message)
        .where(
            JobEvent.job_id == job.id,
            JobEvent.kind == EventKind.LOG,
            JobEvent.message.startswith(SUPERSEDED_WHILE_RUNNING),
        )
        .order_by(JobEvent.id.desc())
    )
    for marker in markers:
        words = marker[len(SUPERSEDED_WHILE_RUNNING) :].replace("(", " ").replace(";", " ").split()
        if words[1:3] == ["attempt", str(job.attempts)]:
            return int(words[0])
    return None


def _because(note: str) -> str:
    return f": {note}" if note else ""


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
