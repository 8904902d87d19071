"""The job store's schema version: Alembic migrations, and the start-up check that refuses a stale one.

Decisions:
- A new, empty database gets the current schema at once (`create_all`, then
  stamped with the head revision): the embedded default needs no extra step.
- A database at an older revision, or one made by a release before migrations
  existed (tables but no `alembic_version`), is refused at start-up with one
  line that says to run `dicom-node db upgrade` (after a backup). Upgrading is
  never implicit: on a shared PostgreSQL several hosts start at once, and a
  department decides when its schema changes.
- Revision 0001 is the schema of the last release before migrations; a
  database from that release is recognised and `db upgrade` stamps it 0001
  before upgrading.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect

from storage.models import Base

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
PRE_MIGRATION_REVISION = "0001"


class SchemaError(Exception):
    """The database's schema is not the one this release needs; the message says what to do."""


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None, "storage/migrations has no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None for an empty database or one from before migrations."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _has_tables(engine: Engine) -> bool:
    names = set(inspect(engine).get_table_names())
    return bool(names & set(Base.metadata.tables))


def ensure_current(engine: Engine) -> None:
    """Create the schema in an empty database; refuse one at another revision (see module doc)."""
    revision = current_revision(engine)
    if revision is None and not _has_tables(engine):
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            command.stamp(_config(connection), "head")
        return
    head = head_revision()
    if revision != head:
        found = revision or "a release before migrations"
        raise SchemaError(
            f"the job store's schema is at {found}, this release needs {head}: "
            f"back it up, then run 'dicom-node db upgrade'"
        )


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Upgrade the database to the head revision; returns (from, to)."""
    before = current_revision(engine)
    with engine.begin() as connection:
        config = _config(connection)
        if before is None and _has_tables(engine):
            command.stamp(config, PRE_MIGRATION_REVISION)
        elif before is None:
            Base.metadata.create_all(connection)
            command.stamp(config, "head")
            return None, head_revision()
        command.upgrade(config, "head")
    return before, head_revision()
