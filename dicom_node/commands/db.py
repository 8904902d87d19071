"""`dicom-node db current|upgrade`: the job store's schema revision (Alembic, see storage/schema.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from dicom_node.commands._common import ConfigOption, fail, settings_or_exit

db_app = typer.Typer(help="The job store's schema: show its revision, upgrade it.", no_args_is_help=True)


@db_app.command("current")
def current(config: Path | None = ConfigOption) -> None:
    """Print the database's revision and the one this release needs (exit 1 when they differ)."""
    from storage.database import make_engine
    from storage.schema import current_revision, head_revision

    engine = make_engine(settings_or_exit(config).storage.resolved_database_url)
    try:
        revision, head = current_revision(engine), head_revision()
    except Exception as exc:
        raise fail(f"cannot read the job store: {exc}") from None
    finally:
        engine.dispose()
    Console().print(f"database: {revision or 'none (empty, or a release before migrations)'}  needed: {head}")
    if revision != head:
        raise typer.Exit(1)


@db_app.command("upgrade")
def upgrade(config: Path | None = ConfigOption) -> None:
    """Upgrade the job store to this release's schema (back it up first: pg_dump, or copy the SQLite file)."""
    from storage.database import make_engine
    from storage.schema import upgrade as upgrade_schema

    engine = make_engine(settings_or_exit(config).storage.resolved_database_url)
    try:
        before, after = upgrade_schema(engine)
    except Exception as exc:
        raise fail(f"upgrade failed, nothing was changed past the last completed revision: {exc}") from None
    finally:
        engine.dispose()
    Console().print(f"job store upgraded: {before or 'none'} -> {after}")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
