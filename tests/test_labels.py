"""Silent-trial labels on SQLite and PostgreSQL: cancellation as known at the run's clock, label versions after a corrected
result, censoring after the horizon, and the weekly counts, on small hand-built stores."""
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from cde_workbench.deployment import Deployment, EvaluationSpec, FeatureSet, LabelsSpec, ModelSpec, OutputSpec, SplitSpec, Task
from cde_workbench.events import process_pending
from cde_workbench.ids import store_messages
from cde_workbench.labels import extract_labels, label_versions, run_counts
from cde_workbench.monitor import label_counts, label_status, packets
from cde_workbench.pseudonyms import site_key
from cde_workbench.store import (get_engine, inference_labels, inferences, lab_order_events, lab_orders, lab_results, models, read_frame,
                                 runs, upgrade)
from cde_workbench.synth import HospitalConfig, feed_revisions, generate, hl7_feed
from cde_workbench.tasks import lab_abnormal_points
from conftest import env_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CDE = str(Path(sys.executable).parent / 'cde')
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)   # a Monday
t = lambda h: T0 + timedelta(hours=h)
DEP = Deployment(name='hgb_test', path=Path('.'), description='', task=Task('lab_abnormal', component='HGB'), features=FeatureSet(),
                 split=SplitSpec((2021,), (2022,), (2023,)), model=ModelSpec(), output=OutputSpec('silent', threshold=0.5),
                 evaluation=EvaluationSpec(bootstrap=50, seed=0), labels=LabelsSpec(72.0))


@pytest.fixture
def engine(store_url):
    eng = get_engine(store_url)
    with eng.begin() as c:
        c.execute(models.insert().values(name=DEP.name, version=1, sha256='0' * 64, path='-', feature_set_hash='f', data_fingerprint='d',
                                         code_version='c', params='{}', metrics='{}', created_at=T0))
    return eng


def _run(eng, kind='labels', as_of=None):
    rid = f'{kind}-{uuid.uuid4().hex[:12]}'
    with eng.begin() as c:
        c.execute(runs.insert().values(run_id=rid, deployment=DEP.name, kind=kind, status='succeeded', started_at=T0,
                                       parameters=json.dumps({'as_of': as_of.isoformat()} if as_of else {})))
    return rid


def _order(eng, oid, h, cancel_at=None, results=()):
    "An HL7 order placed at hour h, optionally cancelled at `cancel_at`, with (stored hour, HGB value) result versions."
    ev = lambda ctl, at: dict(order_id=oid, control=ctl, patient_key='P1', panel='CBC', event_time=t(at), stored_time=t(at), source='hl7')
    status = 'resulted' if results else ('cancelled' if cancel_at is not None else 'ordered')
    with eng.begin() as c:
        c.execute(lab_orders.insert().values(order_id=oid, patient_key='P1', panel='CBC', status=status, event_time=t(h), stored_time=t(h),
                                             source='hl7'))
        c.execute(lab_order_events.insert(), [ev('NW', h)] + ([ev('CA', cancel_at)] if cancel_at is not None else [])
                  + [ev('RE', at) for at, _ in results])
        for k, (at, value) in enumerate(results):
            c.execute(lab_results.insert().values(seq=k + 1, order_id=oid, patient_key='P1', component='HGB', loinc='718-7', value=value,
                                                  ref_low=12.0, ref_high=15.5, status='F' if k == 0 else 'C', result_time=t(at),
                                                  event_time=t(h), stored_time=t(at), source='hl7'))


def _packet(eng, oid, h, run_id):
    with eng.begin() as c:
        c.execute(inferences.insert().values(deployment=DEP.name, model_id=1, order_id=oid, patient_key='P1', prediction_time=t(h),
                                             score=0.5, threshold=0.5, output_mode='silent', n_features=3, run_id=run_id, scored_at=T0))


def test_a_cancellation_stored_after_as_of_does_not_remove_the_point(engine):
    _order(engine, 'O1', 0, cancel_at=5)
    with engine.connect() as c:
        assert lab_abnormal_points(c, 'HGB', as_of=t(4))['order_id'].to_list() == ['O1']
        assert lab_abnormal_points(c, 'HGB', as_of=t(6)).is_empty()
    _packet(engine, 'O1', 0, _run(engine, 'score', t(1)))
    with engine.connect() as c:
        assert label_status(c, DEP, t(4))['label_state'].to_list() == ['awaiting']
        assert label_status(c, DEP, t(6))['label_state'].to_list() == ['cancelled']
        assert label_status(c, DEP, t(100))['label_state'].to_list() == ['cancelled']   # cancelled, not censored


