"""Research views on SQLite and on PostgreSQL: no identifier the synthetic hospital generated is in any view, and the
research role (PostgreSQL) or the research copy (SQLite) refuses the base tables."""
import re
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from cde_workbench.config import utcnow
from cde_workbench.events import process_pending
from cde_workbench.ids import store_messages
from cde_workbench.research import RESEARCH_VIEWS, ResearchError, build_research, read_research, research_engine
from cde_workbench.store import dispose_engines, get_engine, patients, read_frame
from cde_workbench.synth import HospitalConfig, generate, hl7_feed, write_warehouse_extract
from cde_workbench.warehouse import load_warehouse_extract
from conftest import env_key  # noqa: E402

SURROGATE = {'patient_id': r'RP[0-9a-f]{20}', 'encounter_id': r'RE[0-9a-f]{20}', 'order_id': r'RO[0-9a-f]{20}'}


@pytest.fixture
def hospital_store(store_url, tmp_path, monkeypatch):
    "A small hospital in the store from both doors: the warehouse extract and the HL7 feed (names, MRNs, birth dates)."
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    h = generate(HospitalConfig(n_patients=40, seed=21))
    write_warehouse_extract(h, tmp_path / 'x', env_key())
    engine = get_engine(store_url)
    load_warehouse_extract(engine, tmp_path / 'x')
    store_messages(engine, [(m, t + timedelta(seconds=30), 'test') for t, m in hl7_feed(h)])
    process_pending(engine, key=env_key())
    yield h, engine, tmp_path / 'var'
    dispose_engines()


def _identifiers(h, engine) -> dict[str, set[str]]:
    "Every identifier the hospital generated, and the store's own patient keys."
    p = h.patients
    with engine.connect() as c: keys = set(c.execute(sa.select(patients.c.patient_key)).scalars())
    return {'mrn': set(p['mrn']), 'patient_key': keys,
            'encounter_id': set(h.admissions['encounter_id']),
            'order_id': set(h.orders['order_id']) | set(h.medications['order_id'].drop_nulls()),
            'birth_date': {d.isoformat() for d in p['birth_date']},
            'name': set(p['family_name']) | set(p['given_name']) | {f'{g} {f}' for g, f in zip(p['given_name'], p['family_name'])}}


def test_no_identifier_is_in_any_research_view(hospital_store):
    h, engine, var = hospital_store
    counts = build_research(engine, var)
    assert set(counts) == set(RESEARCH_VIEWS) and all(counts[v] > 0 for v in RESEARCH_VIEWS), counts
    with engine.connect() as c:   # the list researchers are shown is the set of views the migrations made
        made = sa.inspect(c).get_view_names()
    assert {v for v in made if v.startswith('research_')} == set(RESEARCH_VIEWS)
    ids = _identifiers(h, engine)
    assert all(ids.values())
    long_ids = [s for k in ('mrn', 'patient_key', 'encounter_id', 'order_id', 'birth_date') for s in ids[k]]
    found = []
    reader = research_engine(str(engine.url.render_as_string(hide_password=False)), var)
    try:
        for view in RESEARCH_VIEWS:
            df = read_research(reader, f'SELECT * FROM {view}')
            assert df.height == counts[view]
            assert not {'mrn', 'patient_key', 'family_name', 'given_name', 'birth_date', 'med_name'} & set(df.columns), view
            for col, pattern in SURROGATE.items():
                if col in df.columns:
                    vals = df[col].drop_nulls().to_list()
                    assert vals and all(re.fullmatch(pattern, v) for v in vals), (view, col)
            for col in df.columns:
                if df[col].dtype == pl.Date: found.append((view, col, 'a date column'))
                for v in df[col].drop_nulls().cast(pl.String).unique().to_list():
                    if v in ids['name'] or any(s in v for s in long_ids): found.append((view, col, v))
    finally: reader.dispose()
    assert not found, found[:10]


def test_research_views_refuse_base_tables_and_coarsen_birth(hospital_store):
    h, engine, var = hospital_store
    build_research(engine, var)
    reader = research_engine(str(engine.url.render_as_string(hide_password=False)), var)
    try:
        for table in ('patient_identity', 'patient_facts', 'patients', 'lab_results', 'ids_messages', 'research_ids', 'audit_log'):
            with pytest.raises(ResearchError, match=f'{table} is not a research view'):
                read_research(reader, f'SELECT * FROM {table}')
        years = read_research(reader, 'SELECT birth_year, aged_90_or_more FROM research_patients')
        with engine.connect() as c: truth = sorted(c.execute(sa.select(patients.c.birth_year)).scalars())
        this_year = __import__('datetime').date.today().year
        assert sorted(years['birth_year'].drop_nulls().to_list()) == [y for y in truth if y > this_year - 90]
        assert years['aged_90_or_more'].sum() == sum(y <= this_year - 90 for y in truth)
        # the same surrogate everywhere: every lab result's patient is a research patient
        joined = read_research(reader, 'SELECT count(*) AS n FROM research_lab_results r '
                                       'JOIN research_patients p ON p.patient_id = r.patient_id')
        assert joined['n'].item() == read_research(reader, 'SELECT count(*) AS n FROM research_lab_results')['n'].item()
    finally: reader.dispose()


