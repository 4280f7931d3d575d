"""Monitoring runs (nbs/50b_monitoring) on a copy of the small trained store after a silent trial: the stored figures
checked against scikit-learn and the drift statistics on the same packets; alerts stored, seen again and resolved on
SQLite and PostgreSQL; the monitor notebook and `cde monitor run`, `cde alerts list|resolve` through the command line;
and in the demo, the hemoglobin analyser drift of 15 February 2024 raising hgb_abnormal's alert after it, not before."""
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa
from sklearn.metrics import roc_auc_score

from conftest import SMALL_DEPLOYMENT, cde, deliver_feed, env_engine

SCORED_TO = datetime(2024, 4, 1, tzinfo=timezone.utc)
AS_OF = datetime(2024, 4, 4, tzinfo=timezone.utc)
LABEL_CLOCKS = (datetime(2024, 2, 1, tzinfo=timezone.utc), datetime(2024, 3, 1, tzinfo=timezone.utc), AS_OF)


def ledger(engine, dep, kind, fn, as_of, **kw):
    from cde_workbench.schedule import run_ledger
    with run_ledger(engine, dep.name, kind, {'as_of': as_of.isoformat()}, heartbeat_seconds=None) as run_id: return fn(engine, dep, as_of, run_id, **kw)


@pytest.fixture(scope='module')
def trial(small_trained_store, tmp_path_factory):
    "A silent trial on a copy of the small store: every order to April scored as it came, labels extracted monthly."
    from cde_workbench.deployment import load_deployment
    from cde_workbench.deploy import set_status
    from cde_workbench.labels import extract_labels
    from cde_workbench.registry import get_model
    from cde_workbench.serve import score_pending
    from cde_workbench.store import dispose_engines
    store = small_trained_store.copy(tmp_path_factory.mktemp('monitoring') / 'store')
    with pytest.MonkeyPatch.context() as mp:
        store.apply(mp)
        engine = env_engine()
        deliver_feed(engine)
        dep = load_deployment(SMALL_DEPLOYMENT, store.base / 'deployments')
        with engine.connect() as c: rec = get_model(c, dep.name)
        set_status(engine, dep.name, 'silent', rec.model_id, 'test: silent trial')
        ledger(engine, dep, 'score', score_pending, SCORED_TO)
        for t in LABEL_CLOCKS: ledger(engine, dep, 'labels', extract_labels, t)
        yield store, engine, dep, rec
        dispose_engines()


