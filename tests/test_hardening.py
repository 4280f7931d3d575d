"""Holes found when the workbench was tried as an attacker would, and what a new researcher tripped over (issue 8,
items 10 and 11), from the command line: one line naming the problem, exit status 2, no traceback, nothing written."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cde, one_line_error, env_engine  # noqa: E402

@pytest.mark.parametrize('url', ['postgresql+psycopg://cde:s3cret@127.0.0.1:1/cde',   # nothing listens on port 1
                                 'postgresql+psycopg://cde:s3cret@db:notaport/cde',   # unparseable
                                 'nosuchdb://cde:s3cret@db/cde',                      # unknown dialect
                                 'postgresql+psycopg://cde:s3cr%40t@127.0.0.1:1/cde'])  # a quoted password
def test_an_unusable_database_url_is_reported_without_its_password(tmp_path, url):
    r = cde('models', 'list', env={'CDE_VAR': str(tmp_path / 'var'), 'CDE_DATABASE_URL': url})
    one_line_error(r, 'cde:***@')
    assert 's3cr' not in r.stderr + r.stdout, r.stderr
    r = cde('ingest', 'replay', url, env={'CDE_VAR': str(tmp_path / 'var')})   # a URL on the command line too
    one_line_error(r, 'cde:***@')
    assert 's3cr' not in r.stderr + r.stdout, r.stderr


def test_deployment_names_must_be_plain_identifiers(tmp_path):
    deps = tmp_path / 'deployments'; (deps / 'inner').mkdir(parents=True)
    # a deployment.toml one level up whose name is '..': it matches its folder '..', so only the name rule stops it
    (tmp_path / 'deployment.toml').write_text('name = ".."\n')
    env = {'CDE_DEPLOYMENTS': str(deps), 'CDE_VAR': str(tmp_path / 'var'), 'CDE_REPORTS': str(tmp_path / 'reports')}
    for name in ('..', '../x', 'hgb-abnormal', '1abc', 'ｈgb'):
        one_line_error(cde('score', name, env=env), 'must be a plain identifier', repr(name))
    one_line_error(cde('score', str(deps / 'inner' / '..'), env=env), "'..'", 'must be a plain identifier')
    assert not (tmp_path / 'reports').exists() and not (tmp_path / 'runs').exists()


def test_evaluate_summary_hides_small_groups_and_strips_control_characters(tmp_path):
    import numpy as np
    import polars as pl
    rng = np.random.default_rng(5)
    n = 600
    y = rng.binomial(1, 0.3, n); p = np.clip(0.3 + 0.3 * (y - 0.3) + rng.normal(0, 0.2, n), 0, 1)
    evil = '\x1b[2J\x1b]0;pwned\x07X\u202eY'       # clear screen, set the window title, a bell, a bidi override
    g = np.where(np.arange(n) < 7, evil, np.where(np.arange(n) % 2, 'F', 'M'))    # 7 cases: below the minimum size
    g[7:47] = 'Z'; y[7:47] = 0; p[7:47] = 0.2     # 40 cases, none positive: suppressed for too few events, size hidden too
    pl.DataFrame({'y': y, 'p': p, 'grp\x1b[31m': g}).write_csv(tmp_path / 'preds.csv')
    r = cde('evaluate', str(tmp_path / 'preds.csv'), '--label', 'y', '--score', 'p', '--group', 'grp\x1b[31m', '--n-boot', '50',
            env={'CDE_REPORTS': str(tmp_path / 'reports')})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert not any(ord(c) < 32 and c != '\n' or 0x7f <= ord(c) < 0xa0 or c == '\u202e' for c in out), repr(out)
    assert 'by grp[31m:' in out
    small = [l for l in out.splitlines() if 'suppressed' in l]
    assert len(small) == 2 and 'X' in small[0] and 'n=< 30' in small[0] and ' 7 ' not in small[0] and 'n=7' not in small[0], small
    assert small[1].strip().startswith('Z') and 'n=—' in small[1] and '40' not in small[1], small
    # a column name with control characters in an error: one clean line
    one_line_error(cde('evaluate', str(tmp_path / 'preds.csv'), '--label', 'nope', '--score', 'p'), "no column 'nope'")


def test_score_and_labels_runs_say_how_many_orders_they_did(tmp_path, monkeypatch):
    "`cde score` and `cde labels` end with counts taken from the store by the run's id."
    from datetime import datetime, timedelta, timezone
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from cde_workbench.cli import _run_counts
    from cde_workbench.registry import register_model
    from cde_workbench.store import dispose_engines, inference_labels, inferences, runs
    monkeypatch.setenv('CDE_VAR', str(tmp_path / 'var')); monkeypatch.delenv('CDE_DATABASE_URL', raising=False)
    eng = env_engine()
    rec = register_model(eng, 'hgb_abnormal', {'estimator': LogisticRegression().fit(np.array([[0.], [1.]]), [0, 1])},
                         {'model': {'kind': 'logistic_regression'}}, {}, 'a' * 64, 'b' * 64, var=tmp_path / 'var')
    t = datetime(2024, 3, 1, tzinfo=timezone.utc)
    with eng.begin() as c:
        for r, kind in (('s1', 'score'), ('s2', 'score'), ('l1', 'labels'), ('l2', 'labels')):
            c.execute(runs.insert().values(run_id=r, deployment='hgb_abnormal', kind=kind, status='done', started_at=t, parameters='{}'))
        c.execute(inferences.insert(), [dict(deployment='hgb_abnormal', model_id=rec.model_id, order_id=f'O{k}', patient_key=f'P{k}',
                                             prediction_time=t + timedelta(hours=k), score=0.5, threshold=0.5, output_mode='silent',
                                             n_features=3, run_id='s1' if k < 3 else 's2', scored_at=t) for k in range(5)])
        ids = c.execute(inferences.select().with_only_columns(inferences.c.inference_id)).scalars().all()
        full = [dict(inference_id=i, version=1, label=1, label_time=t, stored_time=t, run_id='l1', extracted_at=t) for i in ids[:2]]
        c.execute(inference_labels.insert(), [{k: v for k, v in row.items() if k in inference_labels.c} for row in full])
    assert _run_counts(eng, 'score', 's1') == '3 orders scored (5 scored for hgb_abnormal in all)'
    assert _run_counts(eng, 'score', 's2').startswith('2 orders scored')
    assert _run_counts(eng, 'labels', 'l1') == '2 orders labelled (2 of 5 scored orders of hgb_abnormal now have a label)'
    assert _run_counts(eng, 'labels', 'l2').startswith('0 orders labelled')
    dispose_engines()


def test_score_help_names_the_notebook_that_runs():
    for kind in ('score', 'labels'):
        r = cde(kind, '--help')
        text = ' '.join(r.stdout.replace('│', ' ').split())
        assert r.returncode == 0 and f'deployments/_pipelines/{kind}.ipynb' in text, r.stdout


@pytest.mark.parametrize('typo', [('mode = "threshold"', 'mod = "threshold"', "unknown key 'mod' in [output]"),
                                  ('test_years = [2023]', 'test_years = [2021]', 'more than one part of the split'),
                                  ('mode = "threshold"', 'mode = "threshold', 'not valid TOML'),
                                  ('kind = "order"', 'kind = "orders"', "[trigger] kind 'orders' unknown"),
                                  ('score = "0 2 * * 1"', 'score = "0 2 * * 8"', 'is not a valid five-field cron'),
                                  # the task, feature set and model search are typed specifications checked without their libraries
                                  ('component = "HGB"', 'component = "HBG"', "[task]: unknown lab component 'HBG'"),
                                  ('lab_bins = 5', 'lab_bin = 5', "[features]: unknown feature key(s) 'lab_bin'"),
                                  ('min_samples_leaf = [10, 30]', 'min_sample_leaf = [10, 30]', "unknown hyperparameter 'min_sample_leaf'")])
def test_a_deployment_toml_typo_is_reported_before_heavy_libraries_load(tmp_path, typo):
    "`cde score` on a broken deployment.toml answers in well under a second: scikit-learn, polars and papermill never load."
    old, new, needle = typo
    (tmp_path / 'hgb_abnormal').mkdir()
    toml = (ROOT / 'deployments' / 'hgb_abnormal' / 'deployment.toml').read_text()
    assert old in toml
    (tmp_path / 'hgb_abnormal' / 'deployment.toml').write_text(toml.replace(old, new, 1))
    probe = ('import sys, time; t = time.perf_counter(); from cde_workbench.cli import main\n'
             'sys.argv = ["cde", "score", "hgb_abnormal"]\n'
             'try: main()\n'
             'except SystemExit as e: code = e.code\n'
             'heavy = sorted(m for m in ("sklearn", "polars", "papermill", "sqlalchemy", "scipy") if m in sys.modules)\n'
             'print(code, heavy, round(time.perf_counter() - t, 3))')
    r = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, 'CDE_DEPLOYMENTS': str(tmp_path), 'CDE_VAR': str(tmp_path / 'var')})
    assert needle in r.stderr and 'deployment.toml' in r.stderr and r.stderr.count('\n') == 1, r.stderr
    code, heavy, seconds = r.stdout.split(' [')[0], '[' + r.stdout.split(' [')[1].rsplit(']', 1)[0] + ']', float(r.stdout.split()[-1])
    assert code == '2' and heavy == '[]', r.stdout
    print(f'typo reported in {seconds:.2f} s')
