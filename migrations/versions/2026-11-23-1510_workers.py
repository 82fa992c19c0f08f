"""workers: presence of worker processes (queue view, heartbeats)

Revision ID: d22b0c5d4f2c
Revises: 8e082941b667
Create Date: 2026-11-23 15:00:50

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "d22b0c5d4f2c"
down_revision: Union[str, Sequence[str], None] = "8e082941b667"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("gpu_classes", sa.JSON(), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("current_job_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
