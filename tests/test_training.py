"""Training end to end on a small synthetic hospital: an order-triggered lab task through the pipeline
notebooks, and a time-triggered task (ICU transfer within 24 h) through the same training code."""
from pathlib import Path

import pytest
from conftest import env_engine, env_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    from cde_workbench.store import dispose_engines
    from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
    from cde_workbench.warehouse import load_warehouse_extract
    base = tmp_path_factory.mktemp('training')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CDE_VAR', str(base / 'var'))
        write_warehouse_extract(generate(HospitalConfig(n_patients=400, seed=11)), base / 'x', env_key())
        eng = env_engine()
        load_warehouse_extract(eng, base / 'x')
        yield eng
        dispose_engines()


def test_time_triggered_task_trains_with_the_same_code(store, tmp_path):
    from cde_workbench.deployment import load_deployment
    from cde_workbench.registry import load_bundle, test_predictions
    from cde_workbench.train import train_deployment
    folder = tmp_path / 'icu_transfer_24h'; folder.mkdir()
    toml = (ROOT / 'deployments' / 'icu_transfer_24h' / 'deployment.toml').read_text()
    head, model = toml.split('[model]')
    tail = model.split('\n[', 1)[1]   # two quick candidates here in place of the deployment's: the code path is what is tested
    (folder / 'deployment.toml').write_text(head + '[model]\ncandidates = ["logistic_regression", "random_forest"]\nseed = 0\n'
                                            '[model.grid.random_forest]\nn_estimators = [40]\nmin_samples_leaf = [10]\n\n[' + tail)
    dep = load_deployment(folder)
    rec = train_deployment(store, dep, tmp_path / 'var', progress=False)
    preds = test_predictions(rec)
    # points every 6 h of a stay, ids "<encounter>@<time>", all in the test years, scored by the registered model
    assert preds['point_id'].str.contains('@').all() and (preds['prediction_time'].dt.year() == 2023).all()
    assert 0 < preds['label'].mean() < 0.5 and rec.metrics['test_auroc']['estimate'] > 0.5
    fz = load_bundle(rec)['featurizer']
    assert any(n.startswith('num:HGB:') for n in fz.feature_names_)   # numeric lab features from [features]
    # the registry's n_features is the model's input width, numeric columns included (not the count vocabulary alone)
    assert rec.metrics['n_features'] == fz.n_features_out_ == len(fz.feature_names_) > len(fz.vocabulary_)


def test_a_feature_set_naming_an_unknown_table_fails_before_training(store, tmp_path):
    from cde_workbench.config import ConfigError
    from cde_workbench.deployment import load_deployment
    d = tmp_path / 'bad_features'; d.mkdir()
    toml = (ROOT / 'deployments' / 'hgb_abnormal' / 'deployment.toml').read_text().replace('hgb_abnormal', 'bad_features')
    (d / 'deployment.toml').write_text(toml.replace('lab_bins = 5', 'lab_bins = 5\nvitals_days = 3'))
    with pytest.raises(ConfigError, match=r"\[features\]: unknown feature key\(s\) 'vitals_days'"):
        load_deployment(d)


def test_a_leaky_feature_fails_training_before_anything_is_registered(store, tmp_path, monkeypatch):
    "A featurizer that lets each order's own result in (ignoring when it was stored) is caught by training's point-in-time check."
    import polars as pl
    import scipy.sparse as sp
    import sqlalchemy as sa
    from cde_workbench import train
    from cde_workbench.deployment import load_deployment
    from cde_workbench.featurizer import CountFeaturizer
    from cde_workbench.store import models
    from cde_workbench.tasks import LeakageError

    class OwnResultFeaturizer(CountFeaturizer):
        "Count features plus the order's own HGB result: known only once resulted, after the order time."
        def transform(self, X, data=None):
            m, d = super().transform(X, data), self._data(data)
            res = d.events.filter(pl.col('kind') == 'lab', pl.col('code') == 'HGB').group_by('order_id').agg(pl.col('value').last())
            own = X.select('order_id').join(res, on='order_id', how='left', maintain_order='left')['value'].fill_null(0).to_numpy()
            return sp.hstack([m, sp.csr_matrix(own[:, None])], format='csr')

    d = tmp_path / 'hgb_leaky'; d.mkdir()
    (d / 'deployment.toml').write_text(
        'name = "hgb_leaky"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n[split]\ntrain_years = [2019, 2020, 2021]\n'
        'validation_years = [2022]\ntest_years = [2023]\n[model]\ncandidates = ["logistic_regression"]\n[output]\nmode = "silent"\n'
        'threshold = 0.5\nthreshold_reason = "a test"\n[checks]\npoint_in_time_sample = 20\npoint_in_time_seed = 4\n')
    monkeypatch.setattr(train, '_featurizer', lambda dep: OwnResultFeaturizer.from_feature_set(dep.features))
    with pytest.raises(LeakageError, match=r'features use data not known at the prediction time in \d+ of 20 checked point\(s\); first: point ORD'):
        train.train_deployment(store, load_deployment(d), tmp_path / 'var', progress=False)
    with store.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(models).where(models.c.name == 'hgb_leaky')).scalar() == 0


def test_a_scoring_run_checks_a_seeded_sample_and_stores_the_rule_threshold(store, tmp_path):
    "Training computes the flag-rate threshold on validation years and records it; a scoring run checks its packets and uses that value."
    from datetime import datetime, timezone
    import sqlalchemy as sa
    from cde_workbench.deployment import load_deployment
    from cde_workbench.deploy import set_status
    from cde_workbench.registry import display_threshold
    from cde_workbench.schedule import run_ledger
    from cde_workbench.serve import score_pending
    from cde_workbench.store import inferences
    from cde_workbench.train import train_deployment
    d = tmp_path / 'hgb_rule'; d.mkdir()
    (d / 'deployment.toml').write_text(
        'name = "hgb_rule"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n[split]\ntrain_years = [2019, 2020, 2021]\n'
        'validation_years = [2022]\ntest_years = [2023]\n[model]\ncandidates = ["logistic_regression"]\n[output]\nmode = "silent"\n'
        'threshold_rule = "flag_rate"\ntarget = 0.25\n[checks]\npoint_in_time_sample = 15\n')
    dep = load_deployment(d)
    rec = train_deployment(store, dep, tmp_path / 'var', progress=False)
    t = rec.metrics['threshold']
    assert (t['rule'], t['target']) == ('flag_rate', 0.25) and 0.15 < t['achieved']['flag_rate'] <= 0.25 and t['computed_on'].startswith('validation-year (2022)')
    assert rec.metrics['point_in_time_checked'] == 15
    set_status(store, 'hgb_rule', 'silent', model_id=rec.model_id)
    utc = timezone.utc
    with run_ledger(store, 'hgb_rule', 'score', {}) as run_id:
        s = score_pending(store, dep, datetime(2024, 1, 1, tzinfo=utc), run_id, since=datetime(2023, 12, 1, tzinfo=utc))
    assert s.scored > 15 and s.point_in_time_checked == 15
    with store.connect() as c:
        thr = {r[0] for r in c.execute(sa.select(inferences.c.threshold).where(inferences.c.deployment == 'hgb_rule'))}
    assert thr == {t['value']} == {display_threshold(dep, rec).value}
