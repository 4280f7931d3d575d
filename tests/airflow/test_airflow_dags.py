"""The generated Airflow DAGs, loaded by Airflow's own DagBag (`make airflow-test`, in .venv-airflow; not part of `make test`).

`scripts/airflow-test.sh` generates the DAGs for the repository's deployments with the workbench's `cde schedule
export-airflow` into CDE_AIRFLOW_DAGS, then runs this file with Airflow 2.10 and its papermill provider installed (and
the workbench with --no-deps: the DAG files import `cde_workbench.airflow`, which needs only the standard library when
parsed). Each DAG is checked against the deployment.toml it came from, read here with tomllib, not with the workbench.
Runs with --noconftest: tests/conftest.py belongs to the workbench's environment (and ignores this folder).
"""
import json
import os
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = Path(os.environ.get('CDE_AIRFLOW_DAGS', ''))
DEPLOYMENTS = ROOT / 'deployments'
KINDS = ('score', 'labels', 'monitor', 'report', 'train', 'evaluate')


def scheduled() -> dict:
    "(deployment, kind) -> (cron, timeout minutes, catch_up), from each deployment.toml as the embedded scheduler reads it."
    out = {}
    for toml in sorted(DEPLOYMENTS.glob('*/deployment.toml')):
        d = tomllib.loads(toml.read_text())
        s, t = d.get('schedule', {}), d.get('trigger', {})
        runs = {k: s[k] for k in KINDS if k in s}
        if t.get('kind') == 'schedule': runs['score'] = t['cron']
        for k, cron in runs.items(): out[(d['name'], k)] = (cron, float(s.get('timeout_minutes', 60.0)), s.get('catch_up', 'skip'))
    return out


@pytest.fixture(scope='module')
def bag():
    if not DAGS.is_dir(): pytest.fail(f'CDE_AIRFLOW_DAGS={DAGS!s} is not a folder of generated DAGs (run `make airflow-test`)', pytrace=False)
    from airflow.models.dagbag import DagBag
    return DagBag(dag_folder=str(DAGS), include_examples=False, safe_mode=False)


def test_no_import_errors(bag):
    assert bag.import_errors == {}, '\n'.join(f'{k}: {v}' for k, v in bag.import_errors.items())


def test_one_dag_per_scheduled_notebook(bag):
    want = scheduled()
    assert len(want) >= 13   # the repository's deployments: every lab task's score and labels, the ICU clock
    assert sorted(bag.dag_ids) == sorted(f'cde_{n}_{k}' for n, k in want)


@pytest.mark.parametrize('name,kind', sorted(scheduled()))
def test_dag_matches_the_embedded_scheduler(bag, name, kind):
    from airflow.providers.papermill.operators.papermill import PapermillOperator
    from airflow.timetables.trigger import CronTriggerTimetable
    cron, timeout, catch_up = scheduled()[(name, kind)]
    dag = bag.dags[f'cde_{name}_{kind}']   # from the parsed files (get_dag would look in Airflow's database)
    assert isinstance(dag.timetable, CronTriggerTimetable)
    assert dag.timetable._expression == cron and dag.timetable._timezone.name == 'UTC'
    assert dag.max_active_runs == 1 and dag.catchup is (catch_up == 'all')
    assert [t.task_id for t in dag.tasks] == [kind]
    task = dag.get_task(kind)
    assert isinstance(task, PapermillOperator)
    own = DEPLOYMENTS / name / f'{kind}.ipynb'
    assert Path(task.input_nb) == (own if own.exists() else DEPLOYMENTS / '_pipelines' / f'{kind}.ipynb')
    p = task.parameters
    assert p['deployment'] == name and 'cde_run_id' in p['run_id']
    assert sorted(p['workspace']) == ['database_url', 'deployments', 'reports', 'site_key_file', 'var']
    assert Path(p['workspace']['deployments']) == DEPLOYMENTS
    if kind == 'score': assert p['as_of'] == '{{ data_interval_end.isoformat() }}'   # the cron time, as the scheduler's as_of
    assert task.execution_timeout == timedelta(minutes=timeout)
    assert task.retries == 0
    assert task.pool == f'cde_{name}' and task.pool_slots == 1
    assert task.on_success_callback and task.on_failure_callback and task.on_retry_callback
    assert task._pre_execute_hook is not None


