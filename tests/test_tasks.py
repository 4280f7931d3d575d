"""Tasks as data: the twelve DEPLOYR lab tasks, the event-within-a-window task against a brute-force reference, exclusions
known at prediction time, the leakage guard, and bad input."""
from __future__ import annotations

import tomllib
from datetime import timedelta

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from cde_workbench.config import ConfigError, PipelineError
from cde_workbench.store import adt_events, diagnoses, dispose_engines, get_engine, lab_results, read_frame
from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
from cde_workbench.terminology import LABS
from cde_workbench.deployment import Task
from cde_workbench.tasks import (DEPLOYR_TASKS, ICU_TRANSFER_24H, LeakageError, check_point_in_time, exclusion_mask, lab_abnormal_points, task_points)
from cde_workbench.warehouse import load_warehouse_extract
from conftest import env_key  # noqa: E402

T = pl.Datetime('us', 'UTC')


@pytest.fixture(scope='module')
def eng(tmp_path_factory):
    d = tmp_path_factory.mktemp('tasks')
    mp = pytest.MonkeyPatch(); mp.setenv('CDE_SITE_KEY_FILE', str(d / 'site.key'))
    write_warehouse_extract(generate(HospitalConfig(n_patients=200, seed=9)), d / 'x', env_key())
    e = get_engine(f'sqlite:///{d}/store.sqlite'); load_warehouse_extract(e, d / 'x')
    yield e
    dispose_engines(); mp.undo()


def test_twelve_deployr_tasks_have_labelled_points_of_both_classes(eng):
    assert list(DEPLOYR_TASKS) == list(LABS) and len(DEPLOYR_TASKS) == 12
    with eng.connect() as c:
        for comp, task in DEPLOYR_TASKS.items():
            pts = task_points(c, task)
            assert pts['point_id'].is_unique().all() and pts['point_id'].to_list() == pts['order_id'].to_list()
            assert {'point_id', 'order_id', 'patient_key', 'prediction_time', 'label', 'label_time'} <= set(pts.columns)
            assert set(pts['label'].drop_nulls().unique().to_list()) == {0, 1}, comp
            assert (pts['label_time'] > pts['prediction_time']).all()   # the label is known only after the order


def test_task_from_a_deployment_toml_table(eng):
    raw = tomllib.loads('[task]\nkind = "lab_abnormal"\ncomponent = "K"\nexclude_if_resulted_within_hours = 12\n')
    task = Task.from_dict(raw['task'])
    assert task == Task('lab_abnormal', component='K', exclude_if_resulted_within_hours=12)
    icu = Task.from_dict(tomllib.loads('[task]\nkind = "event_within"\nevent_table = "adt_events"\nevent_filter = { ward = ["ICU"] }\n'
                                       'window_hours = 24\nevery_hours = 6\nname = "icu_transfer_24h"\n')['task'])
    assert icu == ICU_TRANSFER_24H
    with eng.connect() as c:
        assert task_points(c, raw['task']).height == task_points(c, task).height


def _brute_exclusions(c, comp: str, pts: pl.DataFrame, hours: float) -> np.ndarray:
    r = lab_results.c
    res = read_frame(c, sa.select(r.patient_key, r.event_time, r.stored_time).where(r.component == comp), {'patient_key': pl.String, 'event_time': T, 'stored_time': T})
    by = {k: g for (k,), g in res.group_by('patient_key')}
    out = []
    for k, t in pts.select('patient_key', 'prediction_time').iter_rows():
        g = by.get(k)
        out.append(g is not None and g.filter((pl.col('event_time') >= t - timedelta(hours=hours)) & (pl.col('event_time') <= t)
                                              & (pl.col('stored_time') <= t)).height > 0)
    return np.array(out)


def test_exclusion_matches_a_brute_force_reference_and_passes_the_leakage_guard(eng):
    task = Task('lab_abnormal', component='K', exclude_if_resulted_within_hours=20)
    with eng.connect() as c:
        cand = lab_abnormal_points(c, 'K').sample(400, seed=1)
        mask = exclusion_mask(c, task, cand)
        assert (mask == _brute_exclusions(c, 'K', cand, 20)).all() and 0 < mask.mean() < 1
        assert check_point_in_time(c, cand, mask, lambda c, row, t: exclusion_mask(c, task, row, as_of=t), n=60, what='exclusions') == 60
        kept = task_points(c, task)
        assert kept.height == lab_abnormal_points(c, 'K').height - exclusion_mask(c, task, lab_abnormal_points(c, 'K')).sum()


