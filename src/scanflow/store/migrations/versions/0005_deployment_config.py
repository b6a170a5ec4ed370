"""A deployment's whole service config in the store: on the ray backend a service's replicas run
on other machines and its deployer may run on any, so what it serves (versions, traffic split,
batching, limits) is kept where every machine reads it, not in a folder of one machine.

Revision ID: 0005_deployment_config
Revises: 0004_step_logs
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_deployment_config"
down_revision: str | None = "0004_step_logs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("config", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("config")