def test_a_correction_after_extraction_adds_a_label_version_and_earlier_analyses_keep_the_old_one(engine):
    _order(engine, 'O2', 0, results=[(2, 10.0), (20, 13.0)])   # final: abnormal; corrected at 20:00: normal
    _packet(engine, 'O2', 0, _run(engine, 'score', t(1)))
    r1 = _run(engine, 'labels', t(3))
    assert str(extract_labels(engine, DEP, t(3), r1)) == '1 packet labelled, 0 labels revised'
    assert extract_labels(engine, DEP, t(3), r1).labelled == 0          # again at the same clock: nothing new
    r2 = _run(engine, 'labels', t(24))
    run2 = extract_labels(engine, DEP, t(24), r2)
    assert (run2.labelled, run2.revised) == (0, 1)
    assert extract_labels(engine, DEP, t(30), _run(engine, 'labels', t(30))).revised == 0
    with engine.connect() as c:
        v = label_versions(c, DEP.name)
        assert v.select('version', 'label', 'label_time', 'stored_time').rows() == [(1, 1, t(2), t(3)), (2, 0, t(20), t(24))]
        assert (run_counts(c, r1).labelled, run_counts(c, r2).revised) == (1, 1)
        between, after = packets(c, DEP.name, t(10)), packets(c, DEP.name, t(24))
        assert (between['label'][0], between['label_version'][0]) == (1, 1)
        assert (after['label'][0], after['label_version'][0], after['first_label_time'][0]) == (0, 2, t(2))
        assert packets(c, DEP.name, t(2.5))['label'][0] is None                     # before the first extraction
        st = label_status(c, DEP, t(10))
        assert st['label_state'].to_list() == ['labelled'] and st['label'][0] == 1
    with engine.connect() as c, pytest.raises(sa.exc.DatabaseError, match='append-only'):
        with c.begin(): c.execute(inference_labels.update().values(label=1))


def test_no_result_within_the_horizon_is_censored(engine):
    _order(engine, 'O3', 0)                                  # no result yet
    _order(engine, 'O4', 1, results=[(80, 13.0)])            # its result arrives 79 h after the order
    rid = _run(engine, 'score', t(2))
    _packet(engine, 'O3', 0, rid); _packet(engine, 'O4', 1, rid)
    extract_labels(engine, DEP, t(90), _run(engine, 'labels', t(90)))
    with engine.connect() as c:
        assert label_status(c, DEP, t(71))['label_state'].to_list() == ['awaiting', 'awaiting']
        assert label_status(c, DEP, t(72.5))['label_state'].to_list() == ['censored', 'awaiting']
        st = label_status(c, DEP, t(90))
        assert st['label_state'].to_list() == ['censored', 'censored'] and st['label'].to_list() == [None, 0]
        assert st['label_delay_hours'][1] == pytest.approx(79.0)
        assert label_status(c, DEP)['label_state'].to_list() == ['censored', 'censored']   # default: the last label run's clock


def test_a_correction_stored_before_the_first_extraction_keeps_the_delay_to_the_first_result(engine):
    _order(engine, 'O8', 0, results=[(2, 10.0), (100, 13.0)])   # final at 02:00, corrected 100 h after the order
    _packet(engine, 'O8', 0, _run(engine, 'score', t(1)))
    extract_labels(engine, DEP, t(110), _run(engine, 'labels', t(110)))   # the first extraction already sees the correction
    with engine.connect() as c:
        assert label_versions(c, DEP.name).select('version', 'label', 'label_time').rows() == [(1, 0, t(100))]
        st = label_status(c, DEP, t(110))
    assert st['label_state'].to_list() == ['labelled'] and st['label_delay_hours'][0] == pytest.approx(2.0)


