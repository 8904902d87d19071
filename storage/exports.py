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

Attempts: each export row belongs to the attempt of the job that wrote its
object (`Export.attempt`). A job's state follows the rows of the attempt being
delivered only (`_settle`): a retry is judged by its own rows, never by an
earlier attempt's failures. `resend` sends the latest attempt's outputs unless
told another attempt (`jobs export --attempt N`); the other attempts' rows stay
as they were, so a stale result is never re-sent with the new one.

Storage Commitment (destinations with `storage_commitment = true`): the
C-STOREd rows become `committing` with the N-ACTION's Transaction UID
(`request_commitment`) *before* the N-ACTION is sent, because the report may
come back before the N-ACTION response is read. The N-EVENT-REPORT makes them
`committed`, or `failed` with the reason the destination gave
(`record_commitment`); a report that never comes fails them after the
destination's `storage_commitment_timeout_s` (`expire_commitments`). A job with a
`committing` row is still `exporting`; it is `done` only when all are delivered or committed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from storage.database import Database
from storage.jobs import event_row, get_job, set_state
from storage.models import (
    DELIVERED_EXPORT_STATES,
    UNSETTLED_EXPORT_STATES,
    EventKind,
    Export,
    ExportState,
    Job,
    JobState,
    utcnow,
)
from storage.outputs import attempt_outputs, newer_revisions


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
    new_attempt: bool = True,
) -> None:
    """Store the outcome of one C-STORE attempt and settle the job when nothing is pending.

    A failed attempt is retried with backoff unless `permanent`, or until `give_up_after_s` has passed.
    `new_attempt` False: the outcome ends an attempt already counted (a Storage Commitment request
    that failed after `request_commitment`).
    """
    now = now or utcnow()
    with db.session() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise LookupError(f"export {export_id} does not exist")
        export.attempts += new_attempt
        export.transaction_uid = None
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
                export.state = ExportState.PENDING
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
        _settle(session, job, export.attempt)


def request_commitment(db: Database, export_ids: list[int], transaction_uid: str, now: datetime | None = None) -> None:
    """Mark C-STOREd exports `committing` under `transaction_uid`; one attempt each."""
    now = now or utcnow()
    with db.session() as session:
        for export in session.scalars(select(Export).where(Export.id.in_(export_ids))):
            export.attempts += 1
            export.state = ExportState.COMMITTING
            export.transaction_uid = transaction_uid
            export.commit_requested_at = now
            export.last_error = None
            event_row(
                session,
                export.job,
                EventKind.EXPORT,
                f"{export.destination}: {export.sop_class_name()} attempt {export.attempts}: stored;"
                f" Storage Commitment requested (transaction {transaction_uid})",
            )


def record_commitment(
    db: Database,
    transaction_uid: str,
    committed: list[str],
    failed: dict[str, str],
    reporter: str,
    now: datetime | None = None,
) -> int:
    """Apply a Storage Commitment report: `committed` SOP Instance UIDs, `failed` ones with their reason.

    Rows of the transaction named in neither list stay `committing` (the timeout ends them).
    Returns how many rows the report settled (0: an unknown or already settled transaction).
    """
    now = now or utcnow()
    settled = 0
    with db.session() as session:
        exports = session.scalars(
            select(Export).where(Export.transaction_uid == transaction_uid, Export.state == ExportState.COMMITTING)
        ).all()
        for export in exports:
            if export.sop_instance_uid in failed:
                export.state = ExportState.FAILED
                export.last_error = f"{reporter} did not commit it: {failed[export.sop_instance_uid]}"
                message = f"{export.last_error}; re-send with `dicom-node jobs export` once the cause is fixed"
            elif export.sop_instance_uid in committed:
                export.state = ExportState.COMMITTED
                export.done_at = now
                message = f"committed by {reporter} (transaction {transaction_uid})"
            else:
                continue
            settled += 1
            event_row(
                session, export.job, EventKind.EXPORT, f"{export.destination}: {export.sop_class_name()} {message}"
            )
        session.flush()
        for job, attempt in {(export.job, export.attempt) for export in exports}:
            _settle(session, job, attempt)
    return settled


def expire_commitments(
    db: Database, timeouts_s: dict[str, float], default_timeout_s: float, now: datetime | None = None
) -> int:
    """Fail `committing` exports whose report has not come within their destination's timeout; returns how many."""
    now = now or utcnow()
    expired = 0
    with db.session() as session:
        exports = session.scalars(select(Export).where(Export.state == ExportState.COMMITTING)).all()
        jobs: dict[tuple[int, int], tuple[Job, int]] = {}
        for export in exports:
            timeout_s = timeouts_s.get(export.destination, default_timeout_s)
            if export.commit_requested_at is None or now - export.commit_requested_at < timedelta(seconds=timeout_s):
                continue
            export.state = ExportState.FAILED
            export.last_error = (
                f"no Storage Commitment report from {export.destination} within {timeout_s:g} s"
                f" (transaction {export.transaction_uid}); the object was stored but its commitment is unknown"
            )
            event_row(
                session,
                export.job,
                EventKind.EXPORT,
                f"{export.destination}: {export.sop_class_name()} {export.last_error};"
                " re-send with `dicom-node jobs export`",
            )
            jobs[(export.job.id, export.attempt)] = (export.job, export.attempt)
            expired += 1
        session.flush()
        for job, attempt in jobs.values():
            _settle(session, job, attempt)
    return expired


