"""Research views (issue 13): what researchers read, code to data. Each view carries random surrogates in place of the
store's patient keys, encounter ids and order ids (from `research_ids`, append-only), a birth year in place of the birth
date (no year at all for anyone aged 90 or more, as HIPAA Safe Harbor aggregates them), and no MRN, name, address or free
text. Identity tables, raw messages and the surrogate map itself are never in a view. On PostgreSQL the `cde_research`
role is granted these views only (`cde research build`); on SQLite researchers read a read-only copy built from them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _ids(alias: str, kind: str, column: str) -> str:
    "A join to the surrogate map: LEFT, so a fact whose optional id is null keeps its row."
    return f"LEFT JOIN research_ids {alias} ON {alias}.kind = '{kind}' AND {alias}.source_id = {column}"


def _patient(column: str) -> str:
    "The inner join that keeps only facts of patients with a surrogate (given by `refresh_research_ids`)."
    return f"JOIN research_ids rp ON rp.kind = 'patient' AND rp.source_id = {column}"


def views(dialect: str) -> dict[str, str]:
    "Each research view's SELECT, in the order they are created."
    year = "CAST(strftime('%Y', 'now') AS INTEGER)" if dialect == 'sqlite' else 'CAST(EXTRACT(YEAR FROM CURRENT_DATE) AS INTEGER)'
    return {
        'research_patients': f"""SELECT rp.research_id AS patient_id,
                CASE WHEN p.birth_year <= {year} - 90 THEN NULL ELSE p.birth_year END AS birth_year,
                CASE WHEN p.birth_year <= {year} - 90 THEN 1 ELSE 0 END AS aged_90_or_more,
                p.sex, p.race_ethnicity, p.stored_time
            FROM patients p {_patient('p.patient_key')}""",
        'research_encounters': f"""SELECT re.research_id AS encounter_id, rp.research_id AS patient_id, e.status, e.admit_time,
                e.discharge_time, e.ward, e.event_time, e.stored_time
            FROM encounters e {_patient('e.patient_key')} {_ids('re', 'encounter', 'e.encounter_id')}""",
        'research_location_visits': f"""SELECT re.research_id AS encounter_id, v.visit, rp.research_id AS patient_id, v.ward,
                v.event_time, v.end_time, v.stored_time
            FROM location_visits v {_patient('v.patient_key')} {_ids('re', 'encounter', 'v.encounter_id')}""",
        'research_adt_events': f"""SELECT rp.research_id AS patient_id, re.research_id AS encounter_id, a.event_type, a.ward,
                a.event_time, a.stored_time
            FROM adt_events a {_patient('a.patient_key')} {_ids('re', 'encounter', 'a.encounter_id')}""",
        'research_diagnoses': f"""SELECT rp.research_id AS patient_id, re.research_id AS encounter_id, d.icd10,
                d.event_time, d.stored_time
            FROM diagnoses d {_patient('d.patient_key')} {_ids('re', 'encounter', 'd.encounter_id')}""",
        'research_medication_orders': f"""SELECT rp.research_id AS patient_id, re.research_id AS encounter_id, m.med_code,
                m.event_time, m.stored_time
            FROM medication_orders m {_patient('m.patient_key')} {_ids('re', 'encounter', 'm.encounter_id')}""",
        'research_lab_orders': f"""SELECT ro.research_id AS order_id, rp.research_id AS patient_id, re.research_id AS encounter_id,
                o.panel, o.status, o.event_time, o.stored_time
            FROM lab_orders o {_patient('o.patient_key')} {_ids('re', 'encounter', 'o.encounter_id')}
                {_ids('ro', 'order', 'o.order_id')}""",
        'research_lab_results': f"""SELECT ro.research_id AS order_id, rp.research_id AS patient_id, r.component, r.loinc,
                r.value, r.unit, r.ref_low, r.ref_high, r.abnormal_flag, r.status, r.result_time, r.event_time, r.stored_time
            FROM lab_results r {_patient('r.patient_key')} {_ids('ro', 'order', 'r.order_id')}""",
    }


def upgrade():
    op.create_table('research_ids',
        sa.Column('kind', sa.String(16), primary_key=True),
        sa.Column('source_id', sa.String(32), primary_key=True),
        sa.Column('research_id', sa.String(32), nullable=False, unique=True),
        sa.Column('created_at', TS, nullable=False))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("CREATE TRIGGER research_ids_append_only BEFORE UPDATE OR DELETE ON research_ids "
                   "FOR EACH ROW EXECUTE FUNCTION cde_append_only()")
    else:
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER research_ids_no_{verb.lower()} BEFORE {verb} ON research_ids "
                       f"BEGIN SELECT RAISE(ABORT, 'research_ids is append-only: {verb} refused'); END")
    for name, select in views(op.get_bind().dialect.name).items():
        op.execute(f'CREATE VIEW {name} AS {select}')


def downgrade():
    for name in reversed(views(op.get_bind().dialect.name)): op.execute(f'DROP VIEW {name}')
    op.drop_table('research_ids')