def test_stored_figures_equal_the_reference_implementations_on_the_same_packets(trial):
    from cde_workbench.drift import population_stability_index
    from cde_workbench.monitor import label_status
    from cde_workbench.monitoring import read_results, run_monitoring
    from cde_workbench.registry import test_predictions
    from cde_workbench.train import test_features
    store, engine, dep, rec = trial
    days = 120   # the small hospital scores a few packets a week: one window holds the whole trial
    s = ledger(engine, dep, 'monitor', run_monitoring, AS_OF, n_boot=200, window_days=days)
    with engine.connect() as c:
        stored = read_results(c, dep.name)
        st = label_status(c, dep, AS_OF)
    assert stored['run_id'].unique().to_list() == [s.run_id] and stored.height == s.figures.height > 50
    assert stored.drop('run_id', 'as_of', 'computed_at').equals(s.figures)
    start = AS_OF - timedelta(days=days)   # the rules' 28-day windows end at AS_OF too
    last = {r['metric']: r for r in stored.filter(pl.col('group_name') == 'all', pl.col('window_end') == AS_OF, pl.col('window_start') == start).iter_rows(named=True)}
    w = st.filter(pl.col('prediction_time') >= AS_OF - timedelta(days=days), pl.col('prediction_time') < AS_OF)
    lab = w.filter(pl.col('label_state') == 'labelled')
    assert s.packets == st.height and s.labelled == lab.height > 20
    y, p = lab['label'].to_numpy(), lab['score'].to_numpy()
    assert last['auroc']['value'] == pytest.approx(roc_auc_score(y, p)) and last['auroc']['n'] == lab.height
    assert last['auroc']['ci_low'] < last['auroc']['value'] < last['auroc']['ci_high']
    assert last['prevalence']['value'] == pytest.approx(y.mean())
    assert last['oe']['value'] == pytest.approx(y.sum() / p.sum())
    assert last['scoring_volume']['value'] == pytest.approx(w.height / days)
    ref = test_predictions(rec)
    assert last['psi_score']['value'] == pytest.approx(population_stability_index(ref['score'].to_numpy(), w['score'].to_numpy()))
    assert last['flag_rate']['value'] == pytest.approx(float((w['score'] >= w['threshold']).mean()))
    states = {r['group_value']: r['value'] for r in stored.filter(pl.col('metric') == 'label_state_share', pl.col('window_start') == start).iter_rows(named=True)}
    assert sum(states.values()) == pytest.approx(1.0) and states['labelled'] == pytest.approx(lab.height / w.height)
    # the feature drift reference is the test years' rows kept with the model; the largest PSI is one of the stored features'
    assert test_features(rec).shape[0] == ref.height
    feats = stored.filter(pl.col('group_name') == 'feature', pl.col('window_start') == start)
    assert feats.height and last['psi_max_feature']['value'] == pytest.approx(feats['value'].max())
    # subgroups split the same packets: by sex, the counts add up to the whole window's
    by_sex = stored.filter(pl.col('metric') == 'auroc', pl.col('group_name') == 'sex', pl.col('window_start') == start)
    assert set(by_sex['group_value']) <= {'F', 'M'} and by_sex['n'].sum() == lab.height
    # the task's own result: the window's HGB values against the test years' (each order's first final value)
    shift = last['result_shift']
    d = json.loads(shift['detail'])
    assert shift['value'] == pytest.approx(d['mean'] - d['reference_mean']) and shift['ci_low'] < shift['value'] < shift['ci_high']
    assert 0 < shift['n'] <= w.height and d['n_reference'] <= ref.height
    ref_rows = stored.filter(pl.col('group_name') == 'reference')
    assert dict(zip(ref_rows['metric'], ref_rows['value']))['auroc'] == pytest.approx(roc_auc_score(ref['label'], ref['score']))
    # a naive clock is refused before anything is stored
    from cde_workbench.config import ConfigError
    with pytest.raises(ConfigError, match='has no time zone'): run_monitoring(engine, dep, datetime(2024, 4, 4), s.run_id)


def _run(engine, name, as_of):
    from cde_workbench.schedule import run_ledger
    with run_ledger(engine, name, 'monitor', {'as_of': as_of.isoformat()}, heartbeat_seconds=None) as rid: return rid


def test_alerts_open_are_seen_again_and_resolve_once_on_both_backends(store_url, tmp_path):
    from cde_workbench.deployment import AlertRule, load_deployment
    from cde_workbench.monitoring import (MonitoringError, evaluate_alerts, figure, figures_frame, list_alerts, open_alerts,
                                          read_results, resolve_alert, store_results)
    from cde_workbench.store import audit_log, get_engine, monitoring_results, verify_audit_chain
    from conftest import ROOT
    engine = get_engine(store_url)
    dep = replace(load_deployment(ROOT / 'deployments' / SMALL_DEPLOYMENT), alerts=(AlertRule('oe', 0.8, 'below', 14, 30),))
    t = lambda d: datetime(2024, 2, 1, tzinfo=timezone.utc) + timedelta(days=d)
    def check(day, value, n=100):
        fig = figures_frame([figure('oe', value, t(day - 14), t(day), n=n)])
        with engine.begin() as c: store_results(c, _run(engine, dep.name, t(day)), dep.name, t(day), fig)
        return evaluate_alerts(engine, dep, t(day), fig)
    a = check(14, 0.7)
    assert [(x.status, x.first_seen, x.last_value) for x in a] == [('open', t(14), 0.7)]
    with engine.connect() as c: got = read_results(c, dep.name)   # the run's figures read back as stored, times in UTC
    assert got.select('metric', 'window_start', 'window_end', 'value', 'n').rows() == [('oe', t(0), t(14), 0.7, 100)] and got['as_of'][0] == t(14)
    b = check(21, 0.6, n=40)
    assert (b[0].alert_id, b[0].first_seen, b[0].last_seen, b[0].last_value, b[0].n) == (a[0].alert_id, t(14), t(21), 0.6, 40)
    assert check(28, 0.5, n=29) == [] and check(35, 0.95) == []
    with pytest.raises(MonitoringError, match='give a reason'): resolve_alert(engine, a[0].alert_id, '', 'dr.ds')
    r = resolve_alert(engine, a[0].alert_id, 'analyser recalibrated', 'dr.ds')
    assert (r.status, r.resolved_by, r.resolution_reason) == ('resolved', 'dr.ds', 'analyser recalibrated') and r.resolved_at.tzinfo
    with pytest.raises(MonitoringError, match='already resolved by dr.ds'): resolve_alert(engine, a[0].alert_id, 'again', 'dr.ds')
    assert check(21, 0.6) == []                                   # the reviewed period does not come back
    assert check(42, 0.6)[0].alert_id != a[0].alert_id            # a later breach is a new alert
    with engine.connect() as c:
        assert [x.status for x in list_alerts(c, dep.name)] == ['open', 'resolved'] and len(open_alerts(c)) == 1
        acts = [r[0] for r in c.execute(sa.select(audit_log.c.action).where(audit_log.c.action.like('alert.%')).order_by(audit_log.c.id))]
        assert acts == ['alert.raise', 'alert.seen', 'alert.resolve', 'alert.raise'] and verify_audit_chain(c).ok
    # stored figures are append-only in the database
    for stmt in ('UPDATE monitoring_results SET value = 1', 'DELETE FROM monitoring_results'):
        with pytest.raises(sa.exc.DatabaseError, match='append-only'):
            with engine.begin() as c: c.execute(sa.text(stmt))


