"""`dicom-node jobs ...`: the physicist's view of every job (list, show, retry, export,
release, cancel).

`--json` output is stable: `list` prints an array of objects with at least
id, state, study_uid, series_uid, patient_id, created_at, updated_at, reason;
`show` prints one such object plus events, exports and summary.

A held job (the plausibility gate stopped its result) is looked at with
`show`, which lists its lesions and writes the overlay PNG of its RTSTRUCT,
then `release`d (sent to its destinations) or `cancel`led. Both record the
person (`--user`, default the OS login) and `--note` in the job's events.
`show` prints one such object plus events, exports and summary. `claimed_by`
is the worker that runs (or last ran) the job, `host:pid:nonce:worker-N`;
`host` its host; `lease_expires_at` how long a running job's worker is
trusted without a heartbeat.

Re-runs: a retried job keeps every attempt's outputs; `export` re-sends the
latest attempt's only, `export --attempt N` attempt N's (`storage.exports.resend`),
and `show` lists each export row with its attempt.

Every value that comes from the job store (patient ID, reasons, messages,
AE titles) is escaped before Rich renders it: a PatientID such as
`PAT[/]01` is text, not markup, and must neither crash nor restyle the view.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicom_node.commands._common import ConfigOption, fail, job_store_or_exit, settings_or_exit

jobs_app = typer.Typer(help="Follow, retry and re-export jobs.", no_args_is_help=True)
if TYPE_CHECKING:
    from storage.database import Database

console = Console()


def _database(config: Path | None):

    return job_store_or_exit(settings_or_exit(config))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_dict(job, *, full: bool = False) -> dict:
    from dicom_node.worker import holder_host

    data = {
        "id": job.id,
        "state": job.state.value,
        "study_uid": job.study_uid,
        "series_uid": job.series_uid,
        "patient_id": job.patient_id,
        "rule": job.rule_name,
        "model": job.model,
        "instances": job.instance_count,
        "attempts": job.attempts,
        "claimed_by": job.claimed_by,
        "host": holder_host(job.claimed_by),
        "lease_expires_at": _iso(job.lease_expires_at) if job.state.value == "running" else None,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "reason": job.reason,
    }
    if full:
        previous = None
        events = []
        for event in job.events:
            events.append(
                {
                    "at": _iso(event.at),
                    "kind": event.kind.value,
                    "state": event.state.value if event.state else None,
                    "message": event.message,
                    "duration_s": event.duration_s,
                    "since_previous_s": (event.at - previous).total_seconds() if previous else 0.0,
                    "details": event.details,
                }
            )
            previous = event.at
        data["events"] = events
        data["exports"] = [
            {
                "destination": e.destination,
                "object": e.sop_class_name(),
                "sop_instance_uid": e.sop_instance_uid,
                "state": e.state.value,
                "attempts": e.attempts,
                "last_error": e.last_error,
                "done_at": _iso(e.done_at),
                "path": e.path,
                "attempt": e.attempt,
            }
            for e in job.exports
        ]
        data["output_dir"] = job.output_dir
        data["summary"] = job.summary
    return data


def _parse_day(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{option} {value!r} is not a date (YYYY-MM-DD or ISO 8601)") from None
    from datetime import UTC

    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@jobs_app.command("list")
def list_jobs(
    state: str | None = typer.Option(
        None, help="received, queued, running, exporting, done, failed, rejected, held, cancelled"
    ),
    since: str | None = typer.Option(None, help="Created at or after this date/time (UTC)."),
    until: str | None = typer.Option(None, help="Created before this date/time (UTC)."),
    patient_id: str | None = typer.Option(None, "--patient-id"),
    study_uid: str | None = typer.Option(None, "--study-uid"),
    limit: int = typer.Option(100, min=1),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON array."),
    config: Path | None = ConfigOption,
) -> None:
    """List jobs, newest first."""
    from storage.jobs import JobFilter
    from storage.jobs import list_jobs as query
    from storage.models import JobState

    try:
        job_state = JobState(state) if state else None
    except ValueError:
        raise fail(f"--state {state!r} is not one of {', '.join(s.value for s in JobState)}") from None
    flt = JobFilter(
        state=job_state,
        since=_parse_day(since, "--since"),
        until=_parse_day(until, "--until"),
        patient_id=patient_id,
        study_uid=study_uid,
        limit=limit,
    )
    jobs = query(_database(config), flt)
    if as_json:
        typer.echo(json.dumps([job_dict(j) for j in jobs], indent=2))
        return
    table = Table("id", "state", "patient", "series", "created (UTC)", "reason")
    for job in jobs:
        table.add_row(
            str(job.id),
            job.state.value,
            escape(job.patient_id or ""),
            escape(job.series_uid[-24:]),
            f"{job.created_at:%Y-%m-%d %H:%M:%S}",
            escape(job.reason or ""),
        )
    console.print(table)


@jobs_app.command("show")
def show(
    job_id: int,
    as_json: bool = typer.Option(False, "--json"),
    overlay: Path | None = typer.Option(
        None,
        help="Write the overlay PNG of the job's RTSTRUCT here "
        "(a held job writes it by default, as overlay.png in its output folder).",
    ),
    config: Path | None = ConfigOption,
) -> None:
    """The job's timeline with stage durations, log lines, exports and errors; its lesions."""
    from storage.jobs import JobNotFound, load_job
    from storage.models import JobState

    settings = settings_or_exit(config)
    db = _database(config)
    try:
        job = load_job(db, job_id)
    except JobNotFound as exc:
        raise fail(str(exc)) from None
    data = job_dict(job, full=True)
    if overlay is None and job.state == JobState.HELD and job.output_dir:
        overlay = settings.storage.data_dir / job.output_dir / "overlay.png"
    if overlay is not None:
        data["overlay"] = _write_overlay(db, settings.storage.data_dir, job, overlay)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console.print(
        f"[bold]Job {job.id}[/] [cyan]{job.state.value}[/]  patient {escape(job.patient_id or '-')}  "
        f"rule {escape(job.rule_name or '-')}  attempts {job.attempts}"
    )
    console.print(f"study {escape(job.study_uid)}\nseries {escape(job.series_uid)}")
    if job.claimed_by:
        verb = "running on" if data["lease_expires_at"] else "last run on"
        lease = f"  (lease until {job.lease_expires_at:%H:%M:%S} UTC)" if data["lease_expires_at"] else ""
        console.print(f"{verb} host {data['host']}: {escape(job.claimed_by)}{lease}", highlight=False)
    if job.reason:
        console.print(f"[red]reason:[/] {escape(job.reason)}")
    table = Table("time (UTC)", "+s", "kind", "message", "duration")
    for event in data["events"]:
        table.add_row(
            event["at"][11:23],
            f"{event['since_previous_s']:.1f}",
            event["kind"],
            escape(event["message"]),
            f"{event['duration_s']:.2f} s" if event["duration_s"] is not None else "",
        )
    console.print(table)
    if data["exports"]:
        exports = Table("job attempt", "destination", "object", "state", "tries", "last error")
        for e in data["exports"]:
            exports.add_row(
                str(e["attempt"]),
                escape(e["destination"]),
                e["object"],
                e["state"],
                str(e["attempts"]),
                escape(e["last_error"] or ""),
            )
        console.print(exports)
    for event in job.events:
        if event.details:
            console.print(f"[red]trace of '{escape(event.message)}':[/]\n{escape(event.details)}", highlight=False)
    _print_lesions((job.summary or {}).get("lesions", []))
    if data.get("overlay"):
        console.print(f"overlay of the RTSTRUCT's contours: {data['overlay']}")
    if job.state == JobState.HELD:
        console.print(
            f"[yellow]Nothing was sent.[/] Look at the lesions and the overlay, then "
            f"`dicom-node jobs release {job.id}` or `dicom-node jobs cancel {job.id}`."
        )


