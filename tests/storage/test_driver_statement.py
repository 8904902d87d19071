"""`storage.database.DriverStatement` on SQLite and PostgreSQL: SQLAlchemy's SQL and bind
processing, without `Connection.execute`'s per-call work."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import bindparam, select, update

from storage.database import Database, DriverStatement
from storage.models import Series, Study, utcnow

SERIES_TABLE = Series.__table__


def test_a_repeated_name_and_a_timestamp_go_through_the_column_types(job_store_url: str) -> None:
    """`now` appears twice (positional paramstyles list it twice). Timestamps pass the column
    type's processor, so one the ORM wrote compares equal to the same instant bound here (on
    SQLite both are text: the driver's own format would sort after it), and reads back equal."""
    db = Database(job_store_url)
    written = utcnow().replace(microsecond=123456)
    with db.session() as session:
        session.add(Series(series_uid="1.2.3.4", study=Study(study_uid="1.2.3"), last_received_at=written))
    now = bindparam("now", type_=SERIES_TABLE.c.last_received_at.type)
    statement = DriverStatement(
        update(SERIES_TABLE)
        .where(SERIES_TABLE.c.series_uid == bindparam("uid"), SERIES_TABLE.c.last_received_at < now)
        .values(last_received_at=now),
        db.engine.dialect,
    )
    later = written + timedelta(minutes=5)
    with db.engine.begin() as connection:
        assert statement.execute(connection, {"uid": "1.2.3.4", "now": written}).rowcount == 0  # not < itself
        assert statement.execute(connection, {"uid": "1.2.3.4", "now": later}).rowcount == 1
    with db.session() as session:
        assert session.scalar(select(Series.last_received_at)) == later
    db.dispose()


def test_a_bound_constant_is_refused_when_compiled_not_at_first_use(job_store_url: str) -> None:
    db = Database(job_store_url)
    with pytest.raises(ValueError, match="named parameters only"):
        DriverStatement(
            update(SERIES_TABLE)
            .where(SERIES_TABLE.c.series_uid == bindparam("uid"))
            .values(instance_count=SERIES_TABLE.c.instance_count + 1),  # 1 is bound, never filled in
            db.engine.dialect,
        )
    db.dispose()
