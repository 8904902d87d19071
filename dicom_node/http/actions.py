"""What a user may do to a job from the web view, each recorded in the job's history with their name.

Retry, export, release and cancel are the CLI's own storage functions, with
the destinations' `objects` filters applied as the CLI applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import HTTPException

import storage.jobs as jobs
from dicom_node.export_targets import ExportTargets
from dicom_node.http.auth import User
from storage.exports import resend
from storage.models import EventKind, JobState

if TYPE_CHECKING:
    from dicom_node.service import NodeService
    from storage.database import Database


def available(job) -> list[str]:
    """Actions that make sense for a job in its current state."""
    names = []
    if job.state in jobs.TERMINAL_STATES and not (job.state == JobState.REJECTED and job.rule_name is None):
        names.append("retry")
    if job.output_dir is not None and job.state != JobState.RUNNING:
        names.append("export")
    if job.state == JobState.HELD:
        names += ["release", "cancel"]
    return names


def perform(service: NodeService, job_id: int, action: str, user: User, destinations: list[str] | None = None) -> str:
    """Do `action` for `user` (already checked to be allowed); returns what happened, in a sentence."""
    db = service.db
    try:
        if action == "retry":
            jobs.retry_job(db, job_id)
            done = "queued again"
        elif action == "export":
            known = {d.name for d in service.settings.destinations}
            unknown = [name for name in destinations or [] if name not in known]
            if unknown:
                raise HTTPException(400, f"unknown destination(s) {', '.join(unknown)}")
            outputs = [tuple(o) for o in (jobs.load_job(db, job_id).summary or {}).get("outputs", [])]
            count = resend(
                db, job_id, destinations or None, outputs, ExportTargets(service.settings.destinations).wants
            )
            done = f"{count} export(s) pending again" + _superseded(db, job_id)
        elif action == "release":
            count = jobs.release_job(db, job_id, user.name, wants=ExportTargets(service.settings.destinations).wants)
            done = f"released: {count} export(s) pending" + (_superseded(db, job_id) if count else "")
        elif action == "cancel":
            jobs.cancel_job(db, job_id, user.name)
            done = "cancelled"
        else:
            raise HTTPException(404, f"no action {action!r}")
        jobs.add_event(db, job_id, EventKind.LOG, f"{action} by {user.name} ({user.role}) from the web view: {done}")
        return f"job {job_id}: {done}"
    except jobs.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except (jobs.InvalidTransition, ValueError) as exc:
        raise HTTPException(409, str(exc)) from None


def _superseded(db: Database, job_id: int) -> str:
    """ "; warning: ..." when the job's latest attempt was superseded by a later result (see `newer_revisions`)."""
    from storage.outputs import newer_revisions_of

    warning = newer_revisions_of(db, job_id, jobs.load_job(db, job_id).attempts)
    return f"; warning: {warning}" if warning else ""