def _print_lesions(lesions: list[dict]) -> None:
    if not lesions:
        return
    table = Table("lesion", "volume (cm3)", "max diameter (mm)", "centroid LPS (mm)", title=f"{len(lesions)} lesion(s)")
    for lesion in lesions:
        table.add_row(
            lesion["name"],
            f"{lesion['volume_cm3']:.3f}",
            f"{lesion['max_diameter_mm']:.1f}",
            ", ".join(f"{v:.1f}" for v in lesion["centroid_mm"]),
        )
    console.print(table)


def _write_overlay(db, data_dir: Path, job, out_png: Path) -> str | None:
    """The overlay PNG of the job's RTSTRUCT on its series, or None (printed why) when there is none."""
    from dicom_node.overlay import overlay_png
    from dicom_node.worker import series_files
    from storage.instance_store import InstanceStore
    from storage.models import OUTPUT_CLASS_NAMES

    rtstructs = [o[2] for o in (job.summary or {}).get("outputs", []) if OUTPUT_CLASS_NAMES.get(o[1]) == "RTSTRUCT"]
    if not rtstructs:
        console.print("no overlay: the job has no RTSTRUCT (no lesions, or no outputs yet)")
        return None
    files = [f for f in series_files(db, InstanceStore(data_dir), job.series_id) if f.is_file()]
    if not files:
        console.print("no overlay: the series' instances are no longer on disk (purged)")
        return None
    try:
        return str(overlay_png(files, data_dir / rtstructs[0], out_png, caption=f"job {job.id} ({job.state.value})"))
    except Exception as exc:  # noqa: BLE001 - a picture must never hide the job's timeline
        console.print(f"no overlay: {type(exc).__name__}: {exc}")
        return None


