"""One workspace, carried: a training, scoring, labelling and report run against a store that is not the default one
finds everything (packets, labels, run ledger, model bundles, report inputs) in that store and its folders, and
nothing in the default ones the environment names."""
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
SECRET = 'Sekr1t-pw-9'   # PostgreSQL here trusts local connections, so a password in the URL is accepted and must leak nowhere


def _small_deployment(folder: Path) -> None:
    "The hgb_abnormal deployment, made quick: one model kind, 200 resamples, test year 2022 so 2023's orders are the silent trial."
    (folder / 'hgb_abnormal').mkdir(parents=True)
    shutil.copytree(ROOT / 'deployments' / '_pipelines', folder / '_pipelines')
    toml = (ROOT / 'deployments' / 'hgb_abnormal' / 'deployment.toml').read_text()
    for pat, new in [(r'bootstrap = \d+', 'bootstrap = 200'), (r'candidates = \[.*\]', 'candidates = ["logistic_regression"]'),
                     (r'train_years = \[.*\]', 'train_years = [2019, 2020]'), (r'validation_years = \[.*\]', 'validation_years = [2021]'),
                     (r'test_years = \[.*\]', 'test_years = [2022]')]:
        toml, n = re.subn(pat, new, toml)
        assert n == 1, pat
    (folder / 'hgb_abnormal' / 'deployment.toml').write_text(toml)


