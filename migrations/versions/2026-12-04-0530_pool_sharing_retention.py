"""shared pool: team weights, running caps, storage quotas and claim turns; job tombstones; artifact availability

Revision ID: 8c1f4e2d7a90
Revises: 5b7e2c9a1f03
Create Date: 2026-12-04 05:30:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "8c1f4e2d7a90"
down_revision: Union[str, Sequence[str], None] = "5b7e2c9a1f03"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("storage_quota_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("last_claim_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("unavailable", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("unavailable")
        batch.drop_column("verified_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deleted_at")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("last_claim_at")
        batch.drop_column("storage_quota_bytes")
        batch.drop_column("max_running")
        batch.drop_column("weight")
