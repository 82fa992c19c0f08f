"""per-team submission limits (queued jobs, submissions a minute) and the storage a job reserves at submit

Revision ID: b24da7a00001
Revises: 8c1f4e2d7a90
Create Date: 2026-12-06 02:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "b24da7a00001"
down_revision: Union[str, Sequence[str], None] = "8c1f4e2d7a90"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("max_queued", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_submissions_per_minute", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("reserved_bytes", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reserved_bytes")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("max_submissions_per_minute")
        batch.drop_column("max_queued")
