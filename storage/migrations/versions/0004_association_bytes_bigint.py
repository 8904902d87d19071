"""associations.bytes_received as a 64-bit integer: one association can carry more than 2 GiB.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.alter_column(
            "bytes_received", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.alter_column(
            "bytes_received", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False
        )
