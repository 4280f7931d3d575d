"""At the door: everything under var/ (and the SQLite store) is the owner's only, whatever the umask; a warehouse extract whose
patient keys are not pseudonyms is refused; `cde ingest status` says what arrived from whom and what became of it."""
import json
import os
import re
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_DEPLOYMENT, cde, one_line_error  # noqa: E402


@pytest.fixture
def umask_022():
    "The usual umask (group and others may read): what the workbench must not rely on."
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p: Path) -> int: return stat.S_IMODE(p.lstat().st_mode)


def _not_private(var: Path) -> list[str]:
    "Everything under `var` (itself included) that anyone but its owner may read, write or enter."
    return [f'{p} {oct(_mode(p))}' for p in [var, *var.rglob('*')] if _mode(p) & 0o077]


def test_synth_ingest_and_train_leave_nothing_under_var_readable_by_others(tmp_path, umask_022, monkeypatch):
    base = tmp_path / 'site'
    env = {'CDE_VAR': str(base / 'var'), 'CDE_REPORTS': str(base / 'reports'), 'CDE_DEPLOYMENTS': str(base / 'deployments')}
    r = cde('synth', '--patients', '200', '--seed', '5', env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cde('ingest', 'warehouse', str(base / 'var' / 'synth' / 'warehouse'), env=env)
    assert r.returncode == 0 and 'loaded' in r.stdout, r.stdout + r.stderr
    r = cde('ingest', 'file', str(base / 'var' / 'synth' / 'feed.hl7'), '--replay', env=env)
    assert r.returncode == 0 and 'stored' in r.stdout, r.stdout + r.stderr
    # a train on the small store (two quick candidates, as the suite's small store), in this process under the same umask
    folder = base / 'deployments' / SMALL_DEPLOYMENT; folder.mkdir(parents=True)
    toml = (ROOT / 'deployments' / SMALL_DEPLOYMENT / 'deployment.toml').read_text()
    toml = re.sub(r'n_estimators = \[\d+\]', 'n_estimators = [40]', re.sub(r'bootstrap = \d+', 'bootstrap = 200', toml))
    (folder / 'deployment.toml').write_text(re.sub(r'candidates = \[.*\]', 'candidates = ["logistic_regression", "random_forest"]', toml))
    for k, v in env.items(): monkeypatch.setenv(k, v)
    from cde_workbench.config import Workspace
    from cde_workbench.access import add_user, users_file
    from cde_workbench.deployment import load_deployment
    from cde_workbench.store import dispose_engines, get_engine
    from cde_workbench.train import train_deployment
    ws = Workspace.from_env()
    try:
        rec = train_deployment(get_engine(ws.database_url), load_deployment(SMALL_DEPLOYMENT, ws.deployments), ws.var, progress=False)
        add_user(users_file(ws), 'door', 'datascience')
        var = ws.var
        for sub in ('synth', 'models', 'features'): assert (var / sub).is_dir(), sub   # each creator has been through
        assert Path(rec.path).is_file() and any((var / 'features').rglob('*.npz'))
        assert (var / 'cde.sqlite-wal').exists() or (var / 'cde.sqlite-shm').exists()   # the store is open in WAL mode
        assert _not_private(var) == []
        assert (_mode(var / 'cde.sqlite'), _mode(var / 'site.key'), _mode(Path(rec.path))) == (0o600, 0o600, 0o400)
        assert all(_mode(p) == 0o700 for p in [var, *var.rglob('*')] if p.is_dir())
    finally: dispose_engines()


def test_an_existing_world_readable_store_is_tightened_when_opened(tmp_path, umask_022):
    import sqlite3
    var = tmp_path / 'var'; var.mkdir()
    db = var / 'cde.sqlite'
    con = sqlite3.connect(db); con.execute('PRAGMA journal_mode=WAL'); con.execute('CREATE TABLE t (x)'); con.commit()
    assert _mode(db) == 0o644 and _mode(var / 'cde.sqlite-wal') == 0o644   # as SQLite makes it under this umask
    r = cde('ingest', 'status', env={'CDE_VAR': str(var)})
    con.close()
    assert r.returncode == 0 and 'nothing received yet' in r.stdout, r.stdout + r.stderr
    assert _mode(db) == 0o600 and all(_mode(p) == 0o600 for p in var.glob('cde.sqlite-*'))


def _extract(tmp_path: Path) -> Path:
    from cde_workbench.pseudonyms import site_key
    from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
    write_warehouse_extract(generate(HospitalConfig(n_patients=40, seed=3)), tmp_path / 'extract', site_key(tmp_path / 'site.key'))
    return tmp_path / 'extract'


def test_a_raw_mrn_in_an_extract_is_refused_and_nothing_is_loaded(tmp_path):
    import polars as pl
    import sqlalchemy as sa
    good = _extract(tmp_path)
    env = {'CDE_VAR': str(tmp_path / 'var'), 'CDE_SITE_KEY_FILE': str(tmp_path / 'site.key')}
    cases = {  # table: (how the extract is spoiled, what the error names)
        'adt_events': (lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == 4).then(pl.lit('MRN0012345')).otherwise('patient_key')
                                                  .alias('patient_key')), "row 5: patient_key 'MRN0012345'"),
        'patients': (lambda df: df.with_columns(pl.lit(4711).alias('patient_key')), 'row 1: patient_key 4711'),
        'lab_results': (lambda df: df.with_columns(pl.col('patient_key').str.slice(0, 20)), 'row 1: patient_key'),   # a truncated key
    }
    for table, (spoil, needle) in cases.items():
        bad = tmp_path / f'bad-{table}'
        shutil.copytree(good, bad)
        f = bad / f'{table}.parquet'
        spoil(pl.read_parquet(f)).write_parquet(f)
        one_line_error(cde('ingest', 'warehouse', str(bad), env=env), str(f), needle, 'is not a surrogate key', 'nothing was loaded')
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'var' / 'cde.sqlite'}")
    with eng.connect() as c:
        assert [c.execute(sa.text(f'select count(*) from {t}')).scalar() for t in ('patients', 'adt_events', 'lab_results', 'audit_log')] == [0] * 4
    eng.dispose()
    r = cde('ingest', 'warehouse', str(good), env=env)   # the untouched extract loads
    assert r.returncode == 0 and 'loaded' in r.stdout, r.stdout + r.stderr


