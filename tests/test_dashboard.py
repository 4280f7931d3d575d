"""The clinicians' dashboard as an attacker would try it: data values from a warehouse extract are text, never
markup or script, in the real page served by Voilà and opened in Chromium; a dashboard nobody may read does not start."""
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from conftest import chromium_page, free_port, voila_server, env_engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CDE = str(Path(sys.executable).parent / 'cde')
# fits the store's 32-character patient_key; runs script when written into a page as markup
EVIL = '<img src=x onerror=__pwned=1>'

@pytest.fixture()
def store_with_a_hostile_key(tmp_path, monkeypatch):
    "A store with three inference packets for hgb_abnormal, one of them for a patient whose key is markup."
    from sklearn.linear_model import LogisticRegression
    from cde_workbench.registry import register_model
    from cde_workbench.store import dispose_engines, inferences, runs
    monkeypatch.setenv('CDE_VAR', str(tmp_path / 'var'))
    monkeypatch.delenv('CDE_DATABASE_URL', raising=False)
    eng = env_engine()
    est = LogisticRegression().fit(np.array([[0.], [1.]]), [0, 1])
    rec = register_model(eng, 'hgb_abnormal', {'estimator': est}, {'model': {'kind': 'logistic_regression'}},
                         {'test_auroc': {'estimate': 0.7, 'low': 0.6, 'high': 0.8}}, 'a' * 64, 'b' * 64, var=tmp_path / 'var')
    t0 = datetime(2024, 3, 1, 8, tzinfo=timezone.utc)
    with eng.begin() as c:
        c.execute(runs.insert().values(run_id='r1', deployment='hgb_abnormal', kind='score', status='done', started_at=t0,
                                       finished_at=t0, parameters='{}'))
        c.execute(inferences.insert(), [dict(deployment='hgb_abnormal', model_id=rec.model_id, order_id=f'O{i}', patient_key=key,
                                             prediction_time=t0 + timedelta(hours=i), score=s, threshold=0.5, output_mode='silent',
                                             n_features=3, run_id='r1', scored_at=t0 + timedelta(hours=i))
                                        for i, (key, s) in enumerate([(EVIL, 0.9), ('P2', 0.2), ('"><script>__pwned=2</script>', 0.4)])])
    dispose_engines()
    return tmp_path


@pytest.mark.slow
def test_hostile_patient_key_is_text_in_the_voila_dashboard(store_with_a_hostile_key):
    base = store_with_a_hostile_key
    with voila_server({**os.environ, 'CDE_VAR': str(base / 'var')}, base, timeout=90) as (port, token, _):
        with chromium_page() as (page, dialogs):
            page.goto(f'http://127.0.0.1:{port}/?token={token}', timeout=90_000)
            page.wait_for_selector('#packets-hgb_abnormal', state='attached', timeout=120_000)
            page.wait_for_timeout(500)   # let any injected handler fire
            assert page.evaluate('window.__pwned') is None and not dialogs    # no script ran
            # the keys appear literally, as text, in the table of latest scores
            cells = page.locator('td').all_inner_texts()
            assert EVIL in cells and '"><script>__pwned=2</script>' in cells, cells
            assert page.locator('img[src="x"]').count() == 0
            assert page.locator('table script').count() == 0


def test_a_dashboard_without_users_is_refused_before_voila_starts(tmp_path):
    var = tmp_path / 'var'; var.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'CDE_DASHBOARD_TOKEN'}
    r = subprocess.run([CDE, 'dashboard', '--port', str(free_port())], capture_output=True, text=True, timeout=60,
                       env={**env, 'CDE_VAR': str(var)}, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith('cde: error: no dashboard users') and 'users add' in r.stderr, r.stdout + r.stderr
    assert r.stderr.strip().count('\n') == 0 and 'dashboard: http' not in r.stdout


def test_a_broken_deployment_folder_does_not_hide_the_others(store_with_a_hostile_key):
    import html
    import shutil
    from cde_workbench.dashboard import monitor_view
    from cde_workbench.store import dispose_engines
    deps = store_with_a_hostile_key / 'deployments'
    shutil.copytree(ROOT / 'deployments' / 'hgb_abnormal', deps / 'hgb_abnormal')
    (deps / 'bad-name').mkdir(); (deps / 'bad-name' / 'deployment.toml').write_text('name = "bad-name"\n')
    from cde_workbench.config import Workspace
    ws = Workspace.from_env({'CDE_VAR': str(store_with_a_hostile_key / 'var'), 'CDE_DEPLOYMENTS': str(deps)})
    try: view = monitor_view(workspace=ws)
    finally: dispose_engines()
    pages = {view.get_title(i): child.value for i, child in enumerate(view.children)}
    assert set(pages) == {'hgb_abnormal', 'bad-name'}
    assert 'Not shown' in pages['bad-name'] and 'plain identifier' in pages['bad-name']
    assert 'id="packets-hgb_abnormal">3<' in pages['hgb_abnormal'] and f'<td>{html.escape(EVIL)}</td>' in pages['hgb_abnormal']
    assert '<img src=x' not in pages['hgb_abnormal'] and '<script>' not in pages['hgb_abnormal']
