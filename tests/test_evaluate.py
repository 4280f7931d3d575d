"""Evaluation figures against their reference implementations (scikit-learn, statsmodels, dcurves, fairlearn)
on the same inputs, on simulated data with a known truth, and through the real `cde evaluate` command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import statsmodels.api as sm
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

from cde_workbench.config import PipelineError
from cde_workbench.evaluate import (CLIP, METRICS, Resamples, auroc_by_feature_count, bootstrap_indices, bootstrap_strata,
                                    evaluate_predictions)

CDE = str(Path(sys.executable).parent / 'cde')
ROOT = Path(__file__).resolve().parent.parent
SCHEMA_TOP = {'n', 'prevalence', 'metrics', 'net_benefit', 'subgroups'}


def _x(p): return logit(np.clip(p, CLIP, 1 - CLIP))


def reference(y, p, t, only=None):
    "Every figure (or the one named `only`) from the reference implementations."
    y, p = np.asarray(y), np.asarray(p)
    tn, fp, fn, tp = confusion_matrix(y, (p >= t).astype(int), labels=[0, 1]).ravel()
    x = _x(p)
    figures = {'auroc': lambda: roc_auc_score(y, p), 'average_precision': lambda: average_precision_score(y, p),
               'sensitivity': lambda: tp / (tp + fn), 'specificity': lambda: tn / (tn + fp),
               'ppv': lambda: tp / (tp + fp) if tp + fp else None, 'npv': lambda: tn / (tn + fn) if tn + fn else None,
               'brier': lambda: brier_score_loss(y, p),
               'calibration_intercept': lambda: sm.GLM(y, np.ones(len(y)), family=sm.families.Binomial(), offset=x).fit(tol=1e-14).params[0],
               'calibration_slope': lambda: sm.Logit(y, sm.add_constant(x)).fit(disp=0, method='newton', tol=1e-14).params[1]}
    return figures[only]() if only else {k: f() for k, f in figures.items()}


def data(n, seed, ties=False, extremes=False, prevalence_shift=0.0):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < expit(rng.normal(-1 + prevalence_shift, 1, n))).astype(int)
    p = expit(rng.normal(2 * y - 1.5, 1.3))
    if ties: p = np.round(p, 2)
    if extremes: p[:5] = 0.0; p[5:10] = 1.0   # a tree model's hard zeros and ones
    return y, p


@pytest.mark.parametrize('ties,extremes,t', [(False, False, 0.5), (True, False, 0.3), (True, True, 0.2), (False, True, 0.07)])
def test_point_estimates_equal_references(ties, extremes, t):
    y, p = data(1500, 1 + ties + 2 * extremes, ties, extremes)
    r = evaluate_predictions(y, p, threshold=t, n_boot=20)
    ref = reference(y, p, t)
    for k in METRICS:
        assert abs(r['metrics'][k]['estimate'] - ref[k]) < 1e-9, (k, r['metrics'][k]['estimate'], ref[k])
    assert r['n'] == len(y) and r['prevalence'] == y.mean()


def test_net_benefit_equals_dcurves():
    import dcurves
    y, p = data(800, 4, ties=True)
    ts = [0.0, 0.01, 0.05, 0.1, 0.23, 0.5, 0.9, 0.99]
    r = evaluate_predictions(y, p, nb_thresholds=ts, n_boot=10)
    d = dcurves.dca(data=pd.DataFrame({'y': y, 'm': p}), outcome='y', modelnames=['m'], thresholds=ts)
    assert [row['threshold'] for row in r['net_benefit']] == ts
    assert np.allclose([row['model'] for row in r['net_benefit']], d[d.model == 'm'].net_benefit, atol=1e-9, rtol=0)
    assert np.allclose([row['treat_all'] for row in r['net_benefit']], d[d.model == 'all'].net_benefit, atol=1e-9, rtol=0)
    assert (d[d.model == 'none'].net_benefit == 0).all()


def test_every_resample_equals_a_reference_loop_hence_the_same_interval():
    y, p = data(600, 5, ties=True, extremes=True)
    t, B = 0.3, 60
    idx = bootstrap_indices(len(y), B, seed=9)
    boot = bootstrap_strata(y, p, idx, threshold=t)[0]['boot']
    loop = {k: [] for k in METRICS}
    for i in idx:
        ref = reference(y[i], p[i], t)
        for k in METRICS: loop[k].append(np.nan if ref[k] is None else ref[k])
    for k in METRICS:
        tol = 1e-8 if k.startswith('calibration') else 1e-12
        assert np.allclose(boot[k], loop[k], atol=tol, rtol=0, equal_nan=True), k
        assert np.allclose(np.quantile(boot[k], [0.025, 0.975]), np.quantile(loop[k], [0.025, 0.975]), atol=tol, rtol=0), k
    # the streamed resamples are the same indices
    streamed = bootstrap_strata(y, p, Resamples(len(y), B, 9), threshold=t)[0]['boot']
    assert all(np.array_equal(streamed[k], boot[k], equal_nan=True) for k in METRICS)
    # and evaluate_predictions reports those percentiles
    r = evaluate_predictions(y, p, threshold=t, n_boot=B, seed=9)
    for k in METRICS:
        assert np.allclose(r['metrics'][k]['ci'], np.quantile(np.asarray(loop[k])[np.isfinite(loop[k])], [0.025, 0.975]), atol=1e-8, rtol=0), k


def test_one_class_resamples_are_dropped():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0]); p = np.linspace(0.1, 0.8, 8)
    idx = bootstrap_indices(len(y), 200, seed=1)
    boot = bootstrap_strata(y, p, idx)[0]['boot']
    one_class = np.array([y[i].min() == y[i].max() for i in idx])
    assert one_class.any() and np.isnan(boot['auroc'][one_class]).all() and np.isfinite(boot['auroc'][~one_class]).all()
    assert np.isfinite(boot['brier']).all()   # the Brier score needs no second class
    assert np.allclose(boot['auroc'][~one_class], [roc_auc_score(y[i], p[i]) for i in idx[~one_class]], atol=1e-12)


def test_subgroups_equal_fairlearn_and_small_groups_are_suppressed():
    from fairlearn.metrics import MetricFrame
    y, p = data(3000, 6, ties=True)
    rng = np.random.default_rng(6)
    sex = rng.choice(['F', 'M'], len(y))
    band = rng.choice(['18-39', '40-64', '65+', '100+'], len(y), p=[0.3, 0.4, 0.29, 0.01])
    band[(band == '65+') & (y == 1)] = '40-64'   # '65+' has no positive case: class-dependent figures undefined there
    t = 0.4
    # min_events=0: show groups whatever their class counts, to check the undefined figures of a one-class group
    r = evaluate_predictions(y, p, threshold=t, groups={'sex': sex, 'age band': band}, n_boot=50, min_group_size=40, min_events=0)
    by_default = evaluate_predictions(y, p, threshold=t, groups={'age band': band}, n_boot=20, min_group_size=40)['subgroups']['age band']
    assert by_default['65+'] == {'n': int((band == '65+').sum()), 'suppressed': True, 'reason': 'fewer than 10 cases in a class'}
    assert 'metrics' in by_default['40-64']
    fns = {k: (lambda k: lambda yt, yp: reference(yt, yp, t, k))(k) for k in METRICS}
    for col, values in (('sex', sex), ('age band', band)):
        frame = MetricFrame(metrics={k: fns[k] for k in ('brier', 'ppv', 'npv', 'specificity')}, y_true=y, y_pred=p, sensitive_features=values)
        sizes = pd.Series(values).value_counts()
        assert set(r['subgroups'][col]) == set(sizes.index)
        for v, g in r['subgroups'][col].items():
            assert g['n'] == sizes[v]
            if sizes[v] < 40:
                assert g == {'n': int(sizes[v]), 'suppressed': True, 'reason': 'fewer than 40 cases'}
                continue
            for k in ('brier', 'ppv', 'npv', 'specificity'):
                assert abs(g['metrics'][k]['estimate'] - frame.by_group.loc[v, k]) < 1e-9, (col, v, k)
            m = values == v
            if y[m].min() == y[m].max():
                for k in ('auroc', 'average_precision', 'sensitivity', 'calibration_slope', 'calibration_intercept'):
                    assert g['metrics'][k]['estimate'] is None and g['metrics'][k]['ci'] == [None, None] and 'undefined' in g['metrics'][k]['reason']
            else:
                full = MetricFrame(metrics=fns, y_true=y[m], y_pred=p[m], sensitive_features=values[m])
                for k in METRICS:
                    assert abs(g['metrics'][k]['estimate'] - full.by_group.loc[v, k]) < 1e-9, (col, v, k)
                    assert g['metrics'][k]['ci'][0] <= g['metrics'][k]['estimate'] <= g['metrics'][k]['ci'][1] or k == 'average_precision'
    assert r['subgroups']['age band']['100+'].get('suppressed')
    assert r['subgroups']['age band']['65+']['metrics']['auroc']['estimate'] is None
    json.dumps(r, allow_nan=False)


def test_subgroup_resamples_are_the_whole_populations_resamples():
    "A subgroup's figure in resample b is computed on the cases of resample b that fall in the subgroup."
    y, p = data(500, 7)
    g = (np.arange(len(y)) % 3 == 0).astype(int)
    idx = bootstrap_indices(len(y), 15, seed=2)
    res = bootstrap_strata(y, p, idx, g, threshold=0.5)
    for s in (0, 1):
        for b, i in enumerate(idx):
            j = i[g[i] == s]
            assert abs(res[s]['boot']['auroc'][b] - roc_auc_score(y[j], p[j])) < 1e-12
            assert abs(res[s]['boot']['brier'][b] - brier_score_loss(y[j], p[j])) < 1e-12


def test_auroc_by_feature_count():
    rng = np.random.default_rng(8)
    n = 4000
    nf = rng.poisson(20, n)
    y = rng.integers(0, 2, n)
    s = rng.normal(y * (0.2 + nf / 20), 1)   # more features, better discrimination
    rows = auroc_by_feature_count(y, s, nf, bins=4, n_boot=100, seed=1)
    edges = np.unique(np.quantile(nf, np.linspace(0, 1, 5)))
    assert [r['lower'] for r in rows] == list(edges[:-1]) and rows[-1]['upper'] == edges[-1]
    assert sum(r['n'] for r in rows) == n
    for k, r in enumerate(rows):
        m = (nf >= edges[k]) & ((nf < edges[k + 1]) if k < len(rows) - 1 else (nf <= edges[k + 1]))
        assert r['n'] == m.sum() and r['min_features'] == nf[m].min() and r['max_features'] == nf[m].max()
        assert abs(r['auroc']['estimate'] - roc_auc_score(y[m], s[m])) < 1e-12
        assert r['auroc']['ci'][0] < r['auroc']['estimate'] < r['auroc']['ci'][1]
    assert rows[0]['auroc']['estimate'] < rows[-1]['auroc']['estimate']
    fixed = auroc_by_feature_count(y, s, nf, bins=[0, 10, 15, 100], n_boot=50, min_group_size=100)
    assert fixed[0]['n'] == (nf < 10).sum() and fixed[0].get('suppressed') and 'auroc' in fixed[2]
    with pytest.raises(PipelineError, match='outside the bin edges'): auroc_by_feature_count(y, s, nf, bins=[10, 20])


# ---- simulated data with a known truth

def test_binormal_auroc_truth():
    rng = np.random.default_rng(10)
    d = 1.2
    y = rng.integers(0, 2, 20000)
    s = expit(rng.normal(y * d, 1) - 0.6)   # monotone transform: AUROC unchanged
    r = evaluate_predictions(y, s, n_boot=400, seed=3)
    lo, hi = r['metrics']['auroc']['ci']
    assert lo < norm.cdf(d / np.sqrt(2)) < hi and hi - lo < 0.02


def test_calibrated_and_miscalibrated_truth():
    rng = np.random.default_rng(11)
    n = 20000
    eta = rng.normal(-1, 1.5, n)
    y = (rng.uniform(size=n) < expit(eta)).astype(int)
    calibrated = evaluate_predictions(y, expit(eta), n_boot=300, seed=1)['metrics']
    assert calibrated['calibration_slope']['ci'][0] < 1 < calibrated['calibration_slope']['ci'][1]
    assert calibrated['calibration_intercept']['ci'][0] < 0 < calibrated['calibration_intercept']['ci'][1]
    # overconfident model: logit p = 2·eta, so logit P(y=1) = 0.5·logit p: slope 0.5
    over = evaluate_predictions(y, expit(2 * eta), n_boot=300, seed=1)['metrics']
    assert over['calibration_slope']['ci'][0] < 0.5 < over['calibration_slope']['ci'][1]
    # risks shifted up by 0.8 on the logit scale: logit P(y=1) = -0.8 + logit p, intercept -0.8
    shifted = evaluate_predictions(y, expit(eta + 0.8), n_boot=300, seed=1)['metrics']
    assert shifted['calibration_intercept']['ci'][0] < -0.8 < shifted['calibration_intercept']['ci'][1]
    assert shifted['calibration_slope']['ci'][0] < 1 < shifted['calibration_slope']['ci'][1]


def test_interval_coverage():
    "Over repeated samples the 95% intervals cover the truth about 95% of the time (AUROC and calibration slope)."
    d, reps, cover_auc, cover_slope = 1.0, 40, 0, 0
    truth = norm.cdf(d / np.sqrt(2))
    for k in range(reps):
        rng = np.random.default_rng(100 + k)
        y = rng.integers(0, 2, 400)
        eta = (y - 0.5) * d   # binormal on the logit scale with equal variances
        s = rng.normal(eta, 1)
        # the calibrated risk of the binormal model: logit P(y=1 | s) = d·s for this symmetric design
        p = expit(d * s)
        r = bootstrap_strata(y, p, Resamples(len(y), 300, k), which=('auroc', 'calibration_slope'))[0]
        lo, hi = np.quantile(r['boot']['auroc'], [0.025, 0.975]); cover_auc += lo < truth < hi
        lo, hi = np.nanquantile(r['boot']['calibration_slope'], [0.025, 0.975]); cover_slope += lo < 1 < hi
    # Binomial(40, 0.95): P(X <= 33) < 0.01
    assert cover_auc >= 34 and cover_slope >= 34, (cover_auc, cover_slope)


# ---- bad input

@pytest.mark.parametrize('y,p,kw,msg', [
    ([0, 1, 1], [0.1, 0.2], {}, 'same length'),
    ([], [], {}, 'no cases'),
    ([1, 1, 1], [0.1, 0.2, 0.3], {}, 'one class'),
    ([0, 1, 2], [0.1, 0.2, 0.3], {}, '0 or 1'),
    ([0, 1, np.nan], [0.1, 0.2, 0.3], {}, '0 or 1'),
    ([0, 1, 1], [0.1, np.nan, 0.3], {}, 'NaN'),
    ([0, 1, 1], [0.1, 0.2, 1.3], {}, 'in [0, 1]'),
    ([0, 1, 1], [-0.1, 0.2, 0.3], {}, 'in [0, 1]'),
    ([0, 1, 1], [0.1, 0.2, 0.3], {'threshold': 2}, 'threshold'),
    ([0, 1, 1], [0.1, 0.2, 0.3], {'nb_thresholds': [0.1, 1.0]}, 'net-benefit thresholds'),
    ([0, 1, 1], [0.1, 0.2, 0.3], {'groups': {'sex': ['F', 'M']}}, "group column 'sex' has 2 values"),
])
def test_bad_input(y, p, kw, msg):
    with pytest.raises(PipelineError, match=None) as e: evaluate_predictions(y, p, n_boot=5, **kw)
    assert msg in str(e.value), (msg, str(e.value))


def test_undefined_values_are_null_with_a_reason():
    y, p = data(300, 12)
    r = evaluate_predictions(y, np.minimum(p, 0.6), threshold=0.7, n_boot=20)
    assert r['metrics']['ppv'] == {'estimate': None, 'ci': [None, None], 'reason': 'undefined: no case scored at or above the threshold'}
    assert r['metrics']['sensitivity']['estimate'] == 0 and abs(r['metrics']['npv']['estimate'] - (1 - y.mean())) < 1e-12
    r = evaluate_predictions(y, p, threshold=0.0, n_boot=20)
    assert r['metrics']['npv']['estimate'] is None and r['metrics']['sensitivity']['estimate'] == 1


# ---- the command line

def cde(*args, cwd=None):
    return subprocess.run([CDE, *args], capture_output=True, text=True, timeout=180, cwd=cwd or ROOT, env=os.environ.copy())


def check_schema(r):
    assert SCHEMA_TOP <= set(r)
    assert set(r['metrics']) == set(METRICS)
    for m in r['metrics'].values(): assert {'estimate', 'ci'} <= set(m) and len(m['ci']) == 2
    for row in r['net_benefit']: assert set(row) == {'threshold', 'model', 'treat_all', 'model_ci', 'treat_all_ci', 'valid_resamples'}
    for table in r['subgroups'].values():
        for g in table.values():
            assert set(g) in ({'n', 'metrics'}, {'n', 'suppressed', 'reason'})


@pytest.fixture(scope='module')
def predictions(tmp_path_factory):
    d = tmp_path_factory.mktemp('preds')
    y, p = data(2000, 13, ties=True)
    rng = np.random.default_rng(13)
    df = pl.DataFrame({'outcome': y, 'risk': p, 'sex': rng.choice(['F', 'M'], len(y)), 'site': rng.choice(['A', 'B', 'C'], len(y), p=[0.49, 0.5, 0.01]),
                       'n_feat': rng.poisson(15, len(y)), 'patient': rng.integers(0, 200, len(y)).astype(str), 'unit': 'ICU'})
    df.write_csv(d / 'preds.csv'); df.write_parquet(d / 'preds.parquet')
    return d, y, p, df


@pytest.mark.parametrize('suffix', ['csv', 'parquet'])
def test_cli_json(predictions, suffix):
    d, y, p, df = predictions
    r = cde('evaluate', str(d / f'preds.{suffix}'), '--label', 'outcome', '--score', 'risk', '--threshold', '0.3', '--group', 'sex', '--group', 'site',
            '--nb-thresholds', '0.05,0.1,0.2', '--n-boot', '200', '--json')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    check_schema(out)
    ref = reference(y, p, 0.3)
    for k in METRICS: assert abs(out['metrics'][k]['estimate'] - ref[k]) < 1e-9, k
    assert out['n'] == 2000 and [row['threshold'] for row in out['net_benefit']] == [0.05, 0.1, 0.2]
    assert out['subgroups']['site']['C'].get('suppressed') and 'metrics' in out['subgroups']['site']['A']
    f = (df['sex'] == 'F').to_numpy()
    assert abs(out['subgroups']['sex']['F']['metrics']['auroc']['estimate'] - roc_auc_score(y[f], p[f])) < 1e-12
    assert out['settings']['n_boot'] == 200


def test_cli_summary_and_report(predictions):
    d, y, p, df = predictions
    r = cde('evaluate', str(d / 'preds.parquet'), '--label', 'outcome', '--score', 'risk', '--group', 'sex', '--n-features', 'n_feat', '--n-boot', '100')
    assert r.returncode == 0, r.stderr
    assert 'auroc' in r.stdout and f"{roc_auc_score(y, p):.3f}" in r.stdout and 'by sex:' in r.stdout
    path = Path(r.stdout.strip().splitlines()[-1].removeprefix('report: '))
    assert path.parent == Path(os.environ['CDE_REPORTS']) / 'evaluate' and path.name.startswith('preds-') and path.suffix == '.html'
    html = path.read_text()
    assert html.startswith('<!DOCTYPE html>') and 'preds.parquet' in html


def test_cli_errors(predictions, tmp_path):
    "Each bad input is one line naming the file or column and the problem (exit 2, no traceback)."
    d, *_ = predictions
    def one_line(r, *needles):
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith('cde: error: ') and '\n' not in err and 'Traceback' not in r.stderr, r.stderr
        for s in needles: assert s in err, (s, err)
    one_line(cde('evaluate', str(tmp_path / 'none.csv'), '--label', 'y', '--score', 'p'), 'none.csv', 'no such file')
    one_line(cde('evaluate', str(d / 'preds.csv'), '--label', 'died', '--score', 'risk'), "no column 'died'", 'outcome, risk, sex, site, n_feat')
    one_line(cde('evaluate', str(d / 'preds.csv'), '--label', 'outcome', '--score', 'risk', '--nb-thresholds', '0.1,x'), '--nb-thresholds')
    one_line(cde('evaluate', str(d / 'preds.csv'), '--label', 'outcome', '--score', 'risk', '--cluster', 'mrn'), "no column 'mrn'")
    one_line(cde('evaluate', str(d / 'preds.csv'), '--label', 'outcome', '--score', 'risk', '--cluster', 'unit'), "cluster column 'unit' has one value only")


def test_cli_cluster(predictions):
    "--cluster resamples whole patients: the same estimates, wider or equal intervals, and the settings say so."
    d, y, p, df = predictions
    args = ['evaluate', str(d / 'preds.csv'), '--label', 'outcome', '--score', 'risk', '--n-boot', '200', '--json']
    r = cde(*args, '--cluster', 'patient')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    check_schema(out)
    assert out['settings']['resampling_unit'] == 'patient' and out['settings']['n_clusters'] == df['patient'].n_unique()
    assert 'patients resampled with replacement' in out['settings']['interval']
    assert abs(out['metrics']['auroc']['estimate'] - roc_auc_score(y, p)) < 1e-9
    assert all(m['resamples'] == 200 for m in out['metrics'].values() if m['estimate'] is not None)


def test_read_predictions_errors(predictions, tmp_path):
    "The same errors in-process (the command turns any of them into its one line)."
    from cde_workbench.config import IngestError, SchemaError
    from cde_workbench.evaluate import read_predictions
    d, *_ = predictions
    (tmp_path / 'x.xlsx').write_text('x')
    (tmp_path / 'bad.parquet').write_bytes(b'not parquet at all')
    (tmp_path / 'gaps.csv').write_text('y,p\n0,0.1\n1,\n1,0.7\n')
    for args, exc, needles in [
        ((tmp_path / 'x.xlsx', 'y', 'p'), IngestError, ['unknown format', '.csv or .parquet']),
        ((tmp_path / 'bad.parquet', 'y', 'p'), IngestError, ['bad.parquet', 'cannot read']),
        ((tmp_path, 'y', 'p'), IngestError, ['is a folder']),
        ((d / 'preds.csv', 'outcome', 'risk', ['ward']), SchemaError, ["no column 'ward'", 'available: outcome, risk']),
        ((d / 'preds.csv', 'n_feat', 'risk'), SchemaError, ["label column 'n_feat' must hold 0 and 1"]),
        ((d / 'preds.csv', 'sex', 'risk'), SchemaError, ["column 'sex' must be numeric"]),
        ((d / 'preds.csv', 'outcome', 'n_feat'), SchemaError, ["score column 'n_feat'", '[0, 1]']),
        ((tmp_path / 'gaps.csv', 'y', 'p'), SchemaError, ["column 'p' has 1 missing values"]),
    ]:
        with pytest.raises(exc) as e: read_predictions(*args)
        for s in needles: assert s in str(e.value), (s, str(e.value))
