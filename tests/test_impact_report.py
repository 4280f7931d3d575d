"""Impact analyses from the command line and through their pipeline notebooks: `cde impact rdd|iv FILE` equal the
estimators on the same data, bad input is one line, and a registered plan's notebook runs by papermill, keeps its
executed copy, and refuses parameters that differ from the plan."""
import json
import re
from datetime import datetime
import subprocess
import sys

import pytest

from conftest import ROOT, one_line_error  # noqa: E402


@pytest.fixture
def cde(capsys, monkeypatch):
    "Run `cde ARGS` through its entry point `main` in this process (the heavy imports are shared between tests); a completed process."
    from cde_workbench.cli import main
    def run(*args, env=None):
        for k, v in (env or {}).items(): monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, 'argv', ['cde', *args])
        with pytest.raises(SystemExit) as e: main()
        out = capsys.readouterr()
        return subprocess.CompletedProcess(['cde', *args], e.value.code, out.out, out.err)
    return run


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A threshold display and an electrolyte trial, simulated with known effects, as CSV files."
    from cde_workbench.interventions import simulate_electrolyte_trial, simulate_threshold_display
    d = tmp_path_factory.mktemp('impact')
    display, _ = simulate_threshold_display(n=1200, seed=11)
    trial, _ = simulate_electrolyte_trial(n_stays=1200, seed=11)
    display.write_csv(d / 'display.csv'); trial.write_csv(d / 'trial.csv')
    return d


def test_cde_impact_rdd_json_equals_rdd_analysis(cde, data):
    from cde_workbench.impact import rdd_analysis
    from cde_workbench.impact_report import read_impact_data
    r = cde('impact', 'rdd', str(data / 'display.csv'), '--running', 'score', '--outcome', 'outcome', '--cutoff', '0.5',
            '--covariate', 'age', '--json')
    assert r.returncode == 0, r.stderr
    direct = rdd_analysis(read_impact_data(data / 'display.csv'), running='score', outcome='outcome', cutoff=0.5, covariates=['age'])
    assert json.loads(r.stdout) == json.loads(json.dumps(direct))


def test_cde_impact_iv_json_equals_iv_analysis(cde, data):
    from cde_workbench.impact import iv_analysis
    from cde_workbench.impact_report import read_impact_data
    r = cde('impact', 'iv', str(data / 'trial.csv'), '--outcome', 'noaf', '--treatment', 'supplemented', '--instrument', 'arm',
            '--covariate', 'age', '--cov', 'cluster:clinician', '--json')
    assert r.returncode == 0, r.stderr
    direct = iv_analysis(read_impact_data(data / 'trial.csv'), outcome='noaf', treatment='supplemented', instrument='arm',
                         covariates=['age'], cov='cluster:clinician')
    assert json.loads(r.stdout) == json.loads(json.dumps(direct))
    assert direct['n_dropped'] == read_impact_data(data / 'trial.csv')['arm'].null_count() > 0   # stays outside the randomised layer


def test_cde_impact_missing_column_is_one_line(cde, data):
    "A column that is not in the file: exit status 2 and one line naming it (other bad input: nbs/80_cli, nbs/76_impact_report)."
    one_line_error(cde('impact', 'rdd', str(data / 'display.csv'), '--running', 'scor', '--outcome', 'outcome', '--cutoff', '0.5'),
                   "display.csv: no column 'scor'")


