"""The store on SQLite and on PostgreSQL: migrations, UTC, append-only tables, all-or-nothing ingest."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from cde_workbench.config import CDEError, IngestError
from cde_workbench.events import process_pending
from cde_workbench.ids import store_messages
from cde_workbench.pseudonyms import site_key
from cde_workbench.store import (audit, audit_log, dispose_engines, get_engine, ids_messages, insert_ignore, lab_results,
                                 metadata, patients, read_frame, upgrade)
from cde_workbench.synth import HospitalConfig, feed_revisions, generate, hl7_feed, write_warehouse_extract
from cde_workbench.warehouse import load_warehouse_extract
from conftest import env_key  # noqa: E402


@pytest.fixture
def engine(store_url):
    eng = get_engine(store_url)
    yield eng
    dispose_engines()


def test_migrations_build_exactly_the_declared_schema(engine):
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={'compare_type': True}), metadata)
        version = c.execute(sa.text('select version_num from alembic_version')).scalar()
    from alembic.script import ScriptDirectory
    from cde_workbench.store import migrations_dir
    assert diff == [], diff   # tables, columns, indexes and column types (compare_type) all as declared
    assert version == ScriptDirectory(str(migrations_dir())).get_current_head()
    # and the comparison does see types: the same table declared with a wider column is reported as a type change
    wider = patients.to_metadata(sa.MetaData())
    wider.c.sex.type = sa.String(99)
    with engine.connect() as c:
        ops = compare_metadata(MigrationContext.configure(c, opts={'compare_type': True}), wider.metadata)
    assert [op[0][:4] for op in ops if isinstance(op, list)] == [('modify_type', None, 'patients', 'sex')]


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


@pytest.mark.parametrize('table', ['ids_messages', 'ids_receipts', 'ids_dead_letters', 'audit_log'])
def test_immutable_store_and_audit_log_are_append_only_in_the_database(engine, table):
    t0 = datetime.now(timezone.utc)
    with engine.begin() as c: audit(c, 'test', 'x', actor='tester')
    store_messages(engine, [('MSH|^~\\&|A|B|C|D|20240101000000||ADT^A01|1|P|2.5', t0, 'test'), (b'junk', t0, 'test')])
    for stmt in (f"UPDATE {table} SET {'reason' if table == 'ids_dead_letters' else 'connection' if table != 'audit_log' else 'actor'} = 'x'",
                 f'DELETE FROM {table}'):
        with pytest.raises(sa.exc.DatabaseError, match='append-only'):
            with engine.begin() as c: c.execute(sa.text(stmt))
    with engine.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar() == 1


def test_the_skeletons_raw_feed_moves_into_the_immutable_store(store_url):
    eng = sa.create_engine(store_url)
    from cde_workbench import store
    store_engine = get_engine(store_url, migrate=False)
    upgrade(store_engine, '0001')
    with store_engine.begin() as c:
        c.execute(sa.text("INSERT INTO hl7_messages (received_time, sending_app, sending_facility, message_type, control_id, sha256, raw) "
                          "VALUES (:t, 'A', 'B', 'ADT^A01', 'C1', :h, 'MSH|^~\\&|A|B')"), dict(t=datetime(2024, 1, 1, tzinfo=timezone.utc), h='0' * 64))
    upgrade(store_engine)
    with store_engine.connect() as c:
        row = c.execute(sa.select(ids_messages)).one()
        assert row.raw == b'MSH|^~\\&|A|B' and row.connection == 'migrated' and row.control_id == 'C1'
        assert c.execute(sa.text('select count(*) from ids_receipts')).scalar() == 1
    out = store_messages(store_engine, [('MSH|^~\\&|A|B|C|D|20240101000000||ADT^A01|C2|P|2.5', datetime.now(timezone.utc), 't')])
    assert out[0].seq == row.seq + 1   # the sequence continues after migrated rows
    eng.dispose()


def test_insert_ignore_skips_existing_keys(engine):
    now = datetime.now(timezone.utc)
    row = dict(patient_key='P1', birth_year=1950, sex='F', race_ethnicity='x', stored_time=now, source='t')
    with engine.begin() as c:
        insert_ignore(c, patients, [row]); insert_ignore(c, patients, [row, {**row, 'patient_key': 'P2'}])
    with engine.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(patients)).scalar() == 2


def test_warehouse_and_feed_load_the_same_on_both_backends(engine, tmp_path, monkeypatch):
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    h = generate(HospitalConfig(n_patients=80, seed=11))
    counts = write_warehouse_extract(h, tmp_path / 'x', env_key())
    assert load_warehouse_extract(engine, tmp_path / 'x') == counts
    feed = hl7_feed(h)
    out = store_messages(engine, [(m, t + timedelta(seconds=30), 'test') for t, m in feed])
    assert all(o.status == 'stored' for o in out)
    s = process_pending(engine, key=env_key())
    assert s.messages == len(feed) and s.errors == 0
    with engine.connect() as c:
        n_results = c.execute(sa.select(sa.func.count()).select_from(lab_results)).scalar()
        by_source = dict(c.execute(sa.select(lab_results.c.source, sa.func.count()).group_by(lab_results.c.source)).all())
    cancels, fixes = feed_revisions(h)   # the feed never results a cancelled order, and sends each correction as one more version
    assert n_results == h.results.filter(~pl.col('order_id').is_in(cancels['order_id'].to_list())).height + fixes.height > 0
    assert by_source['warehouse'] == counts['lab_results']


def test_a_storage_failure_stores_nothing_of_the_batch(engine, tmp_path, monkeypatch):
    "A failing write (here a trigger standing in for a full disk) rolls the whole group commit back."
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    feed = hl7_feed(generate(HospitalConfig(n_patients=40, seed=12)))
    store_messages(engine, [(m, t, 'ok') for t, m in feed[:20]])
    def snapshot():
        with engine.connect() as c:
            return {t.name: c.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in metadata.sorted_tables}
    with engine.begin() as c:
        if engine.dialect.name == 'postgresql':
            c.execute(sa.text("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                              "IF NEW.connection = 'boom' THEN RAISE EXCEPTION 'could not extend file: No space left on device'; END IF; "
                              "RETURN NEW; END $$"))
            c.execute(sa.text('CREATE TRIGGER boom BEFORE INSERT ON ids_receipts FOR EACH ROW EXECUTE FUNCTION boom()'))
        else:
            c.execute(sa.text("CREATE TRIGGER boom BEFORE INSERT ON ids_receipts WHEN NEW.connection = 'boom' "
                              "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"))
    before = snapshot()
    with pytest.raises(sa.exc.DatabaseError):
        store_messages(engine, [(m, t, 'ok') for t, m in feed[20:40]] + [(feed[40][1], feed[40][0], 'boom')])
    assert snapshot() == before


@pytest.mark.parametrize('table', ['models', 'model_aliases'])
def test_registered_models_and_alias_history_are_append_only_in_the_database(engine, table, tmp_path, monkeypatch):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from cde_workbench.registry import register_model, set_alias
    monkeypatch.setenv('CDE_VAR', str(tmp_path))
    est = LogisticRegression().fit(np.array([[0.], [1.]]), [0, 1])
    register_model(engine, 'm', {'estimator': est}, {}, {}, 'f' * 64, 'd' * 64, var=tmp_path)
    set_alias(engine, 'm', 'champion', 1, 'test')
    col = 'name'
    for stmt in (f"UPDATE {table} SET {col} = 'x'", f'DELETE FROM {table}'):
        with pytest.raises(sa.exc.DatabaseError, match='append-only'):
            with engine.begin() as c: c.execute(sa.text(stmt))
    with engine.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar() == 1


def test_audit_log_is_a_hash_chain_that_finds_edits_and_deletions(engine):
    from cde_workbench.store import verify_audit_chain
    with engine.begin() as c:
        for i in range(4): audit(c, 'test.step', f't{i}', {'i': i}, actor='tester')
    with engine.connect() as c:
        v = verify_audit_chain(c)
    assert v.ok and v.rows == 4
    pg = engine.dialect.name == 'postgresql'
    with engine.begin() as c:   # someone with the database's owner rights lifts the append-only triggers
        if pg: c.exec_driver_sql('DROP TRIGGER audit_log_append_only ON audit_log')
        else: c.exec_driver_sql('DROP TRIGGER audit_log_no_update'); c.exec_driver_sql('DROP TRIGGER audit_log_no_delete')
        c.exec_driver_sql("UPDATE audit_log SET detail = '{\"i\": 9}' WHERE target = 't1'")
        c.exec_driver_sql("DELETE FROM audit_log WHERE target = 't2'")
    with engine.connect() as c:
        problems = verify_audit_chain(c).problems
    assert any('t1' in p and 'edited' in p for p in problems), problems
    assert any('was removed or inserted' in p for p in problems), problems


def test_the_migration_chains_audit_rows_written_before_it(store_url):
    from cde_workbench.store import verify_audit_chain
    eng = get_engine(store_url, migrate=False)
    upgrade(eng, '0005')
    with eng.begin() as c:
        for i in range(3):
            c.execute(sa.text("INSERT INTO audit_log (at, actor, action, target, detail) VALUES (:at, 'old', 'x.y', :t, '{}')"),
                      {'at': datetime(2024, 1, 1, 12, i, tzinfo=timezone.utc) if eng.dialect.name == 'postgresql' else f'2024-01-01 12:0{i}:00.000000', 't': f'r{i}'})
    upgrade(eng)
    with eng.begin() as c:
        audit(c, 'x.after', 'r3', actor='new')
    with eng.connect() as c:
        v = verify_audit_chain(c)
    assert v.ok and v.rows == 4, v.problems
    dispose_engines()