def test_pools_file(bag):
    pools = json.loads((DAGS / 'cde_pools.json').read_text())
    assert sorted(pools) == sorted({f'cde_{n}' for n, _ in scheduled()})
    assert {p['slots'] for p in pools.values()} == {1}


def test_templates_render_the_run(bag):
    "Airflow renders the notebook's parameters for a run: as_of is the cron time, run_id the workbench's id of that try."
    import pendulum
    from cde_workbench.airflow import workbench_run_id
    dag = bag.dags['cde_na_abnormal_score']
    task = dag.get_task('score')
    due = pendulum.datetime(2024, 1, 1, 2, tz='UTC')
    env = dag.get_template_env()
    ctx = {'data_interval_end': due, 'run_id': 'scheduled__2024-01-01T02:00:00+00:00',
           'ti': type('TI', (), {'try_number': 1})(), **dag.user_defined_macros}
    rendered = {k: env.from_string(v).render(**ctx) for k, v in task.parameters.items() if isinstance(v, str)}
    assert rendered['as_of'] == '2024-01-01T02:00:00+00:00'
    assert rendered['run_id'] == workbench_run_id('score', due, 'scheduled__2024-01-01T02:00:00+00:00', 1)
    assert env.from_string(task.output_nb).render(**ctx).endswith(f"/na_abnormal/{rendered['run_id']}/score.ipynb")


@pytest.fixture(scope='module')
def airflow_db():
    "Airflow's own metadata database (SQLite in AIRFLOW_HOME), for runs of the DAGs with `dag.test()`."
    import subprocess, sys
    r = subprocess.run([str(Path(sys.executable).with_name('airflow')), 'db', 'migrate'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _store(bag) -> Path:
    url = bag.dags['cde_na_abnormal_score'].get_task('score').parameters['workspace']['database_url']
    assert url.startswith('sqlite:////'), 'make airflow-test exports the DAGs for a throwaway SQLite workspace'
    return Path(url.removeprefix('sqlite:///'))


def test_run_of_a_deployment_not_scoring_is_skipped(bag, airflow_db):
    "A real Airflow run: the pre-execute hook asks the workbench's `cde`, which says na_abnormal is not silent or live; the task is skipped, no ledger row."
    import pendulum, sqlite3
    dr = bag.dags['cde_na_abnormal_score'].test(execution_date=pendulum.datetime(2024, 1, 1, 2, tz='UTC'))
    assert [(ti.task_id, str(ti.state)) for ti in dr.get_task_instances()] in ([('score', 'skipped')], [('score', 'TaskInstanceState.SKIPPED')])
    with sqlite3.connect(_store(bag)) as c: assert c.execute('select count(*) from runs').fetchone()[0] == 0


def test_failed_run_is_in_the_ledger(bag, airflow_db):
    """A real Airflow run of a silent deployment whose notebook cannot run here (Airflow's environment has no kernel with the
    workbench's packages): the hook records it running, the failure callback records it failed with Airflow's error."""
    import pendulum, sqlite3
    from cde_workbench.airflow import workbench_run_id
    with sqlite3.connect(_store(bag)) as c:
        c.execute("insert into deployments (name, status, updated_at) values ('na_abnormal', 'silent', '2024-01-01 00:00:00.000000')")
    due = pendulum.datetime(2024, 1, 8, 2, tz='UTC')
    dr = bag.dags['cde_na_abnormal_score'].test(execution_date=due)
    assert str(dr.get_task_instances()[0].state) in ('failed', 'TaskInstanceState.FAILED')
    with sqlite3.connect(_store(bag)) as c:
        rows = c.execute('select run_id, deployment, kind, status, started_by, scheduled_for, error_name, error from runs').fetchall()
    assert len(rows) == 1, rows
    run_id, dep, kind, status, started_by, scheduled_for, error_name, error = rows[0]
    assert (dep, kind, status, started_by) == ('na_abnormal', 'score', 'failed', 'airflow')
    assert run_id == workbench_run_id('score', due, dr.run_id, 1) and scheduled_for.startswith('2024-01-08 02:00:00')
    assert error_name and error