def test_surrogates_are_stable_and_new_patients_get_one(hospital_store):
    h, engine, var = hospital_store
    build_research(engine, var)
    reader = research_engine(str(engine.url.render_as_string(hide_password=False)), var)
    try: before = set(read_research(reader, 'SELECT patient_id FROM research_patients')['patient_id'])
    finally: reader.dispose()
    with engine.begin() as c:
        c.execute(patients.insert().values(patient_key='P' + '0' * 20, birth_year=1970, sex='F', race_ethnicity='White',
                                           stored_time=utcnow(), source='test'))
    build_research(engine, var)
    reader = research_engine(str(engine.url.render_as_string(hide_password=False)), var)
    try: after = set(read_research(reader, 'SELECT patient_id FROM research_patients')['patient_id'])
    finally: reader.dispose()
    assert before < after and len(after - before) == 1


def test_a_failed_copy_leaves_the_previous_copy_whole(tmp_path, monkeypatch):
    "SQLite only: the copy is written aside and replaces the old one only once complete."
    from cde_workbench import research
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    engine = get_engine(f'sqlite:///{tmp_path}/store.sqlite')
    try:
        build_research(engine, tmp_path / 'var')
        copy = research.research_copy_path(tmp_path / 'var')
        before = copy.read_bytes()
        monkeypatch.setitem(research.RESEARCH_VIEWS, 'research_missing', 'a view no migration made')
        with pytest.raises(ResearchError, match='research_missing'):
            build_research(engine, tmp_path / 'var')
        assert copy.read_bytes() == before
        assert [p.name for p in copy.parent.iterdir()] == [copy.name]   # no temporary file left behind
    finally: dispose_engines()


def test_cde_research_build_prints_each_view(tmp_path, monkeypatch):
    "The command line on the embedded default: surrogates made, the copy built, a line per view."
    from typer.testing import CliRunner
    from cde_workbench.cli import app
    monkeypatch.setenv('CDE_VAR', str(tmp_path / 'var')); monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    monkeypatch.delenv('CDE_DATABASE_URL', raising=False)
    try:
        r = CliRunner().invoke(app, ['research', 'build'])
        assert r.exit_code == 0, r.output
        assert 'research.sqlite' in r.output and all(f'  {v}: 0 rows' in r.output for v in RESEARCH_VIEWS)
        assert (tmp_path / 'var' / 'research' / 'research.sqlite').exists()
    finally: dispose_engines()


def test_cde_export_suppresses_small_cells_and_refuses_identifiers(hospital_store, tmp_path, monkeypatch):
    "A researcher's table from the research views leaves with its small cells suppressed; a per-patient one never leaves."
    import json
    from typer.testing import CliRunner
    from cde_workbench.cli import app
    from cde_workbench.store import audit_log
    h, engine, var = hospital_store
    build_research(engine, var)
    monkeypatch.setenv('CDE_DATABASE_URL', engine.url.render_as_string(hide_password=False)); monkeypatch.setenv('CDE_VAR', str(var))
    reader = research_engine(engine.url.render_as_string(hide_password=False), var)
    try:
        table = read_research(reader, 'SELECT e.ward, p.sex, count(*) AS n_stays FROM research_encounters e '
                                      'JOIN research_patients p ON p.patient_id = e.patient_id GROUP BY e.ward, p.sex ORDER BY 1, 2')
        per_patient = read_research(reader, 'SELECT patient_id, count(*) AS n FROM research_encounters GROUP BY patient_id')
    finally: reader.dispose()
    assert ((table['n_stays'] > 0) & (table['n_stays'] < 10)).any(), table   # the small hospital has small cells to hide
    table.write_csv(tmp_path / 'stays.csv'); per_patient.write_csv(tmp_path / 'per_patient.csv')
    from cde_workbench.store import patient_identity
    with engine.connect() as c: mrn = c.execute(sa.select(patient_identity.c.mrn).limit(1)).scalar_one()
    pl.DataFrame({'mrn': [mrn], 'n': [20]}).write_csv(tmp_path / 'oops.csv')
    outbox = tmp_path / 'outbox'
    run = lambda *a: CliRunner().invoke(app, ['export', *a, '--to', str(outbox), '--actor', 'dr researcher'])
    for bad, why in (('per_patient.csv', 'contains a research surrogate id'), ('oops.csv', 'contains a MRN')):
        r = run(str(tmp_path / 'stays.csv'), str(tmp_path / bad))
        assert r.exit_code != 0 and why in str(r.exception), (r.output, r.exception)
        assert not outbox.exists() or not any(outbox.iterdir())   # all or nothing: the good table did not leave either
    r = run(str(tmp_path / 'stays.csv'))
    assert r.exit_code == 0, (r.output, r.exception)
    folder = next(outbox.iterdir())
    out = pl.read_csv(folder / 'stays.csv')
    small = (table['n_stays'] < 10).to_list()
    assert all(o is None for o, s in zip(out['n_stays'], small) if s)         # every small count hidden
    assert out['n_stays'].null_count() != 1                                    # never one alone in the column
    assert [o for o, s in zip(out['n_stays'], small) if not s and o is not None] == \
           [t for t, s, o in zip(table['n_stays'], small, out['n_stays']) if not s and o is not None]
    with engine.connect() as c:
        row = c.execute(sa.select(audit_log).where(audit_log.c.action == 'export')).one()
    detail = json.loads(row.detail)
    assert row.actor == 'dr researcher' and detail['files'][0]['name'] == 'stays.csv'
    import hashlib
    assert detail['files'][0]['sha256'] == hashlib.sha256((folder / 'stays.csv').read_bytes()).hexdigest()
