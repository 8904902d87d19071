"""At most one `received` job per series: a partial unique index on jobs(series_id) WHERE state = 'received'.

Two first instances of a new delivery of one series, stored at once over two
associations, could each open a `received` job (check, then insert). The index
makes the second insert fail; the receive path then retries and joins the
first job's delivery.

A database written before this revision may already hold such duplicates. The
index cannot be created over them, so they are settled first, per series: the
oldest `received` job (lowest id, the one whose "receiving instances" event
came first) stays the open delivery; each later one is set `cancelled`
(reason and event: a duplicate of job N, cancelled by this migration), with
its events kept. Nothing is lost: the instances belong to the series, not to a
job, and the job that stays counts them when the series is routed. A cancelled
duplicate is never run unless a person queues it with `jobs retry`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEX = "uq_jobs_received_series"
# The job state enum is stored by name (SQLAlchemy's default for a non-native Enum).
RECEIVED, CANCELLED = "RECEIVED", "CANCELLED"

_jobs = sa.table(
    "jobs",
    sa.column("id", sa.Integer()),
    sa.column("series_id", sa.Integer()),
    sa.column("state", sa.String()),
    sa.column("reason", sa.Text()),
    sa.column("updated_at", sa.DateTime(timezone=True)),
    sa.column("finished_at", sa.DateTime(timezone=True)),
)
_events = sa.table(
    "job_events",
    sa.column("job_id", sa.Integer()),
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("kind", sa.String()),
    sa.column("state", sa.String()),
    sa.column("message", sa.Text()),
)


def upgrade() -> None:
    connection = op.get_bind()
    received = connection.execute(
        sa.select(_jobs.c.id, _jobs.c.series_id).where(_jobs.c.state == RECEIVED).order_by(_jobs.c.id)
    ).all()
    kept: dict[int, int] = {}
    now = datetime.now(UTC)
    for job_id, series_id in received:
        if series_id not in kept:
            kept[series_id] = job_id
            continue
        reason = f"cancelled: a duplicate received job of its series; job {kept[series_id]} is its delivery"
        connection.execute(
            sa.update(_jobs)
            .where(_jobs.c.id == job_id)
            .values(state=CANCELLED, reason=reason, updated_at=now, finished_at=now)
        )
        connection.execute(
            sa.insert(_events).values(
                job_id=job_id,
                at=now,
                kind="STATE",
                state=CANCELLED,
                message=f"{reason} (schema revision 0005: one received job per series)",
            )
        )
    op.create_index(
        INDEX,
        "jobs",
        ["series_id"],
        unique=True,
        sqlite_where=sa.text(f"state = '{RECEIVED}'"),
        postgresql_where=sa.text(f"state = '{RECEIVED}'"),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="jobs")
