"""What several commands share: loading the configuration with a one-line error."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.settings import ConfigError, Settings, load_settings
from storage.database import Database, JobStoreUnreachable
from storage.schema import SchemaError

err_console = Console(stderr=True, soft_wrap=True)

ConfigOption = typer.Option(
    None, "--config", "-c", help="Configuration TOML (default: $DICOM_NODE_CONFIG, else built-in defaults)."
)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear red line and return the Exit to raise (never a traceback). `message` is plain text:
    brackets in it (`[worker] device`) are printed, not read as Rich markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def job_store_or_exit(settings: Settings) -> Database:
    """The configured job store, or one clear line (stale schema, unreachable server)."""
    try:
        return Database(settings.storage.resolved_database_url)
    except (SchemaError, JobStoreUnreachable) as exc:
        raise fail(str(exc)) from None
    except SQLAlchemyError as exc:
        raise fail(f"cannot open the job store: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None


def settings_or_exit(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
