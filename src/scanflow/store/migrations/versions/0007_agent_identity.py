"""Who an agent acts as, on its decisions and messages; and each message's signature.

An agent acts with a token of its own team (`scanflow.agents.credentials`): its decisions and
the messages it sends record that identity (`by`, e.g. `agent:dataengineer.executor`). Messages
between agents carry an HMAC of what they say (`scanflow.store.signing`), so that a row written
by anyone holding only the database, not the installation's message key, is rejected.

Revision ID: 0007_agent_identity
Revises: 0006_identity
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_agent_identity"
down_revision: str | None = "0006_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("signature", sa.String(100), nullable=True))
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("by", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("by")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("signature")
        batch.drop_column("by")