def _settle(session, job: Job, attempt: int) -> None:
    """`done` or `failed` once every export row of `attempt` (the one being delivered) has settled.

    Rows of other attempts are history: a retry's failed rows of attempt 1 never fail attempt 2.
    """
    exports = [e for e in job.exports if e.attempt == attempt]
    states = [e.state for e in exports]
    if job.state != JobState.EXPORTING or UNSETTLED_EXPORT_STATES & set(states):
        return
    failed = [e for e in exports if e.state == ExportState.FAILED]
    if failed:
        reason = "; ".join(sorted({f"export to {e.destination} failed: {e.last_error}" for e in failed}))
        event_row(session, job, EventKind.ERROR, reason)
        set_state(session, job, JobState.FAILED, f"failed: {reason}", reason=reason)
    else:
        committed = states.count(ExportState.COMMITTED)
        note = f", {committed} of them committed" if committed else ""
        set_state(session, job, JobState.DONE, f"done: {len(states)} object(s) delivered{note}")


#: Jobs whose recorded outputs are the result to deliver (never held, cancelled, queued or running ones).
RESENDABLE = frozenset({JobState.DONE, JobState.FAILED, JobState.EXPORTING})


def resend(
    db: Database,
    job_id: int,
    destinations: list[str] | None = None,
    outputs: list[tuple[str, str, str]] | None = None,
    wants: Callable[[str, str], bool] | None = None,
    attempt: int | None = None,
) -> int:
    """Make the exports of one attempt of a job pending again (optionally only to `destinations`).

    `attempt`: the job's latest attempt when None (`dicom-node jobs export`), else that
    attempt's outputs (`--attempt N`); rows of other attempts are left as they are, so
    stale results of earlier attempts are never sent again by accident. Its outputs are
    what the attempt recorded (`storage.outputs`); `outputs` (sop uid, class uid,
    relative path) stands in for a job recorded before that existed (`summary["outputs"]`).
    A destination without rows for the attempt gets new rows for each output.
    `wants(destination, sop_class_uid)` (the destinations' object filters) says which
    objects go where: an object a destination does not want gets no row, and its
    undelivered row is removed (e.g. the SR a TPS refused, once `objects = ["RTSTRUCT"]`
    is set), so that it no longer fails the job. Returns the number of pending exports.
    """
    wants = wants or (lambda _destination, _class_uid: True)
    now = utcnow()
    with db.session() as session:
        job = get_job(session, job_id)
        latest = attempt is None or attempt == job.attempts
        attempt = job.attempts if attempt is None else attempt
        if not 1 <= attempt <= job.attempts:
            raise ValueError(f"job {job_id} has no attempt {attempt} (it has been run {job.attempts} time(s))")
        if latest and job.output_dir is None:
            raise ValueError(
                f"job {job_id} has no outputs to send (state {job.state.value})"
                + (f"; `--attempt N` sends an earlier attempt's (1..{job.attempts - 1})" if job.attempts > 1 else "")
            )
        if job.state == JobState.HELD:
            raise ValueError(f"job {job_id} is held ({job.reason}); release it with `dicom-node jobs release`")
        if job.state not in RESENDABLE:
            raise ValueError(
                f"job {job_id} is {job.state.value}: only a done, failed or exporting job's outputs can be re-sent"
                " (a cancelled or re-running job's outputs are not the result to deliver)"
            )
        if job.purged_at is not None:
            raise ValueError(f"job {job_id}'s outputs were purged by retention; `dicom-node jobs retry` runs it again")
        busy = sorted({e.attempt for e in job.exports if e.attempt != attempt and e.state in UNSETTLED_EXPORT_STATES})
        if busy:
            raise ValueError(
                f"job {job_id} is still sending attempt {busy[0]}; re-send attempt {attempt} once that has settled"
            )
        recorded = attempt_outputs(session, job_id, attempt) or (outputs if latest else None) or []
        if not recorded and not latest:
            raise ValueError(f"job {job_id}: attempt {attempt} wrote no outputs to send")
        wanted = destinations or sorted({e.destination for e in job.exports} | set(job.destinations))
        existing = {(e.destination, e.sop_instance_uid): e for e in job.exports if e.attempt == attempt}
        count = 0
        for destination in wanted:
            for sop_uid, class_uid, path in recorded:
                if (destination, sop_uid) not in existing and wants(destination, class_uid):
                    existing[(destination, sop_uid)] = Export(
                        job=job,
                        destination=destination,
                        sop_instance_uid=sop_uid,
                        sop_class_uid=class_uid,
                        path=path,
                        attempt=attempt,
                    )
                    session.add(existing[(destination, sop_uid)])
        for (destination, _), export in existing.items():
            if destination not in wanted:
                continue
            if wants(destination, export.sop_class_uid):
                export.state = ExportState.PENDING
                export.created_at = now
                export.next_attempt_at = now
                export.transaction_uid = export.commit_requested_at = None
                count += 1
            elif export.state not in DELIVERED_EXPORT_STATES:  # filtered out since: its failure no longer fails the job
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
        if (warning := newer_revisions(session, job_id, attempt)) is not None:
            event_row(session, job, EventKind.LOG, f"warning: {warning}")
        which = "" if attempt == job.attempts else f" of attempt {attempt} (not the latest, {job.attempts})"
        set_state(session, job, JobState.EXPORTING, f"re-sending {count} object(s){which} to {', '.join(wanted)}")
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
