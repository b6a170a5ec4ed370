"""Teams, users, their roles per team, read grants between teams, and hashed API tokens: the
identities the control-plane server, the model servers' `/labels` and the agents' API check;
and the applications registered with the server: one spec per (application, team), as the
MNIST case study's three teams each declare their part of app `mnist`.

Revision ID: 0006_identity
Revises: 0005_deployment_config
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_identity"
down_revision: str | None = "0005_deployment_config"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column("user", sa.String(200), sa.ForeignKey("users.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("team", sa.String(200), sa.ForeignKey("teams.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("role", sa.String(20), nullable=False),
    )
    op.create_table(
        "team_grants",
        sa.Column("team", sa.String(200), sa.ForeignKey("teams.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("grantee", sa.String(200), sa.ForeignKey("teams.name", ondelete="CASCADE"),
                  primary_key=True),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(200), sa.ForeignKey("users.name", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("last_used_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_tokens_user", "tokens", ["user"])
    op.create_table(
        "applications",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("team", sa.String(200), primary_key=True),
        sa.Column("spec_path", sa.Text(), nullable=False),
        sa.Column("registered_by", sa.String(200), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("applications")
    op.drop_index("ix_tokens_user", table_name="tokens")
    for table in ("tokens", "team_grants", "memberships", "users", "teams"):
        op.drop_table(table)