def test_a_leaky_exclusion_is_caught(eng):
    "Exclusions that use the future (a result not yet final at T; a diagnosis not yet coded at T) are caught, naming a point."
    def leaky(c, pts, as_of=None):   # 'drop orders whose result is not final', judged with everything stored so far
        lab = lab_abnormal_points(c, 'HGB', as_of=as_of).drop_nulls('label')
        return ~pts.select('order_id').join(lab.select('order_id', 'label'), on='order_id', how='left')['label'].is_not_null().to_numpy()
    def leaky_history(c, pts, as_of=None):   # 'exclude patients with kidney disease' that forgets the stored-time rule:
        d = diagnoses.c                        # diagnoses are coded at discharge, so the current stay's code leaks in
        q = sa.select(d.patient_key, d.event_time).where(d.icd10 == 'N18.3')
        if as_of is not None: q = q.where(d.stored_time <= as_of)
        ev = read_frame(c, q, {'patient_key': pl.String, 'event_time': T})
        j = pts.with_row_index('i').join(ev, on='patient_key').filter(pl.col('event_time') <= pl.col('prediction_time'))
        out = np.zeros(pts.height, bool); out[j['i'].unique().to_numpy()] = True
        return out
    with eng.connect() as c:
        cand = lab_abnormal_points(c, 'HGB')
        for f, n in ((leaky, 50), (leaky_history, 300)):
            with pytest.raises(LeakageError, match=r'not known at the prediction time.*point ORD'):
                check_point_in_time(c, cand, f(c, cand), lambda c, row, t: f(c, row, t), n=n, what='exclusions')


def test_icu_transfer_points_and_labels_match_a_brute_force_reference(eng):
    with eng.connect() as c:
        pts = task_points(c, ICU_TRANSFER_24H)
        a = adt_events.c
        adt = read_frame(c, sa.select(a.encounter_id, a.patient_key, a.event_type, a.ward, a.event_time, a.stored_time),
                         {'encounter_id': pl.String, 'patient_key': pl.String, 'event_type': pl.String, 'ward': pl.String, 'event_time': T, 'stored_time': T})
    assert pts['point_id'].is_unique().all() and 0.005 < pts['label'].mean() < 0.3
    stays = {e: g for (e,), g in adt.group_by('encounter_id')}
    icu_by_patient = {k: g for (k,), g in adt.filter(pl.col('ward') == 'ICU').group_by('patient_key')}
    rng = np.random.default_rng(0)
    for i in rng.choice(pts.height, 300, replace=False):
        p = pts.row(int(i), named=True)
        g = stays[p['encounter_id']]
        admit = g.filter(pl.col('event_type') == 'A01')['event_time'].min()
        disch = g.filter(pl.col('event_type') == 'A03')['stored_time'].min()
        t = p['prediction_time']
        assert admit < t and (disch is None or t < disch) and (t - admit) % timedelta(hours=6) == timedelta(0)
        icu = icu_by_patient.get(p['patient_key'], pl.DataFrame(schema=adt.schema))
        assert icu.filter((pl.col('event_time') >= admit) & (pl.col('event_time') <= t) & (pl.col('stored_time') <= t)).is_empty()  # excluded otherwise
        hit = icu.filter((pl.col('event_time') > t) & (pl.col('event_time') <= t + timedelta(hours=24)))
        assert p['label'] == int(hit.height > 0)
        assert p['label_time'] == (hit['stored_time'].min() if hit.height else t + timedelta(hours=24))


def test_icu_labels_are_unknown_until_known(eng):
    with eng.connect() as c:
        full = task_points(c, ICU_TRANSFER_24H)
        cut = full['prediction_time'].quantile(0.5)
        early = task_points(c, ICU_TRANSFER_24H, as_of=cut)
    assert (early['prediction_time'] <= cut).all() and early['label'].null_count() > 0
    known = early.drop_nulls('label').join(full.select('point_id', full_label='label'), on='point_id')
    assert known.height > 0 and (known['label'] == known['full_label']).all()
    assert (early.drop_nulls('label')['label_time'] <= cut).all()


def test_bad_tasks_give_clear_errors(eng):
    cases = [({'component': 'HGB'}, "missing required key 'kind'"), ({'kind': 'mortality'}, "unknown task kind 'mortality'"),
             ({'kind': 'lab_abnormal', 'component': 'TROP'}, "unknown lab component 'TROP'"),
             ({'kind': 'event_within', 'event_table': 'vitals', 'window_hours': 24, 'every_hours': 6}, "unknown event table 'vitals'"),
             ({'kind': 'event_within', 'event_table': 'adt_events', 'event_filter': {'room': 'x'}, 'window_hours': 24, 'every_hours': 6}, "column 'room'"),
             ({'kind': 'event_within', 'event_table': 'adt_events', 'window_hours': 0, 'every_hours': 6}, 'window_hours must be'),
             ({'kind': 'lab_abnormal', 'component': 'HGB', 'exclude_if_resulted_within_hours': -1}, 'exclude_if_resulted_within_hours')]
    for d, msg in cases:
        with pytest.raises(ConfigError, match=msg): Task.from_dict(d)
    with eng.connect() as c:
        later = lab_abnormal_points(c, 'HGB')['prediction_time'].max() + timedelta(days=400)
        with pytest.raises(PipelineError, match='hgb_abnormal: the cohort is empty'):
            task_points(c, DEPLOYR_TASKS['HGB'], start=later)
        assert task_points(c, DEPLOYR_TASKS['HGB'], start=later, allow_empty=True).is_empty()
