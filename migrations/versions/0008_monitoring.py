"""Monitoring (issue 12): each monitoring run's figures, stored so that dashboards read them instead of recomputing them
from packets, and the alerts its rules raise. Results are append-only (a later run adds rows, never edits); an alert row
is updated while it is open (last seen, last value) and once when it is resolved, each change audited.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


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
    op.create_table('monitoring_results',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('run_id', sa.String(40), sa.ForeignKey('runs.run_id'), nullable=False),
        sa.Column('deployment', sa.String(64), nullable=False),
        sa.Column('computed_at', TS, nullable=False),
        sa.Column('as_of', TS, nullable=False),
        sa.Column('metric', sa.String(64), nullable=False),
        sa.Column('group_name', sa.String(32), nullable=False),
        sa.Column('group_value', sa.String(128), nullable=False),
        sa.Column('window_start', TS),
        sa.Column('window_end', TS),
        sa.Column('value', sa.Float),
        sa.Column('ci_low', sa.Float),
        sa.Column('ci_high', sa.Float),
        sa.Column('n', sa.Integer),
        sa.Column('detail', sa.Text, nullable=False))
    op.create_index('ix_monitoring_results_deployment_metric', 'monitoring_results', ['deployment', 'metric', 'window_end'])
    op.create_index('ix_monitoring_results_run_id', 'monitoring_results', ['run_id'])
    _append_only('monitoring_results')
    op.create_table('alerts',
        sa.Column('alert_id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('deployment', sa.String(64), nullable=False),
        sa.Column('rule', sa.Text, nullable=False),
        sa.Column('metric', sa.String(64), nullable=False),
        sa.Column('first_seen', TS, nullable=False),
        sa.Column('last_seen', TS, nullable=False),
        sa.Column('last_value', sa.Float),
        sa.Column('threshold', sa.Float, nullable=False),
        sa.Column('direction', sa.String(8), nullable=False),
        sa.Column('n', sa.Integer, nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('resolved_at', TS),
        sa.Column('resolved_by', sa.String(64)),
        sa.Column('resolution_reason', sa.Text))
    op.create_index('ix_alerts_deployment_status', 'alerts', ['deployment', 'status'])


def downgrade():
    op.drop_index('ix_alerts_deployment_status', 'alerts')
    op.drop_table('alerts')
    _drop_append_only('monitoring_results')
    op.drop_index('ix_monitoring_results_run_id', 'monitoring_results')
    op.drop_index('ix_monitoring_results_deployment_metric', 'monitoring_results')
    op.drop_table('monitoring_results')
