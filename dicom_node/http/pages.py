"""Server-rendered pages (Jinja2, no JavaScript build): jobs, job, held, associations, destinations, system.

Lists refresh themselves with a meta refresh (`?refresh=0` turns it off).
The job page's overlay is drawn from the RTSTRUCT the node wrote and sent,
once, and kept next to it as `overlay.png`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicom_node.commands.jobs import job_dict
from dicom_node.http import views
from dicom_node.http.actions import available, perform
from dicom_node.http.api import job_filter
from dicom_node.http.app import require_actor
from dicom_node.http.auth import User
from storage.associations import recent_associations
from storage.jobs import JobFilter, JobNotFound, list_jobs, load_job
from storage.models import OUTPUT_CLASS_NAMES, EventKind, JobState

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_overlay_lock = threading.Lock()


def _render(request: Request, name: str, **context) -> HTMLResponse:
    context.setdefault("refresh", 0)
    return templates.TemplateResponse(request, name, {"user": request.state.user, **context})


def error_page(request: Request, exc: HTTPException) -> HTMLResponse:
    response = _render(request, "error.html", status=exc.status_code, message=exc.detail)
    response.status_code = exc.status_code
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


@router.get("/")
def index() -> RedirectResponse:
    return RedirectResponse("/jobs")


@router.get("/jobs")
def jobs_page(request: Request, flt: Annotated[JobFilter, Depends(job_filter)], refresh: int = 10) -> HTMLResponse:
    jobs = list_jobs(request.app.state.service.db, flt)
    query = request.query_params
    return _render(
        request,
        "jobs.html",
        jobs=jobs,
        states=[s.value for s in JobState],
        filters={k: query.get(k, "") for k in ("state", "since", "until", "patient_id", "study_uid")},
        refresh=refresh,
    )


def _job(request: Request, job_id: int):
    try:
        return load_job(request.app.state.service.db, job_id)
    except JobNotFound as exc:
        raise HTTPException(404, str(exc)) from None


def _outputs(job) -> dict[str, str]:
    """Object name (RTSTRUCT, SR) -> the path of this job's output, relative to the data directory."""
    found: dict[str, str] = {}
    for _sop_uid, class_uid, path in (job.summary or {}).get("outputs", []):
        found.setdefault(OUTPUT_CLASS_NAMES.get(class_uid, class_uid), path)
    return found


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: int, message: str | None = None) -> HTMLResponse:
    job = _job(request, job_id)
    data = job_dict(job, full=True)
    service = request.app.state.service
    return _render(
        request,
        "job.html",
        job=job,
        data=data,
        summary=job.summary or {},
        stages=[e for e in job.events if e.kind == EventKind.STAGE],
        outputs=_outputs(job),
        has_overlay=any(o[1] == RTSTRUCT_CLASS for o in (job.summary or {}).get("outputs", [])),
        actions=available(job),
        destinations=[d.name for d in service.settings.destinations],
        message=message,
        refresh=0 if job.state.value in ("done", "failed", "rejected", "cancelled") else 5,
    )


@router.get("/jobs/{job_id}/outputs/{name}")
def job_output(request: Request, job_id: int, name: str) -> FileResponse:
    """Download the job's RTSTRUCT or SR as sent (only paths the job itself recorded)."""
    path = _outputs(_job(request, job_id)).get(name)
    if path is None:
        raise HTTPException(404, f"job {job_id} has no {name} output")
    absolute = request.app.state.service.store.absolute(path)
    if not absolute.is_file():
        raise HTTPException(410, f"the {name} of job {job_id} is no longer on disk (retention?)")
    return FileResponse(absolute, media_type="application/dicom", filename=f"job-{job_id}-{name}.dcm")


@router.get("/jobs/{job_id}/overlay.png")
def job_overlay(request: Request, job_id: int) -> Response:
    from dicom_node.overlay import overlay_png
    from dicom_node.worker import series_files

    job = _job(request, job_id)
    service = request.app.state.service
    rtstruct = next((p for _u, c, p in (job.summary or {}).get("outputs", []) if c == RTSTRUCT_CLASS), None)
    if rtstruct is None:
        raise HTTPException(404, f"job {job_id} has no RTSTRUCT")
    rtstruct_path = service.store.absolute(rtstruct)
    target = rtstruct_path.parent / "overlay.png"
    with _overlay_lock:
        if not target.is_file():
            files = series_files(service.db, service.store, job.series_id)
            if not files or not rtstruct_path.is_file():
                raise HTTPException(410, f"job {job_id}: the images or the RTSTRUCT are no longer on disk")
            overlay_png(files, rtstruct_path, target, caption="contours of the RTSTRUCT as sent by this node")
    return FileResponse(target, media_type="image/png")


@router.post("/jobs/{job_id}/{action}")
def job_action(
    request: Request,
    job_id: int,
    action: str,
    user: Annotated[User, Depends(require_actor)],
    destination: Annotated[str, Form()] = "",
) -> RedirectResponse:
    result = perform(request.app.state.service, job_id, action, user, [destination] if destination else None)
    return RedirectResponse(f"/jobs/{job_id}?message={quote(result)}", status_code=303)


@router.get("/held")
def held_page(request: Request, refresh: int = 10) -> HTMLResponse:
    jobs = list_jobs(request.app.state.service.db, JobFilter(state=JobState.HELD, limit=500))
    return _render(
        request,
        "held.html",
        jobs=jobs,
        actions={job.id: available(job) for job in jobs},
        refresh=refresh,
    )


@router.get("/associations")
def associations_page(request: Request, refresh: int = 10) -> HTMLResponse:
    rows = recent_associations(request.app.state.service.db)
    return _render(request, "associations.html", associations=rows, refresh=refresh)


@router.get("/destinations")
def destinations_page(request: Request, message: str | None = None) -> HTMLResponse:
    service = request.app.state.service
    return _render(
        request,
        "destinations.html",
        destinations=views.destinations(service, request.app.state.echo_results),
        message=message,
    )


@router.post("/destinations/{name}/echo")
def echo_destination(request: Request, name: str, user: Annotated[User, Depends(require_actor)]) -> RedirectResponse:
    from dicom_node.echo_scu import send_echo
    from storage.models import utcnow

    service = request.app.state.service
    try:
        dest = service.settings.destination(name)
    except KeyError:
        raise HTTPException(404, f"no destination {name!r}") from None
    result = send_echo(
        dest.host,
        dest.port,
        calling_ae_title=dest.calling_ae_title or service.settings.node.ae_title,
        called_ae_title=dest.ae_title,
        tls=dest.tls if dest.tls.enabled else None,
    )
    request.app.state.echo_results[name] = (utcnow(), result, user.name)
    return RedirectResponse(f"/destinations?message={quote(result.message)}", status_code=303)


@router.get("/system")
def system_page(request: Request) -> HTMLResponse:
    return _render(request, "system.html", system=views.system(request.app.state.service))
