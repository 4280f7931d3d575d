"""Feature store: online vectors equal offline rows (500 pairs, around merges and corrected results), the leakage guard,
the on-disk cache, definitions and their hashes, and scikit-learn conventions."""
from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from cde_workbench.config import ConfigError, SchemaError
from cde_workbench.events import process_pending
from cde_workbench.deployment import FeatureSet
from cde_workbench.feature_store import check_features_point_in_time, offline_matrix, online_vector
from cde_workbench.features import FeatureData, load_feature_data
from cde_workbench.featurizer import SKLEARN_EXPECTED_FAILED_CHECKS, CountFeaturizer
from cde_workbench.ids import store_messages
from cde_workbench.pseudonyms import site_key
from cde_workbench.store import dispose_engines, get_engine, lab_results, patient_links, read_frame
from cde_workbench.synth import HospitalConfig, generate, hl7_feed, write_warehouse_extract
from cde_workbench.tasks import LeakageError, lab_abnormal_points
from cde_workbench.warehouse import load_warehouse_extract
from conftest import env_key  # noqa: E402

T = pl.Datetime('us', 'UTC')


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    "A synthetic hospital: warehouse extract for the retrospective months, then a noisy HL7 feed (late messages, merged MRNs),"
    " plus corrected versions of some results stored hours later."
    d = tmp_path_factory.mktemp('features')
    mp = pytest.MonkeyPatch(); mp.setenv('CDE_SITE_KEY_FILE', str(d / 'site.key'))
    h = generate(HospitalConfig(n_patients=250, seed=11, start='2023-01-01', cutover='2023-08-01', end='2024-01-15',
                                merge_rate=0.5, late_rate=0.05, drift_component=None))
    write_warehouse_extract(h, d / 'x', env_key())
    eng = get_engine(f'sqlite:///{d}/store.sqlite'); load_warehouse_extract(eng, d / 'x')
    feed = hl7_feed(h)
    store_messages(eng, [(m, t, 'live') for t, m in feed])
    process_pending(eng, key=env_key())
    r = lab_results.c
    with eng.begin() as c:   # corrections: a new version with another value, resulted and stored 2-30 h after the original
        rows = read_frame(c, sa.select(lab_results).where(r.component.in_(('HGB', 'K')), r.status == 'F').order_by(r.id))
        pick = rows.sample(60, seed=3)
        rng = np.random.default_rng(3)
        new = []
        for row, dh in zip(pick.iter_rows(named=True), rng.uniform(2, 30, len(pick))):
            later = row['stored_time'] + timedelta(hours=float(dh))
            new.append({**{k: row[k] for k in ('order_id', 'patient_key', 'component', 'loinc', 'unit', 'ref_low', 'ref_high', 'event_time')},
                        'seq': 10_000_000 + row['id'], 'value': row['value'] * 1.3, 'abnormal_flag': None, 'status': 'C',
                        'result_time': later, 'stored_time': later, 'source': 'test'})
        c.execute(lab_results.insert(), new)
    yield eng, pick
    dispose_engines(); mp.undo()