def test_weekly_counts_on_a_small_store(engine):
    _order(engine, 'A', 0, results=[(1, 10.0)])                  # week 1: labelled after 1 h
    _order(engine, 'B', 2, results=[(5, 13.0), (40, 11.0)])      # week 1: labelled after 3 h, then revised
    _order(engine, 'C', 3, cancel_at=4)                          # week 1: cancelled
    _order(engine, 'D', 4)                                       # week 1: censored (no result)
    _order(engine, 'E', 170, results=[(172, 14.0)])              # week 2: labelled after 2 h
    _order(engine, 'F', 200)                                     # week 2: still awaiting at 220
    rid = _run(engine, 'score', t(0))
    for oid, h in (('A', 0), ('B', 2), ('C', 3), ('D', 4), ('E', 170), ('F', 200)): _packet(engine, oid, h, rid)
    extract_labels(engine, DEP, t(10), _run(engine, 'labels', t(10)))
    extract_labels(engine, DEP, t(220), _run(engine, 'labels', t(220)))
    with engine.connect() as c: st = label_status(c, DEP)
    wk = label_counts(st)
    assert wk['week'].cast(pl.String).to_list() == ['2024-01-01', '2024-01-08']
    assert wk.select('scored', 'labelled', 'awaiting', 'cancelled', 'censored', 'revised').rows() == [(4, 2, 0, 1, 1, 1), (2, 1, 1, 0, 0, 0)]
    assert wk.select('delay_median_h', 'delay_p90_h', 'delay_max_h').rows()[0] == pytest.approx((2.0, 2.8, 3.0))
    total = label_counts(st, per_week=False)
    assert total.select('scored', 'labelled', 'delay_max_h').rows() == [(6, 3, 3.0)]


def test_labels_extracted_before_versions_become_version_one_known_from_their_runs_clock(store_url):
    eng = get_engine(store_url, migrate=False)
    upgrade(eng, '0003')
    with eng.begin() as c:
        c.execute(sa.text("INSERT INTO models (name, version, sha256, path, feature_set_hash, data_fingerprint, code_version, params, "
                          "metrics, created_at) VALUES ('hgb_test', 1, 'x', '-', 'f', 'd', 'c', '{}', '{}', :t)"), {'t': T0})
        c.execute(sa.text("INSERT INTO runs (run_id, deployment, kind, status, started_at, parameters) VALUES "
                          "('r', 'hgb_test', 'labels', 'succeeded', :t, :p)"), {'t': T0, 'p': json.dumps({'as_of': t(30).isoformat()})})
        c.execute(sa.text("INSERT INTO inferences (deployment, model_id, order_id, patient_key, prediction_time, score, threshold, "
                          "output_mode, n_features, run_id, scored_at) VALUES ('hgb_test', 1, 'O', 'P', :t, 0.5, 0.5, 'silent', 1, 'r', :t)"),
                  {'t': T0})
        c.execute(sa.text("INSERT INTO inference_labels (inference_id, label, label_time, run_id, extracted_at) VALUES (1, 1, :lt, 'r', :now)"),
                  {'lt': T0 + timedelta(hours=2) if eng.dialect.name == 'postgresql' else '2024-01-01 02:00:00.000000',
                   'now': datetime.now(timezone.utc) if eng.dialect.name == 'postgresql' else '2026-12-01 00:00:00.000000'})
    upgrade(eng)
    with eng.connect() as c:
        v = label_versions(c, 'hgb_test')
    assert v.select('inference_id', 'version', 'label', 'label_time', 'stored_time', 'run_id').rows() == [(1, 1, 1, t(2), t(30), 'r')]


