"""Jobs no longer record the last step made an event: event ids are derived from the step (queue.event_id),
which is what keeps a restart from doubling them.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.drop_column("events_step")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.add_column(sa.Column("events_step", sa.Integer, nullable=False, server_default="0"))
