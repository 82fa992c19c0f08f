"""dashboard sessions: the sign-in cookie holds an opaque token (its sha256 stored here), not the API key; succeeded
jobs end in stage "done"

Revision ID: d24da5b00001
Revises: b24da7a00001
Create Date: 2026-12-06 02:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "d24da5b00001"
down_revision: Union[str, Sequence[str], None] = "b24da7a00001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("team_id", sa.String(length=32), nullable=False),
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name=op.f("fk_dashboard_sessions_team_id_teams"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name=op.f("fk_dashboard_sessions_api_key_id_api_keys"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dashboard_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_dashboard_sessions_token_hash")),
    )
    op.create_index(op.f("ix_dashboard_sessions_team_id"), "dashboard_sessions", ["team_id"], unique=False)
    op.create_index(op.f("ix_dashboard_sessions_api_key_id"), "dashboard_sessions", ["api_key_id"], unique=False)
    op.create_index(op.f("ix_dashboard_sessions_expires_at"), "dashboard_sessions", ["expires_at"], unique=False)
    op.execute("UPDATE jobs SET stage = 'done' WHERE status = 'succeeded'")


def downgrade() -> None:
    op.drop_table("dashboard_sessions")
