"""Engine and session factory for the job store.

Decision: SQLite in WAL mode with `synchronous=FULL` by default, because a
C-STORE success is only returned after the instance row is committed, and a
committed row must survive a power cut. A busy timeout lets the SCP threads,
the watcher and the workers share one file. Any other SQLAlchemy URL
(PostgreSQL for several hosts) is used as given. The schema is versioned with
Alembic (`storage.schema`): an empty database gets the current schema, one at
another revision is refused until `dicom-node db upgrade` has run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.schema import ensure_current


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`; for SQLite the parent folder is created and WAL enabled."""
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


class Database:
    """The job store: an engine plus a session factory."""

    def __init__(self, url: str) -> None:
        """Open the job store at `url`; raises `storage.schema.SchemaError` for a stale schema."""
        self.url = url
        self.engine = make_engine(url)
        try:
            ensure_current(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on any error."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @property
    def url_for_humans(self) -> str:
        """The URL with any password masked, for messages and logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()
