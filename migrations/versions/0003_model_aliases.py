"""Model registry: aliases (champion, challenger) as an append-only history, and registered model
versions made immutable in the database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
APPEND_ONLY = ('models', 'model_aliases')


def _append_only(table):
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                   "FOR EACH ROW EXECUTE FUNCTION cde_append_only()")
    else:
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END")


def upgrade():
    # an alias moves by appending a row; the newest row per (name, alias) is current; model_id NULL clears it
    op.create_table('model_aliases',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('alias', sa.String(32), nullable=False),
        sa.Column('model_id', sa.Integer, sa.ForeignKey('models.model_id'), nullable=True),
        sa.Column('set_at', TS, nullable=False),
        sa.Column('actor', sa.String(64), nullable=False),
        sa.Column('reason', sa.Text, nullable=False))
    op.create_index('ix_model_aliases_name_alias', 'model_aliases', ['name', 'alias', 'id'])
    for t in APPEND_ONLY: _append_only(t)


def downgrade():
    for t in APPEND_ONLY:
        if op.get_bind().dialect.name == 'postgresql':
            op.execute(f'DROP TRIGGER {t}_append_only ON {t}')
        else:
            op.execute(f'DROP TRIGGER {t}_no_update'); op.execute(f'DROP TRIGGER {t}_no_delete')
    op.drop_table('model_aliases')
