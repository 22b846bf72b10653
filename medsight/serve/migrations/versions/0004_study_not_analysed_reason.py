"""studies.not_analysed_reason: why no model was run on a stored study (status "not_analysed").

A plain ADD COLUMN (no batch table copy), so SQLite keeps its triggers.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('studies', sa.Column('not_analysed_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies') as batch:
        batch.drop_column('not_analysed_reason')
