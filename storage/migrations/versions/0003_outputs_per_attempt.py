"""Re-runs: the outputs each attempt wrote, and the attempt of each export row.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ATTEMPT_IN_PATH = re.compile(r"/attempt-(\d+)/")


def upgrade() -> None:
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=400), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outputs_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_outputs_series_uid"), ["series_uid"], unique=False)

    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="1", nullable=False))

    # Rows written before this revision: their attempt is in their path (outputs/job-<id>/attempt-<n>/...).
    connection = op.get_bind()
    exports = sa.table("exports", sa.column("id", sa.Integer()), sa.column("path"), sa.column("attempt"))
    for export_id, path in connection.execute(sa.select(exports.c.id, exports.c.path)).all():
        found = _ATTEMPT_IN_PATH.search(path or "")
        if found and int(found.group(1)) != 1:
            connection.execute(sa.update(exports).where(exports.c.id == export_id).values(attempt=int(found.group(1))))


def downgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_column("attempt")

    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outputs_series_uid"))
        batch_op.drop_index(batch_op.f("ix_outputs_job_id"))

    op.drop_table("outputs")