def _msg(app, fac, mtype, cid, body):
    return f'MSH|^~\\&|{app}|{fac}|CDE|CDE|20240105080000||{mtype}|{cid}|P|2.5\r' + body


def _feed():
    "Two senders of admissions and one of results; a resend, a held admission (no visit number), two dead letters."
    pid = lambda mrn, fac: f'PID|1||{mrn}^^^{fac}^MR||DOE^JANE||19700101|F'
    adt = lambda app, fac, cid, mrn, visit: _msg(app, fac, 'ADT^A01', cid, f'EVN|A01|20240105080000\r{pid(mrn, fac)}\rPV1|1|I|WARD_A' + '|' * 16 + visit)
    oru = lambda cid, mrn, order: _msg('LAB', 'HOSP_B', 'ORU^R01', cid, f'{pid(mrn, "HOSP_B")}\rOBR|1|{order}||BMP|||20240105073000\r'
                                                                            'OBX|1|NM|2823-3^Potassium^LN||4.1|mmol/L|3.5-5.1|N|||F')
    return [adt('EHR', 'HOSP_A', 'A1', 'M1', 'V1'), adt('EHR', 'HOSP_A', 'A1', 'M1', 'V1'), adt('EHR', 'HOSP_A', 'A2', 'M2', ''),
            adt('PAS', 'HOSP_C', 'P1', 'M3', 'V3'), oru('L1', 'M1', 'O1'), oru('L2', 'M2', 'O2'),
            _msg('LAB', 'HOSP_B', 'ORU^R01', '', 'PID|1||M4'),   # no control id
            'PID|1||M5^^^HOSP_B^MR']                              # no header


