"""The scheduler's notebook runner (nbs/42_schedule) on its own: parameters checked against the notebook's `parameters`
cell before anything runs (unknown or missing ones are errors), and a papermill run recorded in the run ledger with its
executed copy kept, whether it succeeds or fails."""
import json
from datetime import datetime, timezone

import nbformat
import pytest
import sqlalchemy as sa

from cde_workbench.config import ConfigError, PipelineError, Workspace
from cde_workbench.schedule import check_parameters, notebook_parameters, run_notebook

from conftest import ROOT, SMALL_DEPLOYMENT, env_deployment, env_engine

PIPELINES = ROOT / 'deployments' / '_pipelines'
AS_OF = datetime(2024, 2, 1, tzinfo=timezone.utc)


def q(engine, sql, **kw):
    with engine.connect() as c: return c.execute(sa.text(sql), kw).all()


def test_a_notebook_declares_its_parameters():
    assert notebook_parameters(PIPELINES / 'score.ipynb') == {'deployment': 'None', 'run_id': 'None', 'workspace': 'None', 'as_of': 'None'}
    assert notebook_parameters(PIPELINES / 'evaluate.ipynb')['model'] == "'champion'"


def test_unknown_and_missing_parameters_are_errors():
    nb = PIPELINES / 'score.ipynb'
    ws = {'database_url': 'sqlite:///x'}   # check_parameters looks at names only; run_notebook builds the real one
    check_parameters(nb, {'deployment': 'x', 'run_id': 'r', 'workspace': ws, 'as_of': '2024-01-01T00:00:00+00:00'})   # complete: no error
    with pytest.raises(ConfigError, match=r'^score\.ipynb: unknown parameter\(s\) asof, n \(declared: deployment, run_id, as_of, workspace\)$'):
        check_parameters(nb, {'deployment': 'x', 'run_id': 'r', 'workspace': ws, 'as_of': 't', 'asof': 't', 'n': 1})
    with pytest.raises(ConfigError, match=r'^score\.ipynb: missing required parameter\(s\) as_of, run_id, workspace$'):
        check_parameters(nb, {'deployment': 'x'})
    with pytest.raises(ConfigError, match=r'missing required parameter\(s\) as_of$'):
        check_parameters(nb, {'deployment': 'x', 'run_id': 'r', 'workspace': ws, 'as_of': None})   # given as None is missing too
    check_parameters(PIPELINES / 'evaluate.ipynb', {'deployment': 'x', 'run_id': 'r', 'workspace': ws})   # optional ones (model) keep their defaults


def test_notebooks_without_a_parameters_cell_or_unreadable_are_refused(tmp_path):
    plain = tmp_path / 'plain.ipynb'
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x = 1')]), plain)
    with pytest.raises(ConfigError, match=r"plain\.ipynb has no cell tagged 'parameters'"):
        notebook_parameters(plain)
    junk = tmp_path / 'junk.ipynb'; junk.write_text('{not json')
    with pytest.raises(ConfigError, match=r'cannot read notebook .*junk\.ipynb'):
        check_parameters(junk, {})


def test_a_run_is_recorded_with_its_executed_notebook(silent_store):
    engine, dep, rec = silent_store
    run = run_notebook(Workspace.from_env(), dep, 'score', {'as_of': AS_OF.isoformat()})
    assert run.output == Workspace.from_env().reports / SMALL_DEPLOYMENT / run.run_id / 'score.ipynb' and run.output.exists()
    executed = nbformat.read(run.output, as_version=4)
    injected = [c for c in executed.cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert len(injected) == 1 and f'as_of = "{AS_OF.isoformat()}"' in injected[0].source and f'run_id = "{run.run_id}"' in injected[0].source
    assert not [o for c in executed.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error']
    (kind, status, params, notebook, error), = q(engine, 'select kind, status, parameters, notebook, error from runs where run_id = :r', r=run.run_id)
    assert (kind, status, notebook, error) == ('score', 'succeeded', str(run.output), None)
    assert json.loads(params) == {'deployment': SMALL_DEPLOYMENT, 'run_id': run.run_id, 'as_of': AS_OF.isoformat(),
                                  'workspace': Workspace.from_env().as_params()}   # the run carries its caller's workspace
    n = q(engine, 'select count(*) from inferences where run_id = :r', r=run.run_id)[0][0]
    assert n > 0 and n == q(engine, 'select count(*) from inferences')[0][0]   # the packets belong to this run


def test_a_failing_notebook_is_a_pipeline_error_and_a_failed_run(small_store):
    engine, dep = env_engine(), env_deployment()   # trained, but never put in a silent trial
    with pytest.raises(PipelineError, match=r"score\.ipynb failed in cell \d+: ConfigError: deployment 'hgb_abnormal' is not registered") as e:
        run_notebook(Workspace.from_env(), dep, 'score', {'as_of': AS_OF.isoformat()})
    (run_id, status, error, notebook), = q(engine, "select run_id, status, error, notebook from runs where kind = 'score'")
    assert status == 'failed' and str(e.value) == error and 'not registered' in error
    assert notebook in str(e.value) and nbformat.read(notebook, as_version=4).cells   # the executed copy is kept, named in the error


def test_bad_parameters_start_nothing(small_store):
    engine, dep = env_engine(), env_deployment()
    with pytest.raises(ConfigError, match=r'unknown parameter\(s\) asof'):
        run_notebook(Workspace.from_env(), dep, 'score', {'asof': AS_OF.isoformat()})
    with pytest.raises(ConfigError, match=r'missing required parameter\(s\) as_of'):
        run_notebook(Workspace.from_env(), dep, 'score', {})
    assert q(engine, 'select count(*) from runs')[0][0] == q(engine, "select count(*) from runs where kind = 'train'")[0][0]
    assert not (Workspace.from_env().reports / SMALL_DEPLOYMENT).exists() or not any((Workspace.from_env().reports / SMALL_DEPLOYMENT).iterdir())
