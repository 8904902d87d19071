"""`dicom-node store reindex`: rebuild the job store's rows from the instance files (storage/reindex.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from dicom_node.commands._common import ConfigOption, fail, job_store_or_exit, settings_or_exit

if TYPE_CHECKING:
    from storage.ingest import InstanceMeta

store_app = typer.Typer(help="The instance store: rebuild the job store's rows from its files.", no_args_is_help=True)


def stored_instance_meta(path: Path) -> InstanceMeta:
    """A stored file's header as the Store SCP reads it on arrival (its own transfer syntax, no sender)."""
    from dicom_node.instance_header import read_header
    from dicom_node.store_scp import instance_meta

    ds = read_header(path)
    if "TransferSyntaxUID" not in ds.file_meta:
        raise ValueError("no file meta information (Transfer Syntax UID)")
    return instance_meta(ds, str(ds.file_meta.TransferSyntaxUID), None)


REINDEX_HELP = (
    "Recreate the rows of the instance files the job store does not know (after losing the database, "
    "or restoring an older backup), and mark purged the rows whose file is missing. Run it with the node "
    "stopped (refused while a node or worker on this host uses the data directory). By default the series "
    "that get rows are marked evaluated: nothing is processed or delivered again, only instances received "
    "from now on start a new delivery. With --route each such series gets a job and is routed, processed "
    "and delivered again after the quiet period. The job history is not recovered, but the revisions of the "
    "results are: the output files under <data_dir>/outputs/ get their rows (and their job a row under its own "
    "id), so a re-run supersedes the latest of them. Nothing is deleted: unreadable instance files, and those cut "
    "short (e.g. by a power cut), are moved to <data_dir>/unindexed/. Exit status 1 when some files could not be "
    "indexed."
)
_LISTED = 20  # rows without a file listed by path; a purge after the backup may leave thousands


@store_app.command("reindex", help=REINDEX_HELP)
def reindex(
    config: Path | None = ConfigOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be added; change nothing."),
    route: bool = typer.Option(
        False, "--route", help="Route the series again (process and deliver them), instead of marking them evaluated."
    ),
) -> None:
    """See REINDEX_HELP (one paragraph, so that the help text wraps)."""
    from dicom_node.incarnation import live_holders
    from storage.instance_store import InstanceStore
    from storage.reindex import UNINDEXED_DIR
    from storage.reindex import reindex as rebuild
    from storage.store_identity import StoreMismatchError

    settings = settings_or_exit(config)
    running = live_holders(settings.storage.data_dir)
    if running and not dry_run:
        raise fail(
            f"a node or worker is running on this data directory ({escape(', '.join(running))}): "
            "stop it first (dicom-node store reindex runs with the node stopped); nothing was changed"
        )
    db = job_store_or_exit(settings)
    store = InstanceStore(settings.storage.data_dir)
    try:
        report = rebuild(db, store, stored_instance_meta, route=route, dry_run=dry_run)
    except StoreMismatchError as exc:
        raise fail(str(exc)) from None
    finally:
        db.dispose()
    console = Console(soft_wrap=True)
    verb, mark = ("would add", "would mark") if dry_run else ("added", "marked")
    done = (
        "each gets a job and is routed again after the quiet period"
        if route
        else f"{mark} evaluated: not processed or delivered again; --route routes them"
    )
    console.print(
        f"{report.files} instance files: {report.known} already known, {verb} {report.added} "
        f"in {len(report.series)} series ({done}), {len(report.unreadable)} not indexed, "
        f"{len(report.missing)} rows without a file {mark} purged",
        highlight=False,
    )
    for relative in report.missing[:_LISTED]:
        console.print(f"  file missing, row {mark} purged: {escape(relative)}", highlight=False)
    if len(report.missing) > _LISTED:
        console.print(f"  and {len(report.missing) - _LISTED} more rows without a file", highlight=False)
    for relative, reason in report.unreadable:
        where = "left in place (dry run)" if dry_run else f"moved to {UNINDEXED_DIR}/"
        console.print(f"  not indexed, {where}: {escape(relative)}: {escape(reason)}", highlight=False)
    restored = ", ".join(str(job_id) for job_id in report.jobs_restored) or "none"
    console.print(
        f"{report.output_files} output files: {report.outputs_known} already known, {verb} {report.outputs_added} "
        f"in {len(report.output_series)} output series (the next re-run continues their revisions), "
        f"jobs {'to recreate' if dry_run else 'recreated'} for them: {restored}, "
        f"{len(report.outputs_skipped)} not indexed",
        highlight=False,
    )
    for relative, reason in report.outputs_skipped:
        console.print(f"  output not indexed, left in place: {escape(relative)}: {escape(reason)}", highlight=False)
    if report.store_id is not None:
        console.print(f"job store bound to this data directory (store id {report.store_id})", highlight=False)
    if report.unreadable or report.outputs_skipped:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
