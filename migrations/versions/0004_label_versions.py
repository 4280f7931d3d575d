"""Label versions: `inference_labels` becomes an append-only history, one row per version of a packet's label
(a result corrected after its label was extracted adds a version), each with the clock it is known from.

Existing labels become version 1, known from the clock (`as_of`) of the run that extracted them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
import json
from datetime import datetime, timezone

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
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


def _utc(v):
    "A stored time as an aware UTC datetime (SQLite returns text or naive values)."
    if v is None: return None
    if isinstance(v, str): v = datetime.fromisoformat(v)
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


def _run_clock(parameters, fallback):
    "The `as_of` a run was given (its clock), else `fallback`."
    try: v = json.loads(parameters or '{}').get('as_of')
    except ValueError: v = None
    try: return _utc(datetime.fromisoformat(v.replace('Z', '+00:00'))) if v else fallback
    except ValueError: return fallback


def upgrade():
    conn = op.get_bind()
    old = conn.execute(sa.text('SELECT l.inference_id, l.label, l.label_time, l.run_id, l.extracted_at, r.parameters '
                               'FROM inference_labels l LEFT JOIN runs r ON r.run_id = l.run_id')).fetchall()
    op.drop_table('inference_labels')
    t = op.create_table('inference_labels',
        sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
        sa.Column('inference_id', sa.Integer, sa.ForeignKey('inferences.inference_id'), nullable=False),
        sa.Column('version', sa.Integer, nullable=False),
        sa.Column('label', sa.Integer, nullable=False),
        sa.Column('label_time', TS, nullable=False),
        sa.Column('stored_time', TS, nullable=False),
        sa.Column('run_id', sa.String(40), sa.ForeignKey('runs.run_id'), nullable=False),
        sa.Column('extracted_at', TS, nullable=False),
        sa.UniqueConstraint('inference_id', 'version', name='uq_inference_label_version'))
    pg = conn.dialect.name == 'postgresql'
    fmt = (lambda v: v) if pg else (lambda v: v.replace(tzinfo=None))   # SQLite keeps UTC without an offset, as the store does
    rows = [dict(inference_id=r[0], version=1, label=r[1], label_time=fmt(_utc(r[2])),
                 stored_time=fmt(_run_clock(r[5], _utc(r[4]))), run_id=r[3], extracted_at=fmt(_utc(r[4]))) for r in old]
    if rows: op.bulk_insert(t, rows)
    _append_only('inference_labels')


def downgrade():
    raise NotImplementedError('0004 is not reversible: label versions cannot be folded back into one label per packet')
