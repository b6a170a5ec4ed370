"""Predictions keep an exact uint8 copy of inputs that are integers in 0..255 (`inputs_u8`).

Why: an image classifier's inputs are pixels; as float32 they cost 4x the bytes in the journal,
the store and its write-ahead log at the request rate. Rows written before keep `inputs_f32`.

Revision ID: 0002_prediction_inputs_u8
Revises: 0001_baseline
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_prediction_inputs_u8"
down_revision: str | None = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("inputs_u8", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("inputs_u8")
