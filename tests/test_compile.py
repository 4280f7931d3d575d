"""Compiled models (23a_compile) with the pipelines training really builds: boosting's float32 densifier included,
features from the featurizer for one order at a time, and one scorer shared by threads as the scoring service uses it."""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent


def _features(n=1500, tokens=300, seed=0):
    "Sparse counts and real-valued lab columns (some NaN), shaped like the featurizer's output."
    rng = np.random.default_rng(seed)
    counts = sp.random(n, tokens, density=0.03, format='csr', random_state=seed, data_rvs=lambda k: rng.integers(1, 5, k).astype(float))
    num = np.c_[rng.normal(13.1, 1.9, n), rng.exponential(50, n), (rng.random(n) < 0.3).astype(float)]
    num[rng.random(n) < 0.05, 0] = np.nan
    X = sp.hstack([counts, sp.csr_matrix(num)], format='csr')
    y = (np.asarray(counts[:, :20].sum(1)).ravel() / 2 + np.nan_to_num(num[:, 0] - 13) + rng.normal(0, 1, n) > 1).astype(int)
    return X, y


@pytest.mark.parametrize('kind, params', [('logistic_regression', {'C': 0.1}), ('random_forest', {'n_estimators': 100, 'min_samples_leaf': 10}),
                                          ('hist_gradient_boosting', {'learning_rate': 0.1, 'max_iter': 100, 'max_leaf_nodes': 15})])
def test_training_pipelines_compile_to_scikit_learn_probabilities(kind, params):
    from cde_workbench.compile import CompiledScorer, check_compiled, compile_estimator
    from cde_workbench.train import make_model
    X, y = _features()
    est = make_model(kind, params, 0).fit(X[:1000], y[:1000])
    sc = CompiledScorer(compile_estimator(est, X.shape[1], kind), kind)
    got, want = sc.predict_proba(X[1000:]), est.predict_proba(X[1000:])
    assert np.abs(got - want).max() < 1e-12
    assert check_compiled(sc, est, X[1000:], kind)['max_abs_diff'] < 1e-12
    for i in range(1000, 1020):   # one row at a time, as the service scores
        assert np.abs(sc.predict_proba(X[i]) - est.predict_proba(X[i])).max() < 1e-12


def test_a_shared_scorer_answers_threads_alike():
    from cde_workbench.compile import CompiledScorer, compile_estimator
    from cde_workbench.train import make_model
    X, y = _features()
    est = make_model('random_forest', {'n_estimators': 50, 'min_samples_leaf': 5}, 0).fit(X[:1000], y[:1000])
    sc = CompiledScorer(compile_estimator(est, X.shape[1]))
    want = est.predict_proba(X[1000:])[:, 1]
    with ThreadPoolExecutor(8) as pool:
        got = np.array(list(pool.map(lambda i: sc.predict_proba(X[i])[0, 1], range(1000, X.shape[0]))))
    assert np.abs(got - want).max() < 1e-12


def test_a_trained_version_scores_orders_through_its_graph(tmp_path):
    "Boosting chosen by training: the registered graph scores the featurizer's one-row matrices as the bundle's estimator does."
    from conftest import env_key
    from cde_workbench.compile import load_scorer
    from cde_workbench.deployment import load_deployment
    from cde_workbench.features import load_feature_data
    from cde_workbench.registry import load_bundle
    from cde_workbench.serve import serving_model
    from cde_workbench.store import dispose_engines, get_engine
    from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
    from cde_workbench.tasks import task_points
    from cde_workbench.train import train_deployment
    from cde_workbench.warehouse import load_warehouse_extract
    write_warehouse_extract(generate(HospitalConfig(n_patients=200, seed=5)), tmp_path / 'x', env_key())
    eng = get_engine(f'sqlite:///{tmp_path}/t.sqlite')
    try:
        load_warehouse_extract(eng, tmp_path / 'x')
        d = tmp_path / 'hgb_boost'; d.mkdir()
        (d / 'deployment.toml').write_text('name = "hgb_boost"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n'
                                           '[split]\ntrain_years = [2019, 2020, 2021]\nvalidation_years = [2022]\ntest_years = [2023]\n'
                                           '[output]\nmode = "silent"\nthreshold = 0.3\nthreshold_reason = "test"\n'
                                           '[model]\ncandidates = ["hist_gradient_boosting"]\n[model.grid.hist_gradient_boosting]\nlearning_rate = [0.1]\n'
                                           '[evaluation]\nbootstrap = 50\n')
        dep = load_deployment(d)
        rec = train_deployment(eng, dep, tmp_path / 'var', progress=False)
        assert rec.params['model']['kind'] == 'hist_gradient_boosting' and rec.params['compiled']['max_abs_diff'] <= 1e-6
        bundle = load_bundle(rec)
        sc = load_scorer(rec, bundle)
        assert sc.kind == 'onnx' and sc.sha256 == rec.params['compiled']['sha256']
        # the scoring path's loader takes it as its scorer factory
        assert serving_model(eng, dep, rec.model_id, scorer_factory=load_scorer).scorer.kind == 'onnx'
        with eng.connect() as conn:
            pts = task_points(conn, dep.task).filter(pl.col('prediction_time').dt.year() == 2023).head(30)
            data = load_feature_data(conn, pts['patient_key'].unique().to_list())
        for i in range(pts.height):
            x = bundle['featurizer'].transform(pts[i], data)
            assert x.shape == (1, rec.metrics['n_features'])
            assert abs(sc.predict_proba(x)[0, 1] - bundle['estimator'].predict_proba(x)[0, 1]) < 1e-12
    finally:
        dispose_engines()