@jobs_app.command("retry")
def retry(job_id: int, config: Path | None = ConfigOption) -> None:
    """Queue a done, failed or rejected job again (the running service picks it up); its new result
    goes into the same output series and supersedes the earlier one."""
    from storage.jobs import InvalidTransition, JobNotFound, retry_job

    try:
        retry_job(_database(config), job_id)
    except (JobNotFound, InvalidTransition) as exc:
        raise fail(str(exc)) from None
    console.print(f"job {job_id} queued again")


@jobs_app.command("export")
def export(
    job_id: int,
    to: list[str] = typer.Option(None, "--to", help="Destination name (repeatable)."),
    attempt: int | None = typer.Option(
        None, "--attempt", min=1, help="Send this attempt's outputs instead of the latest attempt's."
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Re-send a job's results (its latest attempt's, or --attempt N's) to its destinations (or only to --to),
    as their `objects` filters allow; earlier attempts' outputs are not sent again."""
    from dicom_node.export_targets import ExportTargets
    from storage.exports import resend
    from storage.jobs import InvalidTransition, JobNotFound, load_job

    settings = settings_or_exit(config)
    known = {d.name for d in settings.destinations}
    unknown = [name for name in to or [] if name not in known]
    if unknown:
        raise fail(f"unknown destination(s) {', '.join(unknown)}; configured: {', '.join(sorted(known)) or 'none'}")
    db = _database(config)
    try:
        job = load_job(db, job_id)
        outputs = [tuple(o) for o in (job.summary or {}).get("outputs", [])]
        count = resend(
            db, job_id, list(to) if to else None, outputs, ExportTargets(settings.destinations).wants, attempt=attempt
        )
    except (JobNotFound, InvalidTransition, ValueError) as exc:
        raise fail(str(exc)) from None
    which = f"attempt {attempt}" if attempt is not None else f"attempt {job.attempts}, the latest"
    console.print(f"job {job_id}: {count} export(s) pending ({which}); the running service sends them")
    _warn_if_superseded(db, job_id, attempt or job.attempts)


UserOption = typer.Option(None, "--user", help="Who decides (recorded in the job's events; default: the OS login).")
NoteOption = typer.Option("", "--note", help="Why (recorded in the job's events).")


def _user(user: str | None) -> str:
    return user or getpass.getuser()


@jobs_app.command("release")
def release(
    job_id: int, user: str | None = UserOption, note: str = NoteOption, config: Path | None = ConfigOption
) -> None:
    """Deliver a held job's outputs to its destinations (the running service sends them)."""
    from dicom_node.export_targets import ExportTargets
    from storage.jobs import InvalidTransition, JobNotFound, load_job, release_job

    settings = settings_or_exit(config)
    db = job_store_or_exit(settings)
    try:
        count = release_job(db, job_id, _user(user), note, ExportTargets(settings.destinations).wants)
        attempt = load_job(db, job_id).attempts
    except (JobNotFound, InvalidTransition) as exc:
        raise fail(str(exc)) from None
    console.print(f"job {job_id} released: {count} export(s) pending; the running service sends them")
    if count:
        _warn_if_superseded(db, job_id, attempt)


def _warn_if_superseded(db: Database, job_id: int, attempt: int) -> None:
    """Say so on stderr when what was just queued is older than a later result of its output series."""
    from storage.outputs import newer_revisions_of

    warning = newer_revisions_of(db, job_id, attempt)
    if warning is not None:
        Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


@jobs_app.command("cancel")
def cancel(
    job_id: int, user: str | None = UserOption, note: str = NoteOption, config: Path | None = ConfigOption
) -> None:
    """End a held, queued or failed job; nothing is sent (a running job: wait until it has finished)."""
    from storage.jobs import InvalidTransition, JobNotFound, cancel_job

    try:
        cancel_job(_database(config), job_id, _user(user), note)
    except (JobNotFound, InvalidTransition) as exc:
        raise fail(str(exc)) from None
    console.print(f"job {job_id} cancelled")


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
