"""Leases, associations, source addresses, Storage Commitment and the store id (release of 2026-12-01).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=True),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("called_ae_title", sa.String(length=16), nullable=True),
        sa.Column("address", sa.String(length=45), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("instances_stored", sa.Integer(), nullable=False),
        sa.Column("instances_duplicate", sa.Integer(), nullable=False),
        sa.Column("instances_conflict", sa.Integer(), nullable=False),
        sa.Column("instances_refused", sa.Integer(), nullable=False),
        sa.Column("bytes_received", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_associations_calling_ae_title"), ["calling_ae_title"], unique=False)
        batch_op.create_index(batch_op.f("ix_associations_started_at"), ["started_at"], unique=False)

    op.create_table(
        "heartbeats",
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("host"),
    )
    op.create_table(
        "node_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=400), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("transaction_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("commit_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_exports_transaction_uid"), ["transaction_uid"], unique=False)

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_address", sa.String(length=45), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_lease_expires_at"), ["lease_expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_lease_expires_at"))
        batch_op.drop_column("lease_expires_at")

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("source_address")

    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_exports_transaction_uid"))
        batch_op.drop_column("commit_requested_at")
        batch_op.drop_column("transaction_uid")

    op.drop_table("node_meta")
    op.drop_table("heartbeats")
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_associations_started_at"))
        batch_op.drop_index(batch_op.f("ix_associations_calling_ae_title"))

    op.drop_table("associations")
