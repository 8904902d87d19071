"""Export bookkeeping: one row per output object per destination, each attempt an event.

Retry policy (decided here, configured in `[export]`): after a failed attempt
the next one is due after `retry_initial_s * 2**(attempts-1)`, capped at
`retry_max_interval_s`; once the first attempt is older than
`give_up_after_s` the export is `failed`. A permanent failure (the caller decides:
a status or refusal that the same bytes to the same peer will always get again)
fails the export at once; retrying it for 24 h would only delay the operator,
who fixes the cause and re-sends with `dicom-node jobs export`. A job is `done` when all its exports
are delivered, `failed` (with the destinations and last errors as reason) when
none is pending and any failed. `resend` makes failed or delivered exports
pending again (`dicom-node jobs export`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from storage.database import Database
from storage.jobs import event_row, get_job, set_state
from storage.models import EventKind, Export, ExportState, Job, JobState, utcnow


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float
    max_interval_s: float
    give_up_after_s: float

    def delay(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.initial_s * 2 ** max(attempts - 1, 0), self.max_interval_s))


def record_attempt(
    db: Database,
    export_id: int,
    delivered: bool,
    message: str,
    policy: RetryPolicy,
    now: datetime | None = None,
    *,
    permanent: bool = False,
) -> None:
    """Store the outcome of one C-STORE attempt and settle the job when nothing is pending.

    A failed attempt is retried with backoff unless `permanent`, or until `give_up_after_s` has passed.
    """
    now = now or utcnow()
    with db.session() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise LookupError(f"export {export_id} does not exist")
        export.attempts += 1
        if delivered:
            export.state = ExportState.DONE
            export.done_at = now
            export.last_error = None
        else:
            export.last_error = message
            if permanent:
                export.state = ExportState.FAILED
                message += "; not retried (permanent failure: fix the cause, then `dicom-node jobs export`)"
            elif now - export.created_at >= timedelta(seconds=policy.give_up_after_s):
                export.state = ExportState.FAILED
                message += f"; giving up after {export.attempts} attempts"
            else:
                export.next_attempt_at = now + policy.delay(export.attempts)
                message += f"; next attempt at {export.next_attempt_at:%H:%M:%S}"
        job = export.job
        event_row(
            session,
            job,
            EventKind.EXPORT,
            f"{export.destination}: {export.sop_class_name()} attempt {export.attempts}: {message}",
        )
        session.flush()
        _settle(session, job)


def _settle(session, job: Job) -> None:
    states = [e.state for e in job.exports]
    if job.state != JobState.EXPORTING or ExportState.PENDING in states:
        return
    failed = [e for e in job.exports if e.state == ExportState.FAILED]
    if failed:
        reason = "; ".join(sorted({f"export to {e.destination} failed: {e.last_error}" for e in failed}))
        event_row(session, job, EventKind.ERROR, reason)
        set_state(session, job, JobState.FAILED, f"failed: {reason}", reason=reason)
    else:
        set_state(session, job, JobState.DONE, f"done: {len(states)} object(s) delivered")


def resend(
    db: Database,
    job_id: int,
    destinations: list[str] | None = None,
    outputs: list[tuple[str, str, str]] | None = None,
    wants: Callable[[str, str], bool] | None = None,
) -> int:
    """Make a job's exports pending again (optionally only to `destinations`).

    A destination the job never had gets new rows for each of `outputs`
    (sop uid, class uid, relative path). `wants(destination, sop_class_uid)`
    (the destinations' object filters) says which objects go where: an object
    a destination does not want gets no row, and its undelivered row is
    removed (e.g. the SR a TPS refused, once `objects = ["RTSTRUCT"]` is set),
    so that it no longer fails the job. Returns the number of pending exports.
    """
    wants = wants or (lambda _destination, _class_uid: True)
    now = utcnow()
    with db.session() as session:
        job = get_job(session, job_id)
        if job.output_dir is None:
            raise ValueError(f"job {job_id} has no outputs to send (state {job.state.value})")
        if job.state == JobState.HELD:
            raise ValueError(f"job {job_id} is held ({job.reason}); release it with `dicom-node jobs release`")
        wanted = destinations or sorted({e.destination for e in job.exports} | set(job.destinations))
        existing = {(e.destination, e.sop_instance_uid): e for e in job.exports}
        count = 0
        for destination in wanted:
            for sop_uid, class_uid, path in outputs or []:
                if (destination, sop_uid) not in existing and wants(destination, class_uid):
                    existing[(destination, sop_uid)] = Export(
                        job=job, destination=destination, sop_instance_uid=sop_uid, sop_class_uid=class_uid, path=path
                    )
                    session.add(existing[(destination, sop_uid)])
        for (destination, _), export in existing.items():
            if destination not in wanted:
                continue
            if wants(destination, export.sop_class_uid):
                export.state = ExportState.PENDING
                export.created_at = now
                export.next_attempt_at = now
                count += 1
            elif export.state != ExportState.DONE:  # filtered out since: its failure no longer fails the job
                job.exports.remove(export)
                event_row(
                    session,
                    job,
                    EventKind.EXPORT,
                    f"{destination}: {export.sop_class_name()} no longer sent there (its `objects` filter)",
                )
        if not count:
            raise ValueError(
                f"job {job_id}: nothing to send to {', '.join(wanted)} (their `objects` filters exclude every output)"
            )
        set_state(session, job, JobState.EXPORTING, f"re-sending {count} object(s) to {', '.join(wanted)}")
        return count


def due_exports(db: Database, now: datetime | None = None) -> list[Export]:
    """Pending exports whose next attempt is due, oldest first."""
    now = now or utcnow()
    with db.session() as session:
        return list(
            session.scalars(
                select(Export)
                .where(Export.state == ExportState.PENDING, Export.next_attempt_at <= now)
                .order_by(Export.next_attempt_at, Export.id)
            ).all()
        )
