"""Monitoring (nbs/50_monitor) on its own, on a copy of the small trained store after a silent trial: packets with their
labels, DEPLOYR's retrospective and prospective rows, the clinical team's health line and the weekly drift table, each
checked against the store's tables and the reference metrics."""
from dataclasses import replace
from datetime import date, datetime, timezone

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa
from sklearn.metrics import roc_auc_score

from cde_workbench.monitor import PACKET_SCHEMA, health, label_status, packets, performance_rows, weekly

from conftest import SMALL_DEPLOYMENT, deliver_feed, env_engine

SCORED_TO = datetime(2024, 4, 1, tzinfo=timezone.utc)
LABELLED_TO = datetime(2024, 3, 1, tzinfo=timezone.utc)   # results stored after this are not labels yet


def q(engine, sql, **kw):
    with engine.connect() as c: return c.execute(sa.text(sql), kw).all()


def run(engine, dep, kind, fn, as_of):
    from cde_workbench.schedule import run_ledger
    with run_ledger(engine, dep.name, kind, {'as_of': as_of.isoformat()}) as run_id: return fn(engine, dep, as_of, run_id)


@pytest.fixture(scope='module')
def trial(small_trained_store, tmp_path_factory):
    "A silent trial on a copy of the small store: every order to April scored, labels extracted as of March."
    from cde_workbench.deployment import load_deployment
    from cde_workbench.deploy import set_status
    from cde_workbench.labels import extract_labels
    from cde_workbench.registry import get_model
    from cde_workbench.serve import score_pending
    from cde_workbench.store import dispose_engines
    store = small_trained_store.copy(tmp_path_factory.mktemp('monitor') / 'store')
    with pytest.MonkeyPatch.context() as mp:
        store.apply(mp)
        engine = env_engine()
        deliver_feed(engine)
        dep = load_deployment(SMALL_DEPLOYMENT, store.base / 'deployments')
        with engine.connect() as c: rec = get_model(c, dep.name)
        set_status(engine, dep.name, 'silent', rec.model_id, 'test: silent trial')
        scored = run(engine, dep, 'score', score_pending, SCORED_TO).scored
        labelled = run(engine, dep, 'labels', extract_labels, LABELLED_TO).labelled
        assert 0 < labelled < scored
        yield engine, dep, rec
        dispose_engines()


def test_packets_carry_their_labels_and_no_identifiers(trial):
    engine, dep, rec = trial
    with engine.connect() as c: pk = packets(c, dep.name)
    assert pk.schema == pl.Schema(PACKET_SCHEMA) and pk['prediction_time'].is_sorted()
    assert pk.height == q(engine, 'select count(*) from inferences')[0][0] == pk['inference_id'].n_unique()
    stored = dict(q(engine, 'select inference_id, label from inference_labels order by inference_id, version'))   # the newest version wins
    assert {i: l for i, l in zip(pk['inference_id'], pk['label']) if l is not None} == stored
    assert 0 < len(stored) < pk.height
    assert not {'mrn', 'family_name', 'given_name', 'birth_date'} & set(pk.columns)


def test_performance_rows_match_the_reference_metrics(trial):
    from cde_workbench.evaluate import auroc_ci
    from cde_workbench.registry import test_predictions
    engine, dep, rec = trial
    with engine.connect() as c: retro, pro = performance_rows(c, dep)
    ev = dep.evaluation
    t = test_predictions(rec)
    assert ev.unit == 'patient'   # intervals resample patients
    assert (retro.period, retro.n) == ('retrospective', t.height) and retro.auroc == auroc_ci(t['label'].to_numpy(), t['score'].to_numpy(), ev.bootstrap, ev.seed, ev.ci,
                                                                                              clusters=t['patient_key'].to_numpy())
    assert retro.auroc.estimate == pytest.approx(roc_auc_score(t['label'], t['score']), abs=1e-12)
    # prospective: packets labelled within the horizon, each with its newest label version (label_status is tested in test_labels)
    with engine.connect() as c: st = label_status(c, dep).filter(pl.col('label_state') == 'labelled')
    newest = dict(q(engine, 'select inference_id, label from inference_labels order by inference_id, version'))
    y, s = np.array([newest[i] for i in st['inference_id']]), st['score'].to_numpy()
    assert (pro.period, pro.n) == ('prospective', len(y))
    assert pro.prevalence.estimate == pytest.approx(y.mean(), abs=1e-12)
    assert pro.auroc.estimate == pytest.approx(roc_auc_score(y, s), abs=1e-12) and pro.auroc.low <= pro.auroc.estimate <= pro.auroc.high


def test_health_counts_and_says_what_to_do(trial):
    engine, dep, rec = trial
    with engine.connect() as c: h, st = health(c, dep), label_status(c, dep)
    n, flagged, last = q(engine, """select count(*), sum(case when i.score >= i.threshold then 1 else 0 end), max(i.prediction_time) from inferences i""")[0]
    labelled = int((st['label_state'] == 'labelled').sum())
    assert (h.status, h.model, h.packets, h.labelled, h.flagged) == ('silent', f'{rec.name} v{rec.version}', n, labelled, flagged)
    assert h.last_prediction == datetime.fromisoformat(str(last)).strftime('%Y-%m-%d %H:%M UTC')
    pro, retro = h.prospective_auroc, h.retrospective_auroc
    if pro.high < retro.low: assert h.message.startswith('Attention: prospective AUROC')
    else: assert h.message == f'Performing as expected: prospective AUROC {pro.estimate:.2f} against retrospective {retro.estimate:.2f}.'


def test_weekly_table_adds_up(trial):
    engine, dep, rec = trial
    with engine.connect() as c:
        w, pk = weekly(c, dep.name), packets(c, dep.name)
        assert weekly(c, 'nothing_scored').is_empty()
    assert w['scored'].sum() == pk.height and w['week'].is_sorted() and w['week'].n_unique() == w.height
    assert all(d.weekday() == 0 for d in w['week'])   # weeks start on Monday
    by_week = pk.with_columns(week=pl.col('prediction_time').dt.date().map_elements(lambda d: date.fromordinal(d.toordinal() - d.weekday()), return_dtype=pl.Date))
    for row in w.iter_rows(named=True):
        part = by_week.filter(pl.col('week') == row['week'])
        assert row['scored'] == part.height and row['mean_score'] == pytest.approx(part['score'].mean())
        labels = part['label'].drop_nulls()
        assert (row['abnormal_rate'] is None) if labels.is_empty() else row['abnormal_rate'] == pytest.approx(labels.mean())


def test_before_labels_and_before_a_model(silent_store):
    from cde_workbench.serve import score_pending
    engine, dep, rec = silent_store
    n = run(engine, dep, 'score', score_pending, LABELLED_TO).scored
    with engine.connect() as c:
        retro, pro = performance_rows(c, dep)
        h = health(c, dep)
    assert (pro.n, pro.auroc, pro.note) == (0, None, 'no labelled cases yet') and retro.auroc is not None
    assert h.message.startswith(f'Silent trial collecting labels: 0 labelled of {n} scored orders') and h.prospective_auroc is None
    with engine.connect() as c: h = health(c, replace(dep, name='unregistered'))
    assert (h.status, h.packets, h.message) == ('not registered', 0, 'No model is deployed yet.')
