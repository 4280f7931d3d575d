"""`cde models list|show|alias` against a real store: versions, lineage, aliases and their history."""
import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import env_engine  # noqa: E402

CDE = [str(Path(sys.executable).parent / 'cde')]
ROOT = Path(__file__).resolve().parent.parent


def cde(*args, env):
    return subprocess.run([*CDE, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_models_list_show_and_alias(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from cde_workbench.registry import register_model
    from cde_workbench.store import dispose_engines
    env = {'CDE_VAR': str(tmp_path / 'var')}
    monkeypatch.setenv('CDE_VAR', env['CDE_VAR'])
    eng = env_engine()
    est = LogisticRegression().fit(np.array([[0.], [1.]]), [0, 1])
    for auc in (0.71, 0.74):
        register_model(eng, 'k_abnormal', {'estimator': est}, {'model': {'kind': 'logistic_regression', 'C': 1.0}},
                       {'test_auroc': {'estimate': auc, 'low': auc - .05, 'high': auc + .05, 'n': 100}}, 'a' * 64, 'b' * 64, var=tmp_path / 'var')
    dispose_engines()
    r = cde('models', 'list', env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ['name', 'version', 'aliases'] and 'k_abnormal' in lines[1] and '0.740 [0.690, 0.790]' in lines[1]
    r = cde('models', 'alias', 'k_abnormal', 'champion', '1', '--reason', 'reviewed 2026-11-30', env=env)
    assert r.returncode == 0 and 'k_abnormal@champion -> v1' in r.stdout, r.stderr
    shown = json.loads(cde('models', 'show', 'k_abnormal', env=env).stdout)   # default: the champion
    assert shown['version'] == 1 and shown['aliases'] == ['champion'] and shown['feature_set_hash'] == 'a' * 64
    assert shown['alias_history'][0]['reason'] == 'reviewed 2026-11-30' and shown['params']['model']['kind'] == 'logistic_regression'
    listed = json.loads(cde('models', 'list', 'k_abnormal', '--json', env=env).stdout)
    assert [(m['version'], m['aliases']) for m in listed] == [(2, ''), (1, 'champion')]
    # bad input: one line naming the problem, exit status 2, nothing changed
    for args, needle in [(('models', 'show', 'k_abnormal', '7'), "no registered model 'k_abnormal' version 7"),
                         (('models', 'show', 'k_abnormal', 'challenger'), 'has no challenger'),
                         (('models', 'alias', 'k_abnormal', 'king', '2'), "unknown alias 'king'"),
                         (('models', 'alias', 'k_abnormal', 'challenger', '1'), 'already the champion'),
                         (('models', 'list', 'nope'), "no registered model 'nope'"),
                         (('models', 'show', 'k_abnormal', '²'), "'²' is neither a version number nor an alias"),   # str.isdigit says yes
                         (('models', 'show', 'k_abnormal', '٣'), 'neither a version number nor an alias')]:
        r = cde(*args, env=env)
        assert r.returncode == 2 and needle in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert json.loads(cde('models', 'show', 'k_abnormal', env=env).stdout)['alias_history'][-1]['version'] == 1