def _pairs(conn, pick: pl.DataFrame, n: int = 500) -> pl.DataFrame:
    "500 (patient, time) pairs: around each merge (both keys, before and after the link was stored), around each correction, and order times."
    links = read_frame(conn, sa.select(patient_links), {'patient_key': pl.String, 'resolved_key': pl.String, 'stored_time': T})
    assert links.height >= 5, 'the feed should merge some records'
    rows = []
    for k, r, t in links.select('patient_key', 'resolved_key', 'stored_time').iter_rows():
        for key in (k, r):
            for dt in (-timedelta(minutes=1), timedelta(0), timedelta(seconds=1), timedelta(hours=3)): rows.append((key, t + dt))
    for key, t in pick.select('patient_key', 'stored_time').iter_rows():   # around the original result being stored
        rows += [(key, t - timedelta(seconds=1)), (key, t), (key, t + timedelta(hours=1))]
    corr = read_frame(conn, sa.select(lab_results.c.patient_key, lab_results.c.stored_time).where(lab_results.c.status == 'C'), {'patient_key': pl.String, 'stored_time': T})
    for key, t in corr.iter_rows(): rows += [(key, t - timedelta(microseconds=1)), (key, t), (key, t + timedelta(hours=2))]
    special = pl.DataFrame(rows, schema={'patient_key': pl.String, 'prediction_time': T}, orient='row').unique(maintain_order=True)
    special = special.sample(min(special.height, n // 2), seed=1)
    orders = lab_abnormal_points(conn, 'HGB').select('patient_key', 'prediction_time')
    rest = orders.sample(n - special.height, seed=2)
    return pl.concat([special, rest]).with_columns(pl.col('prediction_time').cast(T))


def test_online_vectors_equal_offline_rows_for_500_pairs(store):
    eng, pick = store
    with eng.connect() as c:
        pairs = _pairs(c, pick)
        data = load_feature_data(c)
        train = lab_abnormal_points(c, 'HGB').filter(pl.col('prediction_time') < pl.datetime(2023, 9, 1, time_zone='UTC'))
        fz = CountFeaturizer(numeric_labs=('HGB', 'K')).fit(train, data)
        offline = fz.transform(pairs, data)
        diff = []
        for i, (key, t) in enumerate(pairs.iter_rows()):
            live = online_vector(c, fz, key, t)
            if (live != offline[i]).nnz: diff.append((key, t))
    assert pairs.height == 500 and not diff, f'{len(diff)} online vectors differ from offline rows, e.g. {diff[:3]}'
    # the pairs really exercise merges and corrections
    names = fz.feature_names_
    assert offline[:, names.index('num:HGB:missing')].sum() < 500 and offline.nnz > 500 * 5
    assert data.link_frame().height >= 5 and (data.events.filter(kind='lab')['valid_until'].is_not_null()).sum() >= 50


def test_merges_and_corrections_count_from_when_they_were_stored(store):
    eng, pick = store
    with eng.connect() as c:
        data = load_feature_data(c)
        links = data.link_frame()
        ev = data.events
        k, r, ts = next(row for row in links.iter_rows() if ev.filter(pl.col('patient_key') == row[0]).height and ev.filter(pl.col('patient_key') == row[1]).height)
        fz = CountFeaturizer(numeric_labs=('HGB',)).fit(lab_abnormal_points(c, 'HGB'), data)
        pts = pl.DataFrame({'patient_key': [r, r], 'prediction_time': [ts - timedelta(seconds=1), ts]}, schema={'patient_key': pl.String, 'prediction_time': T})
        X = fz.transform(pts, data)
    # the surviving record gains the retired record's history exactly when the merge was stored
    assert X[1].nnz > X[0].nnz
    # a corrected HGB replaces the last value exactly when the correction was stored (and not a microsecond before)
    corr = data.events.filter(pl.col('code') == 'HGB', pl.col('valid_until').is_not_null())
    at = pl.concat([corr.select('patient_key', prediction_time=pl.col('valid_until') - pl.duration(microseconds=1)),
                    corr.select('patient_key', prediction_time=pl.col('valid_until'))])
    last = fz.transform(at, data)[:, fz.feature_names_.index('num:HGB:last')].toarray().ravel()
    before, after = last[:corr.height], last[corr.height:]
    assert np.isclose(after, before * 1.3).sum() >= 10, (before[:5], after[:5])


def test_leaky_features_are_caught_and_correct_ones_pass(store):
    eng, _ = store
    with eng.connect() as c:
        pts = lab_abnormal_points(c, 'HGB').sample(300, seed=4)
        data = load_feature_data(c)
        fz = CountFeaturizer().fit(pts, data)
        assert check_features_point_in_time(c, fz, pts, fz.transform(pts, data), n=40) == 40
        # a pipeline that trusts event time alone (diagnoses are coded at discharge, so they leak into the stay)
        leaky = FeatureData(data.patients, data.events.with_columns(stored_time=pl.col('event_time')), data.links)
        with pytest.raises(LeakageError, match='not known at the prediction time'):
            check_features_point_in_time(c, fz, pts, fz.transform(pts, leaky), n=40)


def test_offline_matrix_cache_reused_and_recomputed(store, tmp_path):
    eng, _ = store
    with eng.connect() as c:
        pts = lab_abnormal_points(c, 'K').head(400); data = load_feature_data(c)
    fz = CountFeaturizer(numeric_labs=('K',)).fit(pts, data)
    cache = tmp_path / 'var' / 'features'   # the workspace's feature cache
    a = offline_matrix(fz, pts, data, cache)
    assert not a.from_cache and a.path.is_relative_to(cache / fz.definition_hash())
    b = offline_matrix(fz, pts, FeatureData(data.patients, data.events.sample(fraction=1.0, shuffle=True, seed=1), data.links), cache)
    assert b.from_cache and b.path == a.path and (b.X != a.X).nnz == 0          # same content in another order: reused
    changed = FeatureData(data.patients, data.events.slice(1), data.links)
    c1 = offline_matrix(fz, pts, changed, cache)
    assert not c1.from_cache and c1.path != a.path and c1.path.parent == a.path.parent   # data changed: recomputed
    d = offline_matrix(fz, pts.head(399), data, cache)
    assert not d.from_cache and d.path != a.path and d.X.shape[0] == 399          # points changed: recomputed
    assert 'order_id' in pts.columns and offline_matrix(fz, pts.drop('order_id'), data, cache).path != a.path   # own orders change rows: another key
    fz2 = CountFeaturizer(numeric_labs=('K',), lab_days=7).fit(pts, data)
    assert offline_matrix(fz2, pts, data, cache).path.parent != a.path.parent           # definition changed: another folder


def test_feature_set_definitions_and_errors():
    base = FeatureSet()
    assert CountFeaturizer().definition_hash() == base.definition_hash()
    for change in ({'lab_days': 7}, {'medication_days': None}, {'diagnoses': False}, {'lab_bins': 4}, {'numeric_labs': ['NA']}):
        assert FeatureSet.from_dict(change).definition_hash() != base.definition_hash(), change
    fz = CountFeaturizer.from_feature_set(FeatureSet.from_dict({'numeric_labs': ['HGB'], 'lab_days': 7}))
    assert fz.definition_hash() == FeatureSet(lab_days=7, numeric_labs=('HGB',)).definition_hash()
    with pytest.raises(ConfigError, match="'vitals_days'.*tables"): FeatureSet.from_dict({'vitals_days': 3})
    with pytest.raises(ConfigError, match="'XYZ'"): CountFeaturizer(numeric_labs=('XYZ',)).definition_hash()
    with pytest.raises(SchemaError, match='prediction_time'):
        CountFeaturizer().fit(pl.DataFrame({'patient_key': ['a']}), FeatureData(pl.DataFrame(), pl.DataFrame()))
    with pytest.raises(SchemaError, match='feature data missing'):
        CountFeaturizer().fit(pl.DataFrame({'patient_key': ['a'], 'prediction_time': [None]}, schema={'patient_key': pl.String, 'prediction_time': T}).drop_nulls())


def test_in_a_pipeline_with_data_in_the_constructor_and_saved_with_skops(store):
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler
    eng, _ = store
    with eng.connect() as c:
        pts = lab_abnormal_points(c, 'HGB').drop_nulls('label'); data = load_feature_data(c)
    pipe = make_pipeline(CountFeaturizer(numeric_labs=('HGB',), data=data), MaxAbsScaler(), LogisticRegression(max_iter=1000))
    pipe.fit(pts, pts['label'].to_numpy())
    p = pipe.predict_proba(pts)[:, 1]
    assert p.shape == (pts.height,) and 0 < p.min() < p.max() < 1
    fz = CountFeaturizer(numeric_labs=('HGB',)).fit(pts, data)
    blob = sio.dumps(fz)
    back = sio.loads(blob, trusted=sio.get_untrusted_types(data=blob))
    assert back.fitted_hash() == fz.fitted_hash() and (back.transform(pts, data) != fz.transform(pts, data)).nnz == 0


def _checks():
    from sklearn.utils.estimator_checks import parametrize_with_checks
    return parametrize_with_checks([CountFeaturizer()], expected_failed_checks=lambda est: SKLEARN_EXPECTED_FAILED_CHECKS)


@_checks()
def test_sklearn_conventions(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        check(estimator)


def test_events_in_any_order_give_the_same_matrix(store):
    "Events straight from a file (not grouped by patient in time order) are sorted once by the transform: same rows."
    eng, _ = store
    with eng.connect() as c:
        pts = lab_abnormal_points(c, 'HGB').sample(400, seed=7); data = load_feature_data(c)   # 400 of the store's ~500 HGB points
    fz = CountFeaturizer(numeric_labs=('HGB', 'K')).fit(pts, data)
    grouped = fz.transform(pts, data)
    for seed in (1, 2):
        shuffled = FeatureData(data.patients, data.events.sample(fraction=1.0, shuffle=True, seed=seed), data.links)
        X = fz.transform(pts, shuffled)
        assert (X != grouped).nnz == 0 and X.nnz == grouped.nnz


def test_the_online_row_path_reads_the_same_on_both_backends(store_url):
    "load_point_history's bound, expanding and UNION queries on SQLite and PostgreSQL: a merge, a correction, an own order."
    from datetime import datetime, timezone
    from cde_workbench.features import load_point_history
    from cde_workbench.store import diagnoses, medication_orders, patients
    t = lambda d, h=0: datetime(2024, 1, d, h, tzinfo=timezone.utc)
    eng = get_engine(store_url)
    src = {'source': 'test'}
    lab = {**src, 'order_id': 'O1', 'patient_key': 'A', 'component': 'HGB', 'loinc': '718-7', 'event_time': t(3)}
    with eng.begin() as c:
        c.execute(patients.insert(), [{**src, 'patient_key': k, 'birth_year': 1950, 'sex': 'F', 'race_ethnicity': 'Asian', 'stored_time': t(1)} for k in 'ABR'])
        c.execute(patient_links.insert(), [{'patient_key': 'R', 'resolved_key': 'A', 'stored_time': t(7)}])
        c.execute(diagnoses.insert(), [{**src, 'patient_key': k, 'icd10': code, 'event_time': t(1), 'stored_time': t(2)} for k, code in (('A', 'I10'), ('B', 'E11'))])
        c.execute(medication_orders.insert(), [{**src, 'patient_key': 'R', 'med_code': 'ASPIRIN', 'event_time': t(4), 'stored_time': t(4)}])
        c.execute(lab_results.insert(), [{**lab, 'seq': 1, 'value': 9.0, 'status': 'F', 'result_time': t(3), 'stored_time': t(3)},
                                         {**lab, 'seq': 2, 'value': 13.0, 'status': 'C', 'result_time': t(6), 'stored_time': t(6)},
                                         {**lab, 'seq': 3, 'order_id': 'O2', 'value': 11.0, 'status': 'F', 'event_time': t(5), 'result_time': t(5), 'stored_time': t(5)}])
    points = pl.DataFrame({'patient_key': ['A', 'A', 'R', 'R', 'B'], 'prediction_time': [t(5), t(8), t(5), t(8), t(8)]}, schema={'patient_key': pl.String, 'prediction_time': T})
    with eng.connect() as c:
        data = load_feature_data(c)
        fz = CountFeaturizer(numeric_labs=('HGB',)).fit(points, data)
        offline = fz.transform(points, data)
        for i, (key, when) in enumerate(points.iter_rows()):
            assert (online_vector(c, fz, key, when) != offline[i]).nnz == 0, (key, when)
        h = load_point_history(c, 'R', t(8))
        own = online_vector(c, fz, 'A', t(8), 'O1')   # the corrected O1 result left out: the last HGB is O2's
    assert (h.who, h.members) == ('A', ('A', 'R'))
    assert sorted((k, code, v) for k, code, v, *_ in h.events) == [('dx', 'I10', None), ('lab', 'HGB', 11.0), ('lab', 'HGB', 13.0), ('med', 'ASPIRIN', None)]
    assert own[0, fz.feature_names_.index('num:HGB:last')] == 11.0
    dispose_engines()
