"""Training end to end on a small synthetic hospital: an order-triggered lab task through the pipeline
notebooks, and a time-triggered task (ICU transfer within 24 h) through the same training code."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    from cde_workbench.store import dispose_engines, get_engine
    from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
    from cde_workbench.warehouse import load_warehouse_extract
    base = tmp_path_factory.mktemp('training')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CDE_VAR', str(base / 'var'))
        write_warehouse_extract(generate(HospitalConfig(n_patients=400, seed=11)), base / 'x')
        eng = get_engine()
        load_warehouse_extract(eng, base / 'x')
        yield eng
        dispose_engines()


def test_time_triggered_task_trains_with_the_same_code(store, tmp_path):
    from cde_workbench.config import load_deployment
    from cde_workbench.registry import load_bundle, test_predictions
    from cde_workbench.train import train_deployment
    folder = tmp_path / 'icu_transfer_24h'; folder.mkdir()
    toml = (ROOT / 'deployments' / 'icu_transfer_24h' / 'deployment.toml').read_text()
    assert '[model]' not in toml   # the default candidates; two quick ones here: the code path is what is tested
    (folder / 'deployment.toml').write_text(toml + '\n[model]\ncandidates = ["logistic_regression", "random_forest"]\nseed = 0\n'
                                            '[model.grid.random_forest]\nn_estimators = [40]\nmin_samples_leaf = [10]\n')
    dep = load_deployment(folder)
    rec = train_deployment(store, dep, progress=False)
    preds = test_predictions(rec)
    # points every 6 h of a stay, ids "<encounter>@<time>", all in the test years, scored by the registered model
    assert preds['point_id'].str.contains('@').all() and (preds['prediction_time'].dt.year() == 2023).all()
    assert 0 < preds['label'].mean() < 0.5 and rec.metrics['test_auroc']['estimate'] > 0.5
    fz = load_bundle(rec)['featurizer']
    assert any(n.startswith('num:HGB:') for n in fz.feature_names_)   # numeric lab features from [features]
    # the registry's n_features is the model's input width, numeric columns included (not the count vocabulary alone)
    assert rec.metrics['n_features'] == fz.n_features_out_ == len(fz.feature_names_) > len(fz.vocabulary_)


def test_a_feature_set_naming_an_unknown_table_fails_before_training(store, tmp_path):
    from cde_workbench.config import ConfigError, load_deployment
    d = tmp_path / 'bad_features'; d.mkdir()
    toml = (ROOT / 'deployments' / 'hgb_abnormal' / 'deployment.toml').read_text().replace('hgb_abnormal', 'bad_features')
    (d / 'deployment.toml').write_text(toml.replace('lab_bins = 5', 'lab_bins = 5\nvitals_days = 3'))
    with pytest.raises(ConfigError, match=r"\[features\]: unknown feature key\(s\) 'vitals_days'"):
        load_deployment(d)
