"""The synthetic hospital is predictable but not perfectly: a model trained on prior years reaches an
AUROC well above chance and below perfection for every one of the twelve DEPLOYR components."""
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score

from cde_workbench.features import load_feature_data
from cde_workbench.featurizer import CountFeaturizer
from cde_workbench.store import dispose_engines, get_engine
from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
from cde_workbench.terminology import LABS
from cde_workbench.tasks import lab_abnormal_points
from cde_workbench.warehouse import load_warehouse_extract
from conftest import env_key  # noqa: E402


@pytest.fixture(scope='module')
def hospital(tmp_path_factory):
    d = tmp_path_factory.mktemp('signal')
    write_warehouse_extract(generate(HospitalConfig(n_patients=1500, seed=21)), d / 'x', env_key())
    eng = get_engine(f'sqlite:///{d}/s.sqlite')
    load_warehouse_extract(eng, d / 'x')
    with eng.connect() as c:
        data = load_feature_data(c)
        points = {comp: lab_abnormal_points(c, comp).filter(pl.col('label').is_not_null()) for comp in LABS}
    yield data, points
    dispose_engines()


@pytest.mark.parametrize('component', list(LABS))
def test_auroc_between_chance_and_perfection(hospital, component):
    data, points = hospital
    pts = points[component]
    year = pts['prediction_time'].dt.year()
    train, test = pts.filter(year <= 2022), pts.filter(year == 2023)
    fz = CountFeaturizer().fit(train, data)
    rf = RandomForestClassifier(80, min_samples_leaf=5, n_jobs=-1, random_state=0).fit(fz.transform(train, data), train['label'].to_numpy())
    auc = roc_auc_score(test['label'].to_numpy(), rf.predict_proba(fz.transform(test, data))[:, 1])
    prevalence = test['label'].mean()
    assert 0.62 <= auc <= 0.92, (component, auc)
    assert 0.03 <= prevalence <= 0.7, (component, prevalence)