def test_ingest_status_counts_per_sender_and_type(store_url, monkeypatch):
    import polars as pl
    from cde_workbench.events import process_pending
    from cde_workbench.ids import store_messages
    from cde_workbench.ingest_status import ingest_reasons, ingest_status
    from cde_workbench.store import get_engine
    eng = get_engine(store_url)
    t0 = datetime(2024, 1, 5, 9, tzinfo=timezone.utc)
    feed = _feed()
    store_messages(eng, [(m, t0 + timedelta(minutes=i), 'test') for i, m in enumerate(feed[:-2])])
    store_messages(eng, [(m, t0, 'test') for m in feed[-2:]])
    process_pending(eng, until=3, key=b'k' * 32)   # the processor has not reached the results yet
    with eng.connect() as c: st, why = ingest_status(c), ingest_reasons(c)
    got = {(r['sending_app'], r['message_type']): (r['received'], r['stored'], r['dead_letters'], r['held'], r['processed'], r['pending'])
           for r in st.iter_rows(named=True)}
    assert got == {('', ''): (1, 0, 1, 0, 0, 0), ('EHR', 'ADT^A01'): (3, 2, 0, 1, 1, 0), ('PAS', 'ADT^A01'): (1, 1, 0, 0, 1, 0),
                   ('LAB', 'ORU^R01'): (3, 2, 1, 0, 0, 2)}
    lab = st.filter(pl.col('sending_app') == 'LAB').row(0, named=True)
    assert (lab['oldest_pending'], lab['oldest_pending_seq'], lab['sending_facility']) == (t0 + timedelta(minutes=4), 4, 'HOSP_B')
    assert why.select('sending_app', 'state', 'reason', 'count').rows() == [
        ('', 'dead_letter', 'does not start with an MSH segment (starts …)', 1),
        ('EHR', 'held', 'PV1-19 (visit number) is missing', 1),
        ('LAB', 'dead_letter', 'MSH-10 (message control id) is missing', 1)]
    assert not any('M5' in v for v in why['reason'])   # the reasons as grouped carry no identifier


def test_cde_ingest_status_prints_the_figures(tmp_path):
    feed = tmp_path / 'feed.hl7'
    feed.write_text('\n'.join(_feed()) + '\n', newline='')
    env = {'CDE_VAR': str(tmp_path / 'var')}
    r = cde('ingest', 'file', str(feed), env=env)
    assert r.returncode == 0 and '2 dead letter' in r.stdout, r.stdout + r.stderr
    r = cde('ingest', 'status', env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ['sender', 'type', 'received', 'stored', 'dead', 'letters', 'held', 'processed', 'pending', 'oldest', 'pending']
    assert lines[1].split() == ['(unreadable)', '?', '1', '0', '1', '0', '0', '0']
    assert lines[2].split() == ['EHR/HOSP_A', 'ADT^A01', '3', '2', '0', '1', '1', '0']
    assert 'EHR/HOSP_A ADT^A01: 1 × PV1-19 (visit number) is missing' in r.stdout
    assert 'LAB/HOSP_B ORU^R01: 1 × MSH-10 (message control id) is missing' in r.stdout
    assert lines[-1] == 'processor at sequence 5; nothing pending'
    r = cde('ingest', 'status', '--json', env=env)
    out = json.loads(r.stdout)
    assert out['processed_up_to'] == 5 and out['oldest_pending'] is None
    assert {(s['sending_app'], s['message_type']): s['held'] for s in out['senders']} == {('', ''): 0, ('EHR', 'ADT^A01'): 1, ('PAS', 'ADT^A01'): 0, ('LAB', 'ORU^R01'): 0}
    assert sum(s['received'] for s in out['senders']) == 8