def test_monitor_notebook_and_alert_commands(trial, monkeypatch):
    """`cde monitor run` executes the monitor notebook through the run ledger (a process, as a user runs it); the alert it
    raises is listed and resolved by the alert commands (in this process: the same `app` the `cde` program runs)."""
    import re
    from typer.testing import CliRunner
    from cde_workbench.cli import app
    from cde_workbench.monitoring import MonitoringError
    store, engine, dep, rec = trial
    toml = dep.path / 'deployment.toml'
    # a rule the small trial certainly breaches: more than one packet a fortnight over the last 120 days
    toml.write_text(toml.read_text() + '\n[[alerts]]\nmetric = "scoring_volume"\nthreshold = 0.07\ndirection = "above"\nwindow_days = 120\nmin_n = 5\n')
    r = cde('monitor', 'run', dep.name, '--as-of', AS_OF.isoformat(), env=store.env)
    assert r.returncode == 0, r.stderr
    assert re.search(r'monitor run \S+ done', r.stdout) and '1 open alert for hgb_abnormal' in r.stdout
    with engine.connect() as c:
        run = c.execute(sa.text("select run_id, status, notebook from runs where kind = 'monitor' order by started_at desc limit 1")).one()
    assert run.status == 'succeeded' and run.notebook.endswith('monitor.ipynb')
    from cde_workbench.monitoring import read_results
    with engine.connect() as c: gates = read_results(c, dep.name, run.run_id, 'gate')   # the silent trial's gates, stored for the health dashboard
    assert gates['group_value'].to_list() == ['labelled', 'auroc', 'calibration', 'sparsity', 'missingness']
    store.apply(monkeypatch)
    cli = lambda *a: CliRunner().invoke(app, list(a))
    listed = json.loads(cli('alerts', 'list', '--json').stdout)
    assert [(a['metric'], a['status'], a['first_seen']) for a in listed] == [('scoring_volume', 'open', AS_OF.isoformat())]
    r = cli('alerts', 'resolve', str(listed[0]['alert_id']), '--reason', 'expected: the trial scores every CBC', '--actor', 'dr.ds')
    assert r.exit_code == 0 and 'resolved by dr.ds' in r.stdout
    assert 'no open alerts' in cli('alerts', 'list').stdout and '[resolved]' in cli('alerts', 'list', '--all').stdout
    r = cli('alerts', 'resolve', str(listed[0]['alert_id']), '--reason', 'again')
    assert isinstance(r.exception, MonitoringError) and 'already resolved by dr.ds' in str(r.exception)


DRIFT = datetime(2024, 2, 15, tzinfo=timezone.utc)   # the demo's hemoglobin analyser change (nbs/11_synth, DEMO_DRIFT_SHIFT)


