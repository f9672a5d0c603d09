"""Servers sharing one store claim jobs: the claimant and its heartbeat.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.add_column(sa.Column("claimed_by", sa.String(300), nullable=True))
        table.add_column(sa.Column("heartbeat", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.drop_column("heartbeat")
        table.drop_column("claimed_by")