def test_the_feeds_cancellations_and_corrections_reach_the_store_as_facts_with_stored_times(store_url, tmp_path, monkeypatch):
    "Through the event processor: cancellations become CA order events, corrections result versions; labels follow the clock."
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    h = generate(HospitalConfig(n_patients=40, seed=5, start='2023-10-01', cancel_rate=0.2, correction_rate=0.3))
    cancels, fixes = feed_revisions(h)
    eng = get_engine(store_url)
    store_messages(eng, [(m, ts, 'test') for ts, m in hl7_feed(h)])
    assert process_pending(eng, key=env_key()).errors == 0
    e, r = lab_order_events.c, lab_results.c
    with eng.connect() as c:
        ca = dict(c.execute(sa.select(e.order_id, e.stored_time).where(e.control == 'CA')).all())
        assert ca == dict(zip(cancels['order_id'], cancels['cancel_time']))
        status = dict(c.execute(sa.select(lab_orders.c.order_id, lab_orders.c.status).where(lab_orders.c.order_id.in_(list(ca)))).all())
        assert set(status.values()) == {'cancelled'}
        got = read_frame(c, sa.select(r.order_id, r.component, r.value, r.stored_time).where(r.status == 'C'))
        assert sorted(got.select('order_id', 'component', 'value').rows()) == sorted(fixes.select('order_id', 'component', 'value').rows())
        assert got['stored_time'].to_list() == got.join(fixes, on=['order_id', 'component'], maintain_order='left')['correction_time'].to_list()
        # a cancelled order is a point until its cancellation is stored
        oid, when = cancels['order_id'][0], cancels['cancel_time'][0]
        panel = h.orders.filter(pl.col('order_id') == oid)['panel'][0]
        comp = {'CBC': 'HGB', 'CMP': 'NA', 'MG': 'MG'}[panel]
        before = lab_abnormal_points(c, comp, as_of=when - timedelta(seconds=1))
        assert oid in before['order_id'].to_list() and oid not in lab_abnormal_points(c, comp, as_of=when)['order_id'].to_list()
        # a corrected result: the label as known before the correction rests on the final result, after it on the correction
        x = fixes.row(0, named=True)
        final = h.results.filter((pl.col('order_id') == x['order_id']) & (pl.col('component') == x['component'])).row(0, named=True)
        lab = lambda at: lab_abnormal_points(c, x['component'], as_of=at).filter(pl.col('order_id') == x['order_id']).row(0, named=True)
        assert lab(x['correction_time'] - timedelta(seconds=1))['label_time'] == final['stored_time']
        after = lab(x['correction_time'])
        assert after['label_time'] == x['correction_time']
        assert after['label'] == int(not final['ref_low'] <= x['value'] <= final['ref_high'])


def test_cde_labels_says_how_many_were_labelled_and_revised(tmp_path):
    "The labels command runs the labels notebook against the store it is given and prints what the run added and the label states."
    url = f'sqlite:///{tmp_path}/store.sqlite'
    eng = get_engine(url)
    with eng.begin() as c:
        c.execute(models.insert().values(name=DEP.name, version=1, sha256='0' * 64, path='-', feature_set_hash='f', data_fingerprint='d',
                                         code_version='c', params='{}', metrics='{}', created_at=T0))
    _order(eng, 'O5', 0, results=[(2, 10.0), (30, 13.0)])   # labelled at 10:00, corrected at 30:00
    _order(eng, 'O6', 1, cancel_at=4)
    _order(eng, 'O7', 5, results=[(20, 13.0)])
    rid = _run(eng, 'score', t(6))
    for oid, h in (('O5', 0), ('O6', 1), ('O7', 5)): _packet(eng, oid, h, rid)
    assert extract_labels(eng, DEP, t(10), _run(eng, 'labels', t(10))).labelled == 1
    deps = tmp_path / 'deployments'
    shutil.copytree(ROOT / 'deployments' / '_pipelines', deps / '_pipelines')
    (deps / DEP.name).mkdir()
    toml = (ROOT / 'deployments' / 'hgb_abnormal' / 'deployment.toml').read_text().replace('name = "hgb_abnormal"', f'name = "{DEP.name}"')
    (deps / DEP.name / 'deployment.toml').write_text(toml + '\n[labels]\nhorizon_hours = 48\n')
    env = {**os.environ, 'CDE_DATABASE_URL': url, 'CDE_DEPLOYMENTS': str(deps), 'CDE_VAR': str(tmp_path / 'var'),
           'CDE_REPORTS': str(tmp_path / 'reports'), 'CDE_SITE_KEY_FILE': str(tmp_path / 'site.key')}
    run = lambda h: subprocess.run([CDE, 'labels', DEP.name, '--as-of', t(h).isoformat()], capture_output=True, text=True, env=env,
                                   timeout=300, cwd=ROOT)
    r = run(40)
    assert r.returncode == 0, r.stderr
    assert ('1 packet labelled, 1 label revised; as of 2024-01-02 16:00 UTC, of 3 packets: 2 labelled, 0 awaiting a result, '
            '1 cancelled, 0 censored') in r.stdout, r.stdout
    with eng.connect() as c:
        assert label_versions(c, DEP.name).select('version', 'label').rows() == [(1, 1), (2, 0), (1, 0)]
