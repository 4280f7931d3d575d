"""Going live: packets record trigger, request id, decision, shown, arm and probability, latency, model sha256 and the
features used; the order trigger's queue; the write-back ledger; CDS Hooks token ids seen; randomised allocations; the
scheduler's locks, due times and run fields; the deployment history; and the audit log's hash chain (existing rows are
chained in id order).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""
import json

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
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
    for c in (sa.Column('trigger', sa.String(16), nullable=False, server_default='batch'), sa.Column('request_id', sa.String(128)),
              sa.Column('encounter_id', sa.String(32)), sa.Column('decision', sa.Boolean), sa.Column('shown', sa.Boolean),
              sa.Column('arm', sa.String(16)), sa.Column('probability', sa.Float), sa.Column('latency_ms', sa.Float),
              sa.Column('model_sha256', sa.String(64)), sa.Column('features', sa.Text)):
        op.add_column('inferences', c)
    op.create_index('uq_inference_request', 'inferences', ['deployment', 'request_id'], unique=True)
    op.create_table('score_queue',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('deployment', sa.String(64), nullable=False),
        sa.Column('order_id', sa.String(32), nullable=False),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('encounter_id', sa.String(32)),
        sa.Column('order_time', TS, nullable=False),
        sa.Column('enqueued_at', TS, nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('attempts', sa.Integer, nullable=False, server_default='0'),
        sa.Column('claimed_at', TS),
        sa.Column('finished_at', TS),
        sa.Column('inference_id', sa.Integer, sa.ForeignKey('inferences.inference_id')),
        sa.Column('error', sa.Text),
        sa.UniqueConstraint('deployment', 'order_id', name='uq_score_queue_order'))
    op.create_index('ix_score_queue_status', 'score_queue', ['status', 'id'])
    op.create_table('outbound_messages',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('deployment', sa.String(64), nullable=False),
        sa.Column('inference_id', sa.Integer, sa.ForeignKey('inferences.inference_id'), nullable=False),
        sa.Column('destination', sa.String(128), nullable=False),
        sa.Column('control_id', sa.String(64), nullable=False, unique=True),
        sa.Column('message', sa.Text, nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('attempts', sa.Integer, nullable=False, server_default='0'),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('last_attempt_at', TS),
        sa.Column('sent_at', TS),
        sa.Column('ack_code', sa.String(4)),
        sa.Column('last_error', sa.Text),
        sa.UniqueConstraint('inference_id', 'destination', name='uq_outbound_inference'))
    op.create_table('token_uses',
        sa.Column('issuer', sa.String(255), primary_key=True),
        sa.Column('jti', sa.String(255), primary_key=True),
        sa.Column('expires_at', TS, nullable=False),
        sa.Column('seen_at', TS, nullable=False))
    op.create_index('ix_token_uses_expires_at', 'token_uses', ['expires_at'])
    op.create_table('allocations',
        sa.Column('deployment', sa.String(64), primary_key=True),
        sa.Column('unit_id', sa.String(64), primary_key=True),
        sa.Column('stratum', sa.String(64), nullable=False),
        sa.Column('arm', sa.String(16), nullable=False),
        sa.Column('probability', sa.Float, nullable=False),
        sa.Column('sequence', sa.Integer, nullable=False),
        sa.Column('allocated_at', TS, nullable=False))
    op.create_table('run_locks',
        sa.Column('deployment', sa.String(64), primary_key=True),
        sa.Column('run_id', sa.String(40), nullable=False),
        sa.Column('acquired_at', TS, nullable=False),
        sa.Column('heartbeat_at', TS, nullable=False),
        sa.Column('pid', sa.Integer, nullable=False),
        sa.Column('host', sa.String(255), nullable=False))
    op.create_table('schedule_state',
        sa.Column('deployment', sa.String(64), primary_key=True),
        sa.Column('kind', sa.String(16), primary_key=True),
        sa.Column('last_due', TS, nullable=False),
        sa.Column('updated_at', TS, nullable=False))
    for c in (sa.Column('scheduled_for', TS), sa.Column('started_by', sa.String(16)), sa.Column('heartbeat_at', TS),
              sa.Column('pid', sa.Integer), sa.Column('host', sa.String(255)), sa.Column('timeout_seconds', sa.Float),
              sa.Column('error_name', sa.String(128)), sa.Column('error_value', sa.Text), sa.Column('error_cell', sa.Integer)):
        op.add_column('runs', c)
    op.create_table('deployment_history',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('model_id', sa.Integer, sa.ForeignKey('models.model_id')),
        sa.Column('at', TS, nullable=False),
        sa.Column('actor', sa.String(64), nullable=False),
        sa.Column('reason', sa.Text, nullable=False),
        sa.Column('gates', sa.Text))
    op.create_index('ix_deployment_history_name', 'deployment_history', ['name'])
    _append_only('deployment_history')
    # the audit chain: existing rows are chained in id order (triggers lifted for this one backfill), then the end is recorded
    op.add_column('audit_log', sa.Column('prev_hash', sa.String(64)))
    op.add_column('audit_log', sa.Column('hash', sa.String(64)))
    op.create_table('audit_head',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=False),
        sa.Column('last_id', sa.Integer, nullable=False),
        sa.Column('last_hash', sa.String(64), nullable=False))
    from cde_workbench.store import AUDIT_GENESIS, audit_log, audit_row_hash
    bind = op.get_bind()
    prev, last_id = AUDIT_GENESIS, 0
    rows = bind.execute(sa.select(audit_log.c.id, audit_log.c.at, audit_log.c.actor, audit_log.c.action, audit_log.c.target,
                                  audit_log.c.detail).order_by(audit_log.c.id)).all()
    if rows:
        _drop_append_only('audit_log')
        for r in rows:
            h = audit_row_hash(prev, r.at, r.actor, r.action, r.target, r.detail)
            bind.execute(sa.text('UPDATE audit_log SET prev_hash = :p, hash = :h WHERE id = :i'), {'p': prev, 'h': h, 'i': r.id})
            prev, last_id = h, r.id
        _append_only('audit_log')
    bind.execute(sa.text('INSERT INTO audit_head (id, last_id, last_hash) VALUES (1, :i, :h)'), {'i': last_id, 'h': prev})


def downgrade():
    op.drop_table('audit_head')
    _drop_append_only('audit_log')
    with op.batch_alter_table('audit_log') as t:
        t.drop_column('hash'); t.drop_column('prev_hash')
    _append_only('audit_log')
    _drop_append_only('deployment_history')
    op.drop_table('deployment_history')
    with op.batch_alter_table('runs') as t:
        for c in ('scheduled_for', 'started_by', 'heartbeat_at', 'pid', 'host', 'timeout_seconds', 'error_name', 'error_value', 'error_cell'):
            t.drop_column(c)
    for t in ('schedule_state', 'run_locks', 'allocations', 'token_uses', 'outbound_messages', 'score_queue'): op.drop_table(t)
    op.drop_index('uq_inference_request', 'inferences')
    with op.batch_alter_table('inferences') as t:
        for c in ('trigger', 'request_id', 'encounter_id', 'decision', 'shown', 'arm', 'probability', 'latency_ms', 'model_sha256', 'features'):
            t.drop_column(c)
