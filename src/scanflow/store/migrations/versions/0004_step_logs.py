"""Ended attempts' logs in the store: a step that ran on a Ray node leaves its log where every
machine can read it, written by the driver in batches (one MLflow upload per attempt cost more
than the step itself).

Revision ID: 0004_step_logs
Revises: 0003_run_owner
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_step_logs"
down_revision: str | None = "0003_run_owner"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_logs",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "step", "attempt"),
    )


def downgrade() -> None:
    op.drop_table("step_logs")
