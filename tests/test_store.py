"""The store on SQLite and on PostgreSQL: migrations, UTC, append-only tables, all-or-nothing ingest."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from cde_workbench.config import CDEError, IngestError
from cde_workbench.events import ingest_messages
from cde_workbench.store import (audit, audit_log, dispose_engines, get_engine, hl7_messages, insert_ignore, lab_results,
                                 metadata, patients, read_frame)
from cde_workbench.synth import HospitalConfig, generate, hl7_feed, write_warehouse_extract
from cde_workbench.warehouse import load_warehouse_extract


@pytest.fixture
def engine(store_url):
    eng = get_engine(store_url)
    yield eng
    dispose_engines()


def test_migrations_build_exactly_the_declared_schema(engine):
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={'compare_type': False}), metadata)
        version = c.execute(sa.text('select version_num from alembic_version')).scalar()
    assert diff == [] and version == '0001'


def test_times_round_trip_as_aware_utc(engine):
    t = datetime(2024, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    with engine.begin() as c:
        c.execute(patients.insert().values(patient_key='P1', birth_year=1950, sex='F', race_ethnicity='x', stored_time=t, source='t'))
    with engine.connect() as c: got = c.execute(sa.select(patients.c.stored_time)).scalar()
    assert got == t and got.tzinfo is not None and got.utcoffset() == timedelta(0)
    with pytest.raises(sa.exc.StatementError, match='naive datetime'):
        with engine.begin() as c:
            c.execute(patients.insert().values(patient_key='P2', birth_year=1950, sex='F', race_ethnicity='x',
                                               stored_time=datetime(2024, 1, 1), source='t'))


@pytest.mark.parametrize('table', ['hl7_messages', 'audit_log'])
def test_raw_feed_and_audit_log_are_append_only_in_the_database(engine, table):
    with engine.begin() as c:
        audit(c, 'test', 'x', actor='tester')
        c.execute(hl7_messages.insert().values(received_time=datetime.now(timezone.utc), sending_app='A', sending_facility='B',
                                               message_type='ADT^A01', control_id='1', sha256='0' * 64, raw='MSH|'))
    for stmt in (f'UPDATE {table} SET {"raw" if table == "hl7_messages" else "actor"} = \'x\'', f'DELETE FROM {table}'):
        with pytest.raises(sa.exc.DatabaseError, match='append-only'):
            with engine.begin() as c: c.execute(sa.text(stmt))
    with engine.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar() == 1


def test_insert_ignore_skips_existing_keys(engine):
    now = datetime.now(timezone.utc)
    row = dict(patient_key='P1', birth_year=1950, sex='F', race_ethnicity='x', stored_time=now, source='t')
    with engine.begin() as c:
        insert_ignore(c, patients, [row]); insert_ignore(c, patients, [row, {**row, 'patient_key': 'P2'}])
    with engine.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(patients)).scalar() == 2


def test_warehouse_and_feed_load_the_same_on_both_backends(engine, tmp_path, monkeypatch):
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    h = generate(HospitalConfig(n_patients=80, seed=11))
    counts = write_warehouse_extract(h, tmp_path / 'x')
    assert load_warehouse_extract(engine, tmp_path / 'x') == counts
    feed = hl7_feed(h)
    s = ingest_messages(engine, [(m, t + timedelta(seconds=30)) for t, m in feed])
    assert s.stored == len(feed)
    with engine.connect() as c:
        n_results = c.execute(sa.select(sa.func.count()).select_from(lab_results)).scalar()
        by_source = dict(c.execute(sa.select(lab_results.c.source, sa.func.count()).group_by(lab_results.c.source)).all())
    assert n_results == h.results.height and by_source['warehouse'] == counts['lab_results']


def test_a_malformed_message_leaves_the_store_as_it_was(engine, tmp_path, monkeypatch):
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    feed = hl7_feed(generate(HospitalConfig(n_patients=40, seed=12)))
    ingest_messages(engine, [(m, t) for t, m in feed[:20]])
    def snapshot():
        with engine.connect() as c:
            return {t.name: c.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in metadata.sorted_tables}
    before = snapshot()
    # a result message whose value is not a number, after good messages in the same batch
    oru = next(m for _, m in feed[20:] if 'ORU^R01' in m.split('\r')[0])
    segs = oru.split('\r'); i = next(k for k, s in enumerate(segs) if s.startswith('OBX'))
    f = segs[i].split('|'); f[5] = 'twelve'; segs[i] = '|'.join(f)
    with pytest.raises(IngestError, match=r'OBX-5 .twelve. .* not a number'):
        ingest_messages(engine, [(m, t) for t, m in feed[20:40]] + [('\r'.join(segs).replace('SYN', 'BAD'), feed[40][0])], name='batch.hl7')
    assert snapshot() == before
