"""Held messages can be re-driven: `processing_errors` records when and how an error was resolved (a re-drive after a
sender policy change processed the message). Stored messages are untouched; existing errors stay open.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade():
    op.add_column('processing_errors', sa.Column('resolved_at', TS, nullable=True))
    op.add_column('processing_errors', sa.Column('resolution', sa.Text, nullable=True))


def downgrade():
    with op.batch_alter_table('processing_errors') as t:
        t.drop_column('resolution')
        t.drop_column('resolved_at')
