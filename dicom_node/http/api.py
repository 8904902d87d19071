"""The JSON API under /api/: the same objects as `dicom-node jobs list/show --json` (one serialiser)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request

from dicom_node.commands.jobs import job_dict
from dicom_node.http.actions import perform
from dicom_node.http.app import require_actor
from dicom_node.http.auth import User
from storage.jobs import JobFilter, JobNotFound, list_jobs, load_job
from storage.models import JobState

router = APIRouter(prefix="/api", tags=["jobs"])


def job_filter(
    state: Annotated[str | None, Query(description="received, queued, running, exporting, done, failed, ...")] = None,
    since: Annotated[str | None, Query(description="Created on or after this day (YYYY-MM-DD, UTC).")] = None,
    until: Annotated[str | None, Query(description="Created on or before this day (YYYY-MM-DD, UTC).")] = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobFilter:
    """Query parameters as the job store's filter. Empty values (a form's blank fields) mean "any"."""
    try:
        job_state = JobState(state) if state else None
    except ValueError:
        raise HTTPException(422, f"state {state!r} is not one of {', '.join(s.value for s in JobState)}") from None
    first, last = _day(since, "since"), _day(until, "until")
    return JobFilter(
        state=job_state,
        since=datetime.combine(first, time(), UTC) if first else None,
        until=datetime.combine(last + timedelta(days=1), time(), UTC) if last else None,
        patient_id=patient_id or None,
        study_uid=study_uid or None,
        limit=limit,
    )


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"{name} {value!r} is not a date (YYYY-MM-DD)") from None


@router.get("/jobs", summary="Jobs, newest first (as `dicom-node jobs list --json`).")
def api_jobs(request: Request, flt: Annotated[JobFilter, Depends(job_filter)]) -> list[dict[str, Any]]:
    return [job_dict(job) for job in list_jobs(request.app.state.service.db, flt)]


@router.get("/jobs/{job_id}", summary="One job with events, exports and summary (as `dicom-node jobs show --json`).")
def api_job(request: Request, job_id: int) -> dict[str, Any]:
    try:
        return job_dict(load_job(request.app.state.service.db, job_id), full=True)
    except JobNotFound as exc:
        raise HTTPException(404, str(exc)) from None


@router.post(
    "/jobs/{job_id}/{action}",
    summary='retry, export (optional body {"destinations": [...]}), release or cancel; physicist or admin.',
)
def api_action(
    request: Request,
    job_id: int,
    action: Literal["retry", "export", "release", "cancel"],
    user: Annotated[User, Depends(require_actor)],
    destinations: Annotated[list[str] | None, Body(embed=True)] = None,
) -> dict[str, str]:
    return {"result": perform(request.app.state.service, job_id, action, user, destinations)}
