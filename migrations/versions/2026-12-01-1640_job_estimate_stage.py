"""jobs: resource estimate stored at submit, and the stage a running job is in (cancel answers 409 once publishing)

Revision ID: 5b7e2c9a1f03
Revises: d22b0c5d4f2c
Create Date: 2026-12-01 16:40:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "5b7e2c9a1f03"
down_revision: Union[str, Sequence[str], None] = "d22b0c5d4f2c"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("estimate", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("stage", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stage")
        batch.drop_column("estimate")