@pytest.fixture(params=['sqlite', 'postgresql'])
def carried(request, tmp_path, monkeypatch):
    "A workspace in tmp_path/ws (its own store), while the environment points the defaults at tmp_path/default."
    from cde_workbench.config import Workspace
    from cde_workbench.store import dispose_engines
    default = tmp_path / 'default'
    monkeypatch.setenv('CDE_VAR', str(default / 'var'))
    monkeypatch.setenv('CDE_REPORTS', str(default / 'reports'))
    monkeypatch.setenv('CDE_DEPLOYMENTS', str(default / 'deployments'))
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(default / 'site.key'))
    monkeypatch.delenv('CDE_DATABASE_URL', raising=False)
    url = None
    if request.param == 'postgresql':
        base = request.getfixturevalue('pg_url')
        name = f'cde_ws_{abs(hash(request.node.nodeid)) % 10**8}'
        admin = sa.create_engine(base, isolation_level='AUTOCOMMIT')
        with admin.connect() as c: c.execute(sa.text(f'CREATE DATABASE {name}'))
        url = base.rsplit('/', 1)[0].replace('://postgres@', f'://postgres:{SECRET}@') + f'/{name}'
        assert SECRET in url
    ws = Workspace.under(tmp_path / 'ws', database_url=url)
    _small_deployment(ws.deployments)
    try: yield ws, request.param, default
    finally:
        dispose_engines()
        if url:
            with admin.connect() as c: c.execute(sa.text(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)'))
            admin.dispose()


@pytest.mark.slow
def test_runs_carry_the_workspace(carried, tmp_path):
    from cde_workbench.config import Workspace
    from cde_workbench.deployment import load_deployment
    from cde_workbench.deploy import set_status
    from cde_workbench.monitor import performance_rows
    from cde_workbench.registry import get_model
    from cde_workbench.report import render_report
    from cde_workbench.schedule import run_notebook
    from cde_workbench.store import get_engine, inference_labels, inferences, models, runs
    from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
    from cde_workbench.train import train_deployment
    from cde_workbench.warehouse import load_warehouse_extract
    ws, backend, default = carried
    from cde_workbench.pseudonyms import site_key
    write_warehouse_extract(generate(HospitalConfig(n_patients=200, seed=5)), tmp_path / 'extract', key=site_key(ws.site_key_file))
    engine = get_engine(ws.database_url)
    load_warehouse_extract(engine, tmp_path / 'extract')
    dep = load_deployment('hgb_abnormal', ws.deployments)
    if backend == 'sqlite': run_notebook(ws, dep, 'train', {})   # the train and evaluate notebooks, as `cde train` runs them
    else: train_deployment(engine, dep, progress=False, var=ws.var)   # in process: the notebook path is covered on SQLite
    with engine.connect() as c: rec = get_model(c, dep.name)
    if backend == 'sqlite': run_notebook(ws, dep, 'evaluate', {'model': rec.version})
    set_status(engine, dep.name, 'silent', rec.model_id, 'test: silent trial in a second workspace')
    score = run_notebook(ws, dep, 'score', {'as_of': '2024-01-01T00:00:00+00:00'})
    labels = run_notebook(ws, dep, 'labels', {'as_of': '2024-01-01T00:00:00+00:00'})
    report = render_report(ws, dep)

    # packets, labels and the ledger of every run: in the workspace's store
    with engine.connect() as c:
        n_packets = c.execute(sa.select(sa.func.count()).select_from(inferences).where(inferences.c.run_id == score.run_id)).scalar()
        n_labels = c.execute(sa.select(sa.func.count()).select_from(inference_labels).where(inference_labels.c.run_id == labels.run_id)).scalar()
        ledger = {r.run_id: r for r in c.execute(sa.select(runs).where(runs.c.deployment == dep.name))}
        model_paths = [r[0] for r in c.execute(sa.select(models.c.path))]
        pro = {r.period: r for r in performance_rows(c, dep)}['prospective']
    assert n_packets > 0 and 0 < n_labels <= n_packets
    for run in (score, labels):
        assert ledger[run.run_id].status == 'succeeded'
        params = json.loads(ledger[run.run_id].parameters)
        assert params['workspace'] == ws.as_params() and SECRET not in ledger[run.run_id].parameters
    assert {r.kind for r in ledger.values()} == {'score', 'labels', 'report'} | ({'train', 'evaluate'} if backend == 'sqlite' else set())
    assert all(r.status == 'succeeded' for r in ledger.values())
    # model bundle and feature cache in the workspace's var/, executed notebooks and the report in its reports/
    assert model_paths and all(Path(p).is_relative_to(ws.var / 'models') for p in model_paths)
    assert any((ws.var / 'features').rglob('*.npz'))
    assert report == ws.reports / dep.name / 'report.html' and score.output.is_relative_to(ws.reports)
    # each executed notebook says which store it used, with the password masked
    # (the notebook's workspace has no password at all: its kernel got it as PGPASSWORD)
    for run in (score, labels):
        text = json.dumps(nbformat.read(run.output, as_version=4).cells)
        assert f'store: {Workspace.from_params(ws.as_params()).redacted_url}' in text and SECRET not in text
    if backend == 'postgresql': assert ws.redacted_url.startswith('postgresql+psycopg://postgres:***@')
    # the report's inputs came from this store: its silent-trial counts are this store's labelled packets
    doc = report.read_text()
    assert pro.n > 0 and f'{pro.n} prospective labelled orders' in doc and SECRET not in doc
    # the clinicians' dashboard, given the workspace, shows this store's packets
    from cde_workbench.dashboard import monitor_view
    view = monitor_view(workspace=ws)
    assert f'id="packets-{dep.name}">{n_packets}<' in view.children[0].value
    # and nothing went to the defaults the environment names
    assert not default.exists(), sorted(str(p) for p in default.rglob('*'))
    assert ws.site_key_file.exists()


def test_notebook_refuses_a_run_without_workspace(tmp_path):
    "The pipeline notebooks declare `workspace` as required: a run that does not carry one is refused before any kernel starts."
    from cde_workbench.config import ConfigError
    from cde_workbench.schedule import check_parameters
    for kind in ('train', 'evaluate', 'score', 'labels', 'report'):
        nb = ROOT / 'deployments' / '_pipelines' / f'{kind}.ipynb'
        given = {'deployment': 'hgb_abnormal', 'run_id': 'r', 'as_of': '2024-01-01T00:00:00+00:00'}
        given = {k: v for k, v in given.items() if k != 'as_of' or kind in ('score', 'labels')}
        with pytest.raises(ConfigError, match='missing required parameter.*workspace'): check_parameters(nb, given)
