"""audit events record their hash scheme: NULL for the plain SHA-256 chain, 'hmac-sha256' for the keyed one.

Existing events stay as they are (NULL) and still verify; the key file created on the
next start records the last of them (docs/security.md, "Audit").
Added with a plain ADD COLUMN, not a batch table copy, so SQLite keeps the append-only triggers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('audit_events', sa.Column('scheme', sa.String(length=16), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE audit_events DROP COLUMN scheme")
    else:
        op.drop_column('audit_events', 'scheme')