def weekly_result_shift_alerts(store_file, tmp_path):
    """Weekly monitoring runs of hgb_abnormal over the silent trial on a copy of a demo store (its alerts cleared first):
    each Monday's result_shift figure and the result_shift alerts, as (first_seen, last_seen, direction)."""
    import sqlite3
    from cde_workbench.deployment import load_deployment
    from cde_workbench.monitoring import list_alerts, run_monitoring
    from cde_workbench.store import get_engine
    from conftest import ROOT
    copy = tmp_path / 'copy.sqlite'
    src, dst = sqlite3.connect(store_file), sqlite3.connect(copy)
    with dst: src.backup(dst)
    src.close(); dst.execute('DELETE FROM alerts'); dst.commit(); dst.close()
    engine = get_engine(f'sqlite:///{copy}')
    dep = load_deployment(ROOT / 'deployments' / 'hgb_abnormal')
    shifts = {}
    for k in range(10):
        as_of = datetime(2024, 1, 29, tzinfo=timezone.utc) + timedelta(weeks=k)
        s = ledger(engine, dep, 'monitor', run_monitoring, as_of, n_boot=20, n_sim=20)
        f = s.figures.filter(pl.col('metric') == 'result_shift', pl.col('group_name') == 'all', pl.col('window_end') == as_of,
                             pl.col('window_start') == as_of - timedelta(days=28))
        shifts[as_of] = (f['value'][0], f['n'][0]) if f.height else None
    with engine.connect() as c:
        found = [(a.first_seen, a.last_seen, a.direction) for a in list_alerts(c, dep.name) if a.metric == 'result_shift']
    return shifts, found


def test_the_demo_hemoglobin_drift_raises_its_alert_in_the_weeks_after_it_and_not_before(demo, tmp_path):
    "The demo's last monitoring run leaves hgb_abnormal's result-shift alert open; weekly runs over the trial raise it only after 15 February 2024."
    from cde_workbench.monitoring import open_alerts
    with demo['engine'].connect() as c: live = [a for a in open_alerts(c, 'hgb_abnormal') if a.metric == 'result_shift']
    assert [(a.direction, a.last_value > 0.5) for a in live] == [('above', True)], live
    assert 'monitoring: hgb_abnormal' in demo['out'] and 'result_shift' in demo['out']
    shifts, found = weekly_result_shift_alerts(demo['base'] / 'var' / 'cde.sqlite', tmp_path)
    assert len(found) == 1, (found, shifts)
    first, last, direction = found[0]
    assert direction == 'above' and DRIFT < first <= DRIFT + timedelta(weeks=4) <= last, (found, shifts)
    assert all(v is None or v[0] <= 0.5 for t, v in shifts.items() if t < DRIFT), shifts


def test_the_scheduler_runs_the_monitor_notebook_at_its_cron_time(trial):
    "`[schedule] monitor` is a notebook kind the scheduler runs like the others: as_of is the cron time, the figures are stored for it."
    from cde_workbench.config import Workspace
    from cde_workbench.deployment import load_deployment
    from cde_workbench.monitoring import read_results
    from cde_workbench.schedule import Scheduler
    store, engine, dep, rec = trial
    toml = dep.path / 'deployment.toml'
    before = toml.read_text()
    assert 'score = "0 2 * * 1"\nlabels = "30 2 * * *"' in before
    toml.write_text(before.replace('score = "0 2 * * 1"\nlabels = "30 2 * * *"', 'monitor = "0 6 * * 1"'))
    try:
        with pytest.MonkeyPatch.context() as mp:
            store.apply(mp)
            mon = load_deployment(dep.name, store.base / 'deployments')
            monday = datetime(2024, 3, 4, 6, 0, tzinfo=timezone.utc)
            out = Scheduler(Workspace.from_env(), [mon], clock=lambda: monday + timedelta(minutes=1)).tick(wait=True)
    finally: toml.write_text(before)
    assert [(o.run.kind, o.run.due, o.status) for o in out] == [('monitor', monday, 'succeeded')], [o.error for o in out]
    with engine.connect() as c: got = read_results(c, dep.name, out[0].run_id)
    assert got.height > 0 and got['as_of'].unique().to_list() == [monday]
