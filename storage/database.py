"""Engine and session factory for the job store.

Decision: SQLite in WAL mode with `synchronous=FULL` by default, because a
C-STORE success is only returned after the instance row is committed, and a
committed row must survive a power cut. A busy timeout lets the SCP threads,
the watcher and the workers share one file. Any other SQLAlchemy URL
(PostgreSQL for several hosts) is used as given. The schema is versioned with
Alembic (`storage.schema`): an empty database gets the current schema, one at
another revision is refused until `dicom-node db upgrade` has run.

A job store that cannot be reached when it is opened raises
`JobStoreUnreachable`, one line naming the URL with its password masked (what
`serve` and `worker` print before refusing to start). PostgreSQL connections
give up after `PG_CONNECT_TIMEOUT_S` (not the kernel's minutes-long TCP
timeout for a host that does not answer) and carry `application_name`
`dicom-node <host>:<pid>`, so `pg_stat_activity` shows which process of which
host holds each connection (and each open transaction).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, CursorResult, Engine, create_engine, event, make_url
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from storage.schema import ensure_current

PG_CONNECT_TIMEOUT_S = 10


class JobStoreUnreachable(Exception):
    """The job store did not accept a connection; the message names the URL (password masked) and why."""


def application_name(pid: int | None = None) -> str:
    """`dicom-node <host>:<pid>` of this process (or of `pid` on this host), as PostgreSQL's
    `pg_stat_activity` shows its connections; at most 63 bytes, PostgreSQL's limit."""
    suffix = f":{os.getpid() if pid is None else pid}"
    return f"dicom-node {socket.gethostname()}"[: 63 - len(suffix)] + suffix


def masked(url: str) -> str:
    """`url` with any password masked, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


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
    elif make_url(url).get_backend_name() == "postgresql":
        query = make_url(url).query
        connect_args: dict[str, object] = {}
        if "connect_timeout" not in query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        if "application_name" not in query:
            connect_args["application_name"] = application_name()
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def _reachable(engine: Engine, url: str) -> None:
    """Connect once; a refusal becomes `JobStoreUnreachable` with the driver's reason on one line."""
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        reason = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
        raise JobStoreUnreachable(f"cannot reach the job store {masked(url)}: {reason}") from exc


class DriverStatement:
    """A Core statement compiled once for one dialect, run with `Connection.exec_driver_sql`.

    Why (issue #18): `Connection.execute` of a Core statement costs about 0.1 ms
    of Python per call (cache key, compiled-cache lookup, parameter setup), and
    the receive runs its statements once per instance. The SQL is still
    SQLAlchemy's, for the connection's dialect and paramstyle, values still
    pass the column types' bind processors, and database errors still come
    back as SQLAlchemy's exceptions (a lost connection invalidated). Every
    parameter is a named `bindparam` filled in from `values`: a statement with
    a bound constant (write `literal_column("1")`, not `+ 1`) or an expanding
    parameter is refused here, not at its first use. Unlike Core, a result
    is not buffered: read a RETURNING statement's rows before the commit.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))  # a DML or SELECT statement's
        unfilled = [
            name for name, bind in compiled.binds.items() if not bind.required or bind.expanding or bind.literal_execute
        ]
        if unfilled or compiled.escaped_bind_names:
            raise ValueError(f"not a statement of named parameters only: {unfilled or compiled.escaped_bind_names}")
        self.sql = compiled.string
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def execute(self, connection: Connection, values: Mapping[str, Any]) -> CursorResult[Any]:
        """Run with `values` by parameter name (one the SQL needs is missing: KeyError for a
        positional paramstyle, the driver's error as SQLAlchemy's for a named one)."""
        processed = {
            name: processor(value) if (processor := self._processors.get(name)) else value
            for name, value in values.items()
        }
        if self._order is None:
            return connection.exec_driver_sql(self.sql, processed)
        return connection.exec_driver_sql(self.sql, tuple(processed[name] for name in self._order))


class Database:
    """The job store: an engine plus a session factory."""

    def __init__(self, url: str) -> None:
        """Open the job store at `url`; raises `JobStoreUnreachable` when it does not accept a connection,
        `storage.schema.SchemaError` for a stale schema."""
        self.url = url
        self.engine = make_engine(url)
        try:
            _reachable(self.engine, url)
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
        return masked(self.url)

    def dispose(self) -> None:
        self.engine.dispose()