def test_cde_impact_rdd_writes_the_report(cde, data, tmp_path):
    r = cde('impact', 'rdd', str(data / 'display.csv'), '--running', 'score', '--outcome', 'outcome', '--cutoff', '0.5',
            env={'CDE_REPORTS': str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('Showing the alert changed outcome by ')
    page = (tmp_path / r.stdout.split('report: ')[1].strip()).read_text()
    assert 'id="rd-plot"' in page and 'id="no-plan"' in page
    from cde_workbench.impact_report import read_impact_data
    text = re.sub(r'base64,[^"]+', '', page)   # the page without its images
    ids = read_impact_data(data / 'display.csv')
    assert not any(v in text for v in ids['patient'].unique().to_list() + ids['packet'].to_list())   # aggregates only: no surrogate id


def test_a_plan_runs_by_its_notebook_and_refuses_other_parameters(cde, tmp_path):
    "`cde impact run PLAN` runs the plan's notebook by papermill and keeps it; run with other parameters, the notebook refuses before reading the data."
    import sqlalchemy as sa
    from cde_workbench.config import Workspace
    from cde_workbench.demo import demo_impact_plans
    from cde_workbench.deployment import load_deployment
    from cde_workbench.impact_plans import register_plan
    from cde_workbench.interventions import simulate_threshold_display
    from cde_workbench.schedule import NotebookError, run_notebook
    from cde_workbench.store import get_engine, runs
    ws = Workspace.under(tmp_path, deployments=ROOT / 'deployments')
    plan = demo_impact_plans()[0]   # the display threshold's RDD, filed under hgb_abnormal
    (ws.var / 'impact').mkdir(parents=True)
    simulate_threshold_display(n=1200, seed=3)[0].write_parquet(ws.var / plan.data)
    engine = get_engine(ws.database_url)
    reg = register_plan(engine, plan, actor='Dr A')
    r = cde('impact', 'run', plan.name, env=ws.as_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f'{plan.name}: Showing the alert changed outcome by '), r.stdout
    executed = re.search(r'notebook (\S+\.ipynb)', r.stdout).group(1)
    run_id = executed.split('/')[-2]
    assert executed == str(ws.reports / 'hgb_abnormal' / run_id / 'impact_rdd.ipynb') and (ws.reports / 'hgb_abnormal' / run_id / 'impact_rdd.ipynb').exists()
    out = ws.reports / 'impact' / plan.name / run_id
    result = json.loads((out / 'result.json').read_text())
    assert result['run']['effective_sha256'] == reg.effective_sha256 and 'id="rd-plot"' in (out / 'report.html').read_text()
    # the notebook run by hand (or by a scheduler) with a cutoff the plan does not say: refused, recorded as failed, nothing written
    with pytest.raises(NotebookError, match=r"PlanMismatchError.*cutoff = 0\.6, the plan says 0\.5"):
        run_notebook(ws, load_deployment('hgb_abnormal', ws.deployments), 'impact_rdd',
                     {'plan': plan.name, 'parameters': {**reg.effective_parameters, 'cutoff': 0.6}})
    with engine.connect() as c:
        assert c.execute(sa.select(runs.c.status).where(runs.c.kind == 'impact_rdd').order_by(runs.c.started_at)).scalars().all() == ['succeeded', 'failed']
    assert [p.name for p in (ws.reports / 'impact' / plan.name).iterdir()] == [run_id]
    one_line_error(cde('impact', 'run', 'no_such_plan', env=ws.as_env()), "no registered plan 'no_such_plan'")
    # --as-of on a plan that reads a file: refused (a file is what it is at any time), before papermill runs anything
    one_line_error(cde('impact', 'run', plan.name, '--as-of', '2024-01-01T00:00:00+00:00', env=ws.as_env()),
                   f"plan {plan.name!r} reads the file {plan.data}: --as-of applies only to a plan on a deployment's store")
    one_line_error(cde('impact', 'run', plan.name, '--as-of', 'yesterday', env=ws.as_env()), '--as-of')
    assert [p.name for p in (ws.reports / 'impact' / plan.name).iterdir()] == [run_id]


STORE_DEPLOYMENT = '''name = "hgb_shown"
description = "A haemoglobin model shown at or above a hand-set threshold"

[task]
kind = "lab_abnormal"
component = "HGB"

[split]
train_years = [2021]
validation_years = [2022]
test_years = [2023]

[output]
mode = "threshold"
threshold = 0.5
threshold_reason = "simulated display"
'''


def logged_display(ws, n=600, seed=4):
    "A deployment shown at its threshold with a simulated log (packets, results, labels) in the workspace's store; its engine, deployment and truth."
    from cde_workbench.deployment import load_deployment
    from cde_workbench.impact_data import simulate_logged_display
    from cde_workbench.registry import register_model
    from cde_workbench.store import get_engine
    (ws.deployments / 'hgb_shown').mkdir(parents=True)
    (ws.deployments / 'hgb_shown' / 'deployment.toml').write_text(STORE_DEPLOYMENT)
    engine, dep = get_engine(ws.database_url), load_deployment('hgb_shown', ws.deployments)
    model = register_model(engine, dep.name, {'component': 'HGB'}, {}, {}, 'f' * 64, 'd' * 64, var=ws.var)
    return engine, dep, simulate_logged_display(engine, dep, model.model_id, n=n, seed=seed)


def store_plan(name='shown_rdd', **parameters):
    from cde_workbench.impact_plans import AnalysisPlan
    return AnalysisPlan(name=name, design='rdd', population="hgb_shown's scored orders", outcome='an abnormal haemoglobin',
                        estimand='the effect of showing the score at the threshold', estimator='rdrobust local linear, fuzzy (display as treatment)',
                        data='store:hgb_shown', deployment='hgb_shown',
                        parameters={'running': 'score', 'outcome': 'label', 'treatment': 'shown', 'cutoff': 0.5, **parameters})


def test_a_store_plan_runs_on_the_deployments_log(store_url, tmp_path):
    "On each backend: a store plan's run reads the log as known at as_of, equals rdd_analysis on the same frame, and records the store, not a file."
    import sqlalchemy as sa
    from cde_workbench.config import Workspace
    from cde_workbench.impact import rdd_analysis
    from cde_workbench.impact_data import impact_dataset
    from cde_workbench.impact_plans import register_plan
    from cde_workbench.impact_report import run_plan
    from cde_workbench.store import audit_log, dispose_engines
    ws = Workspace.under(tmp_path, database_url=store_url)
    engine, dep, truth = logged_display(ws)
    register_plan(engine, store_plan(), actor='Dr A')
    res = run_plan(ws, 'shown_rdd', run_id='run-1', as_of=truth['labels_at'])
    ds = impact_dataset(engine, dep, truth['labels_at'])
    assert res['estimate'] == rdd_analysis(ds.frame, running='score', outcome='label', treatment='shown', cutoff=0.5)['estimate']
    run = res['run']
    assert (run['source'], run['data'], run['deployment'], run['as_of'], run['n_packets'], run['data_sha256']) == (
        'store', 'store:hgb_shown', 'hgb_shown', truth['labels_at'].isoformat(), ds.n_packets, ds.sha256)
    assert run['n_excluded'] == ds.n_excluded and ds.n_packets + ds.n_excluded['cancelled'] == 600 and run['p_observed'].startswith('estimated')
    page = (ws.reports / 'impact' / 'shown_rdd' / 'run-1' / 'report.html').read_text()
    assert f'<span id="run-packets">{ds.n_packets}</span>' in page and ds.sha256 in page
    assert not any(k in page for k in ds.frame['patient_key'].unique().to_list())   # aggregates only: no surrogate id
    # a run as known earlier sees fewer packets, and says so
    early = run_plan(ws, 'shown_rdd', run_id='run-0', as_of=truth['first'] + (truth['last'] - truth['first']) * 0.9)
    assert early['run']['n_packets'] < ds.n_packets and early['run']['data_sha256'] != ds.sha256
    de = impact_dataset(engine, dep, datetime.fromisoformat(early['run']['as_of']))   # exactly the rows known then
    assert (early['run']['n_packets'], early['run']['data_sha256'], early['run']['n_excluded']) == (de.n_packets, de.sha256, de.n_excluded)
    with engine.connect() as c:
        details = [json.loads(d) for d in c.execute(sa.select(audit_log.c.detail).where(audit_log.c.action == 'impact.run').order_by(audit_log.c.id)).scalars()]
    assert [(d['run_id'], d['source'], d['n_packets']) for d in details] == [('run-1', 'store', ds.n_packets), ('run-0', 'store', early['run']['n_packets'])]
    dispose_engines()


@pytest.mark.slow
def test_cde_impact_run_on_a_store_plan(cde, tmp_path):
    "`cde impact run PLAN` on a store plan: the pipeline notebook runs by papermill, reads the deployment's log as known now, and records the store."
    from cde_workbench.config import Workspace
    from cde_workbench.impact import rdd_analysis
    from cde_workbench.impact_data import impact_dataset
    from cde_workbench.impact_plans import register_plan
    import shutil
    ws = Workspace.under(tmp_path)
    engine, dep, truth = logged_display(ws)
    shutil.copytree(ROOT / 'deployments' / '_pipelines', ws.deployments / '_pipelines')   # the shared pipeline notebooks
    register_plan(engine, store_plan(), actor='Dr A')
    r = cde('impact', 'run', 'shown_rdd', env=ws.as_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('shown_rdd: Showing the alert changed '), r.stdout
    run_id = re.search(r'notebook (\S+\.ipynb)', r.stdout).group(1).split('/')[-2]
    result = json.loads((ws.reports / 'impact' / 'shown_rdd' / run_id / 'result.json').read_text())
    ds = impact_dataset(engine, dep, truth['labels_at'])   # everything was known by the label run: the same rows as now
    assert (result['run']['source'], result['run']['n_packets'], result['run']['data_sha256']) == ('store', ds.n_packets, ds.sha256)
    assert result['estimate'] == rdd_analysis(ds.frame, running='score', outcome='label', treatment='shown', cutoff=0.5)['estimate']
    assert 'id="run-packets"' in (ws.reports / 'impact' / 'shown_rdd' / run_id / 'report.html').read_text()
    # --as-of T: the notebook gets T as a parameter and reads the log as known then: fewer packets and labels, as impact_dataset at T
    t = truth['first'] + (truth['last'] - truth['first']) * 0.8
    r = cde('impact', 'run', 'shown_rdd', '--as-of', t.isoformat(), env=ws.as_env())
    assert r.returncode == 0, r.stderr
    executed = re.search(r'notebook (\S+\.ipynb)', r.stdout).group(1)
    early = json.loads((ws.reports / 'impact' / 'shown_rdd' / executed.split('/')[-2] / 'result.json').read_text())
    de = impact_dataset(engine, dep, t)
    assert (early['run']['as_of'], early['run']['n_packets'], early['run']['data_sha256']) == (t.isoformat(), de.n_packets, de.sha256)
    assert de.n_packets < ds.n_packets
    injected = next(''.join(c['source']) for c in json.loads(open(executed).read())['cells'] if 'injected-parameters' in c['metadata'].get('tags', []))
    assert f'as_of = "{t.isoformat()}"' in injected


@pytest.mark.slow
def test_a_scheduled_impact_run_runs_the_deployments_store_plans_as_of_its_cron_time(tmp_path):
    "`[schedule] impact = \"<cron>\"`: the scheduler runs the deployment's store plans at the cron time, as_of = that time, in the run ledger, each with its report."
    import shutil
    from datetime import timedelta
    import sqlalchemy as sa
    from cde_workbench.config import Workspace
    from cde_workbench.deploy import set_status
    from cde_workbench.deployment import load_deployment
    from cde_workbench.impact_data import impact_dataset
    from cde_workbench.impact_plans import AnalysisPlan, register_plan
    from cde_workbench.schedule import Scheduler
    from cde_workbench.store import runs
    ws = Workspace.under(tmp_path)
    engine, dep, truth = logged_display(ws)
    shutil.copytree(ROOT / 'deployments' / '_pipelines', ws.deployments / '_pipelines')
    due = (truth['first'] + (truth['last'] - truth['first']) * 0.8).replace(minute=0, second=0, microsecond=0)
    toml = ws.deployments / 'hgb_shown' / 'deployment.toml'
    toml.write_text(toml.read_text() + f'\n[schedule]\nimpact = "0 {due.hour} * * *"\n')
    dep = load_deployment('hgb_shown', ws.deployments)
    assert dep.scheduled_runs() == {'impact': f'0 {due.hour} * * *'}
    register_plan(engine, store_plan(), actor='Dr A')
    # a plan filed under the deployment that reads a file: not scheduled (its data do not change with time); were it run, it would fail
    register_plan(engine, AnalysisPlan(name='shown_file', design='rdd', population='an extract', outcome='o', estimand='e', estimator='rdrobust',
                                       data='impact/absent.csv', deployment='hgb_shown', parameters={'running': 'score', 'outcome': 'label', 'cutoff': 0.5}), actor='Dr A')
    from cde_workbench.registry import get_model
    with engine.connect() as c: model_id = get_model(c, 'hgb_shown').model_id
    set_status(engine, 'hgb_shown', 'silent', model_id, 'test: scheduled impact')
    s = Scheduler(ws, [dep], clock=lambda: due + timedelta(minutes=1))
    out = s.tick(wait=True)
    assert [(o.run.kind, o.run.due, o.status) for o in out] == [('impact', due, 'succeeded')], [o.error for o in out]
    with engine.connect() as c:
        run_id, params, sched, by, nb = c.execute(sa.select(runs.c.run_id, runs.c.parameters, runs.c.scheduled_for, runs.c.started_by, runs.c.notebook)
                                                  .where(runs.c.kind == 'impact')).one()
    assert json.loads(params)['as_of'] == due.isoformat() and by == 'schedule' and nb.endswith(f'hgb_shown/{run_id}/impact.ipynb')
    result = json.loads((ws.reports / 'impact' / 'shown_rdd' / run_id / 'result.json').read_text())
    ds = impact_dataset(engine, dep, due)   # the log as known at the cron time: fewer packets than were logged in all
    assert (result['run']['as_of'], result['run']['n_packets'], result['run']['data_sha256']) == (due.isoformat(), ds.n_packets, ds.sha256)
    assert ds.n_packets + ds.n_excluded['cancelled'] < 600
    assert f'<span id="run-packets">{ds.n_packets}</span>' in (ws.reports / 'impact' / 'shown_rdd' / run_id / 'report.html').read_text()
    assert not (ws.reports / 'impact' / 'shown_file').exists()
    assert s.tick(wait=True) == []   # the same clock again: nothing more is due
