"""Jobs can be paused (and resumed), and their fine-tuned models deleted.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.add_column(sa.Column("pause_requested", sa.Boolean, nullable=False, server_default=sa.false()))
        table.add_column(sa.Column("model_deleted", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.drop_column("model_deleted")
        table.drop_column("pause_requested")
