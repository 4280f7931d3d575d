"""Initial schema: clinical tables, raw HL7 feed, model registry, deployments, run ledger, inference store, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _facts():
    return [sa.Column('event_time', TS, nullable=False), sa.Column('stored_time', TS, nullable=False),
            sa.Column('source', sa.String(32), nullable=False)]


def upgrade():
    op.create_table('patients',
        sa.Column('patient_key', sa.String(32), primary_key=True),
        sa.Column('birth_year', sa.Integer, nullable=False),
        sa.Column('sex', sa.String(16), nullable=False),
        sa.Column('race_ethnicity', sa.String(64), nullable=False),
        sa.Column('stored_time', TS, nullable=False),
        sa.Column('source', sa.String(32), nullable=False))
    op.create_table('patient_identity',
        sa.Column('mrn', sa.String(32), primary_key=True),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('family_name', sa.String(64)),
        sa.Column('given_name', sa.String(64)),
        sa.Column('birth_date', sa.Date),
        sa.Column('stored_time', TS, nullable=False))
    op.create_index('ix_patient_identity_patient_key', 'patient_identity', ['patient_key'])
    op.create_table('adt_events',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('encounter_id', sa.String(32), nullable=False),
        sa.Column('event_type', sa.String(8), nullable=False),
        sa.Column('ward', sa.String(32)),
        *_facts(),
        sa.UniqueConstraint('encounter_id', 'event_type', 'event_time', name='uq_adt_event'))
    op.create_index('ix_adt_events_patient_key', 'adt_events', ['patient_key'])
    op.create_table('diagnoses',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('encounter_id', sa.String(32)),
        sa.Column('icd10', sa.String(16), nullable=False),
        *_facts())
    op.create_index('ix_diagnoses_patient_key', 'diagnoses', ['patient_key'])
    op.create_table('medication_orders',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('encounter_id', sa.String(32)),
        sa.Column('med_code', sa.String(32), nullable=False),
        sa.Column('med_name', sa.String(128)),
        *_facts())
    op.create_index('ix_medication_orders_patient_key', 'medication_orders', ['patient_key'])
    op.create_table('lab_orders',
        sa.Column('order_id', sa.String(32), primary_key=True),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('encounter_id', sa.String(32)),
        sa.Column('panel', sa.String(16), nullable=False),
        *_facts())
    op.create_index('ix_lab_orders_patient_key', 'lab_orders', ['patient_key'])
    op.create_table('lab_results',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('order_id', sa.String(32), nullable=False),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('component', sa.String(16), nullable=False),
        sa.Column('loinc', sa.String(16), nullable=False),
        sa.Column('value', sa.Float, nullable=False),
        sa.Column('unit', sa.String(16)),
        sa.Column('ref_low', sa.Float),
        sa.Column('ref_high', sa.Float),
        sa.Column('abnormal_flag', sa.String(4)),
        sa.Column('status', sa.String(2), nullable=False),
        *_facts(),
        sa.UniqueConstraint('order_id', 'component', name='uq_lab_result'))
    op.create_index('ix_lab_results_order_id', 'lab_results', ['order_id'])
    op.create_index('ix_lab_results_patient_key', 'lab_results', ['patient_key'])
    op.create_table('hl7_messages',
        sa.Column('seq', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('received_time', TS, nullable=False),
        sa.Column('sending_app', sa.String(64)),
        sa.Column('sending_facility', sa.String(64)),
        sa.Column('message_type', sa.String(16), nullable=False),
        sa.Column('control_id', sa.String(64), nullable=False),
        sa.Column('sha256', sa.String(64), nullable=False),
        sa.Column('raw', sa.Text, nullable=False),
        sa.UniqueConstraint('sending_app', 'sending_facility', 'control_id', name='uq_hl7_control'))
    op.create_table('models',
        sa.Column('model_id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('version', sa.Integer, nullable=False),
        sa.Column('sha256', sa.String(64), nullable=False),
        sa.Column('path', sa.Text, nullable=False),
        sa.Column('feature_set_hash', sa.String(64), nullable=False),
        sa.Column('data_fingerprint', sa.String(64), nullable=False),
        sa.Column('code_version', sa.String(64), nullable=False),
        sa.Column('params', sa.Text, nullable=False),
        sa.Column('metrics', sa.Text, nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.UniqueConstraint('name', 'version', name='uq_model_version'))
    op.create_table('deployments',
        sa.Column('name', sa.String(64), primary_key=True),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('model_id', sa.Integer, sa.ForeignKey('models.model_id')),
        sa.Column('updated_at', TS, nullable=False))
    op.create_table('runs',
        sa.Column('run_id', sa.String(40), primary_key=True),
        sa.Column('deployment', sa.String(64), nullable=False),
        sa.Column('kind', sa.String(16), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('started_at', TS, nullable=False),
        sa.Column('finished_at', TS),
        sa.Column('parameters', sa.Text, nullable=False),
        sa.Column('notebook', sa.Text),
        sa.Column('error', sa.Text))
    op.create_index('ix_runs_deployment', 'runs', ['deployment'])
    op.create_table('inferences',
        sa.Column('inference_id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('deployment', sa.String(64), nullable=False),
        sa.Column('model_id', sa.Integer, sa.ForeignKey('models.model_id'), nullable=False),
        sa.Column('order_id', sa.String(32), nullable=False),
        sa.Column('patient_key', sa.String(32), nullable=False),
        sa.Column('prediction_time', TS, nullable=False),
        sa.Column('score', sa.Float, nullable=False),
        sa.Column('threshold', sa.Float, nullable=False),
        sa.Column('output_mode', sa.String(16), nullable=False),
        sa.Column('n_features', sa.Integer, nullable=False),
        sa.Column('run_id', sa.String(40), sa.ForeignKey('runs.run_id'), nullable=False),
        sa.Column('scored_at', TS, nullable=False),
        sa.UniqueConstraint('deployment', 'order_id', name='uq_inference_order'))
    op.create_table('inference_labels',
        sa.Column('inference_id', sa.Integer, sa.ForeignKey('inferences.inference_id'), primary_key=True),
        sa.Column('label', sa.Integer, nullable=False),
        sa.Column('label_time', TS, nullable=False),
        sa.Column('run_id', sa.String(40), sa.ForeignKey('runs.run_id'), nullable=False),
        sa.Column('extracted_at', TS, nullable=False))
    op.create_table('audit_log',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('at', TS, nullable=False),
        sa.Column('actor', sa.String(64), nullable=False),
        sa.Column('action', sa.String(64), nullable=False),
        sa.Column('target', sa.String(128), nullable=False),
        sa.Column('detail', sa.Text, nullable=False))
    if op.get_bind().dialect.name == 'postgresql':
        # the raw feed and the audit log are append-only: enforce it in the database, not only in code
        op.execute("""CREATE FUNCTION cde_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP; END $$""")
        for t in ('hl7_messages', 'audit_log'):
            op.execute(f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t} "
                       "FOR EACH ROW EXECUTE FUNCTION cde_append_only()")
    else:
        for t in ('hl7_messages', 'audit_log'):
            for verb in ('UPDATE', 'DELETE'):
                op.execute(f"CREATE TRIGGER {t}_no_{verb.lower()} BEFORE {verb} ON {t} "
                           f"BEGIN SELECT RAISE(ABORT, '{t} is append-only: {verb} refused'); END")


def downgrade():
    for t in ('audit_log', 'inference_labels', 'inferences', 'runs', 'deployments', 'models', 'hl7_messages',
              'lab_results', 'lab_orders', 'medication_orders', 'diagnoses', 'adt_events', 'patient_identity', 'patients'):
        op.drop_table(t)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION IF EXISTS cde_append_only()')
