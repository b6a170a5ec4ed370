"""A run's owner is a host and a process with a heartbeat, not a pid alone: drivers on several
machines share one store (PostgreSQL), and a pid means something only on its own host.

`owner_host`: where the run's driver runs; `heartbeat_at`: when it last said it is alive (every
few seconds while the run is running). Both are NULL on runs recorded before this revision: those
are judged as before (by their pid, on this host).

Revision ID: 0003_run_owner
Revises: 0002_prediction_inputs_u8
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_run_owner"
down_revision: str | None = "0002_prediction_inputs_u8"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workflow_runs", sa.Column("owner_host", sa.String(length=255), nullable=True))
    op.add_column("workflow_runs", sa.Column("heartbeat_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflow_runs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner_host")
