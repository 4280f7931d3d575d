"""Impact evaluation: registered analysis plans and their amendments, both append-only. A plan is stored once, as the
canonical JSON of its file with that JSON's sha256; a deviation is a new amendment row (its changes, the reason and a
hash chained to the plan's or the previous amendment's), never an edit.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
APPEND_ONLY = ('analysis_plans', 'plan_amendments')


def _append_only(table):
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                   "FOR EACH ROW EXECUTE FUNCTION cde_append_only()")
    else:
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END")


def _drop_append_only(table):
    if op.get_bind().dialect.name == 'postgresql': op.execute(f'DROP TRIGGER {table}_append_only ON {table}')
    else: op.execute(f'DROP TRIGGER {table}_no_update'); op.execute(f'DROP TRIGGER {table}_no_delete')


def upgrade():
    op.create_table('analysis_plans',
        sa.Column('name', sa.String(64), primary_key=True),
        sa.Column('design', sa.String(32), nullable=False),
        sa.Column('content', sa.Text, nullable=False),
        sa.Column('sha256', sa.String(64), nullable=False),
        sa.Column('registered_at', TS, nullable=False),
        sa.Column('registered_by', sa.String(64), nullable=False))
    op.create_table('plan_amendments',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('plan', sa.String(64), sa.ForeignKey('analysis_plans.name'), nullable=False),
        sa.Column('seq', sa.Integer, nullable=False),
        sa.Column('changes', sa.Text, nullable=False),
        sa.Column('reason', sa.Text, nullable=False),
        sa.Column('prev_sha256', sa.String(64), nullable=False),
        sa.Column('sha256', sa.String(64), nullable=False),
        sa.Column('registered_at', TS, nullable=False),
        sa.Column('registered_by', sa.String(64), nullable=False),
        sa.UniqueConstraint('plan', 'seq', name='uq_plan_amendment_seq'))
    for t in APPEND_ONLY: _append_only(t)


def downgrade():
    for t in reversed(APPEND_ONLY):
        _drop_append_only(t)
        op.drop_table(t)
