"""Immutable data store (raw messages, receipts, dead letters), event-processor state, patient merges,
encounters and location visits, lab order events and result versions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
APPEND_ONLY = ('ids_messages', 'ids_receipts', 'ids_dead_letters')


def _facts():
    return [sa.Column('event_time', TS, nullable=False), sa.Column('stored_time', TS, nullable=False),
            sa.Column('source', sa.String(32), nullable=False)]


def _append_only(table):
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                   "FOR EACH ROW EXECUTE FUNCTION cde_append_only()")
    else:
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END")


def upgrade():
    pg = op.get_bind().dialect.name == 'postgresql'
    op.create_table('ids_messages',
        sa.Column('seq', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('received_time', TS, nullable=False),
        sa.Column('connection', sa.String(128), nullable=False),
        sa.Column('sending_app', sa.String(64), nullable=False),
        sa.Column('sending_facility', sa.String(64), nullable=False),
        sa.Column('message_type', sa.String(16), nullable=False),
        sa.Column('control_id', sa.String(64), nullable=False),
        sa.Column('sha256', sa.String(64), nullable=False),
        sa.Column('conflict', sa.Boolean, nullable=False),
        sa.Column('raw', sa.LargeBinary, nullable=False),
        sa.UniqueConstraint('sending_app', 'sending_facility', 'control_id', 'sha256', name='uq_ids_message'))
    op.create_index('ix_ids_messages_control', 'ids_messages', ['control_id'])
    op.create_table('ids_receipts',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('seq', sa.Integer, sa.ForeignKey('ids_messages.seq'), nullable=False),
        sa.Column('received_time', TS, nullable=False),
        sa.Column('connection', sa.String(128), nullable=False))
    op.create_index('ix_ids_receipts_seq', 'ids_receipts', ['seq'])
    op.create_table('ids_dead_letters',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('received_time', TS, nullable=False),
        sa.Column('connection', sa.String(128), nullable=False),
        sa.Column('sha256', sa.String(64), nullable=False),
        sa.Column('reason', sa.Text, nullable=False),
        sa.Column('raw', sa.LargeBinary, nullable=False))
    # carry the walking skeleton's raw feed over, then retire its table
    raw = "convert_to(raw, 'UTF8')" if pg else 'CAST(raw AS BLOB)'
    op.execute("INSERT INTO ids_messages (seq, received_time, connection, sending_app, sending_facility, message_type, control_id, "
               f"sha256, conflict, raw) SELECT seq, received_time, 'migrated', COALESCE(sending_app, ''), COALESCE(sending_facility, ''), "
               f"message_type, control_id, sha256, {'false' if pg else '0'}, {raw} FROM hl7_messages")
    op.execute("INSERT INTO ids_receipts (seq, received_time, connection) SELECT seq, received_time, 'migrated' FROM hl7_messages")
    if pg:
        op.execute('DROP TRIGGER hl7_messages_append_only ON hl7_messages')
        op.execute("SELECT setval(pg_get_serial_sequence('ids_messages', 'seq'), COALESCE((SELECT max(seq) FROM ids_messages), 0) + 1, false)")
    else:
        op.execute('DROP TRIGGER hl7_messages_no_update'); op.execute('DROP TRIGGER hl7_messages_no_delete')
    op.drop_table('hl7_messages')
    for t in APPEND_ONLY: _append_only(t)
    op.create_table('processor_state',
        sa.Column('name', sa.String(32), primary_key=True),
        sa.Column('last_seq', sa.Integer, nullable=False),
        sa.Column('updated_at', TS, nullable=False))
    op.create_table('processing_errors',
        sa.Column('seq', sa.Integer, sa.ForeignKey('ids_messages.seq'), primary_key=True),
        sa.Column('reason', sa.Text, nullable=False),
        sa.Column('at', TS, nullable=False))
    op.create_table('patient_facts',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('seq', sa.Integer),
        sa.Column('mrn', sa.String(32), nullable=False),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('family_name', sa.String(64)),
        sa.Column('given_name', sa.String(64)),
        sa.Column('birth_date', sa.Date),
        sa.Column('sex', sa.String(16)),
        sa.Column('race_ethnicity', sa.String(64)),
        *_facts())
    op.create_index('ix_patient_facts_seq', 'patient_facts', ['seq'])
    op.create_index('ix_patient_facts_mrn', 'patient_facts', ['mrn'])
    op.create_table('mrn_merges',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('seq', sa.Integer),
        sa.Column('retired_mrn', sa.String(32), nullable=False),
        sa.Column('surviving_mrn', sa.String(32), nullable=False),
        sa.Column('retired_key', sa.String(32), nullable=False),
        sa.Column('surviving_key', sa.String(32), nullable=False),
        *_facts())
    op.create_index('ix_mrn_merges_seq', 'mrn_merges', ['seq'])
    op.create_index('ix_mrn_merges_retired_key', 'mrn_merges', ['retired_key'])
    op.create_table('patient_links',
        sa.Column('patient_key', sa.String(32), primary_key=True),
        sa.Column('resolved_key', sa.String(32), nullable=False),
        sa.Column('stored_time', TS, nullable=False))
    op.create_index('ix_patient_links_resolved_key', 'patient_links', ['resolved_key'])
    op.create_table('encounters',
        sa.Column('encounter_id', sa.String(32), primary_key=True),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('admit_time', TS),
        sa.Column('discharge_time', TS),
        sa.Column('ward', sa.String(32)),
        *_facts())
    op.create_index('ix_encounters_patient_key', 'encounters', ['patient_key'])
    op.create_table('location_visits',
        sa.Column('encounter_id', sa.String(32), primary_key=True),
        sa.Column('visit', sa.Integer, primary_key=True, autoincrement=False),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('ward', sa.String(32)),
        sa.Column('end_time', TS),
        *_facts())
    op.create_index('ix_location_visits_patient_key', 'location_visits', ['patient_key'])
    op.create_table('lab_order_events',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('seq', sa.Integer),
        sa.Column('order_id', sa.String(32), nullable=False),
        sa.Column('control', sa.String(4), nullable=False),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('encounter_id', sa.String(32)),
        sa.Column('panel', sa.String(16), nullable=False),
        *_facts())
    op.create_index('ix_lab_order_events_seq', 'lab_order_events', ['seq'])
    op.create_index('ix_lab_order_events_order_id', 'lab_order_events', ['order_id'])
    for t in ('adt_events', 'diagnoses', 'medication_orders'):
        with op.batch_alter_table(t) as b:
            b.add_column(sa.Column('seq', sa.Integer))
            b.create_index(f'ix_{t}_seq', ['seq'])
    with op.batch_alter_table('lab_orders') as b:
        b.add_column(sa.Column('status', sa.String(16), nullable=False, server_default='ordered'))
    with op.batch_alter_table('lab_results') as b:
        b.add_column(sa.Column('seq', sa.Integer))
        b.add_column(sa.Column('result_time', TS))
        b.drop_constraint('uq_lab_result', type_='unique')
        b.create_unique_constraint('uq_lab_result_version', ['order_id', 'component', 'seq'])
        b.create_index('ix_lab_results_seq', ['seq'])


def downgrade():
    raise NotImplementedError('0002 is not reversible: the raw feed moved into the immutable data store')
