"""The demo trains its tasks two at a time, each in its own worker process (`train_demo_tasks` in nbs/80_cli): one task's
failure is its own (the other's run goes on and succeeds), and SIGTERM to the demo ends every run and every kernel, with
the run ledger saying so."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import sqlalchemy as sa

from conftest import ROOT, SMALL_DEPLOYMENT


def q(url, sql, **kw):
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c: return c.execute(sa.text(sql), kw).all()
    finally: eng.dispose()


def add_deployment(store, name, **replace):
    "A deployment folder like the small store's hgb_abnormal, under another name, with some lines replaced."
    toml = (store.base / 'deployments' / SMALL_DEPLOYMENT / 'deployment.toml').read_text().replace(f'"{SMALL_DEPLOYMENT}"', f'"{name}"')
    for old, new in replace.items():
        assert old in toml
        toml = toml.replace(old, new)
    (store.base / 'deployments' / name).mkdir()
    (store.base / 'deployments' / name / 'deployment.toml').write_text(toml)


def test_a_failing_task_does_not_stop_the_one_running_beside_it(small_store):
    from cde_workbench.cli import train_demo_tasks
    from cde_workbench.config import PipelineError, Workspace
    add_deployment(small_store, 'broken', **{'train_years = [2019, 2020, 2021]': 'train_years = [2011]'})   # no data: train fails
    with pytest.raises(PipelineError, match=r"^1 of 2 demo tasks failed: broken: train\.ipynb failed in cell") as e:
        train_demo_tasks(Workspace.from_env(), [SMALL_DEPLOYMENT, 'broken'], workers=2, progress=False)
    assert 'not started' not in str(e.value)
    runs = q(small_store.url, 'select deployment, kind, status from runs order by started_at')
    assert sorted(runs) == sorted([(SMALL_DEPLOYMENT, 'train', 'succeeded'), (SMALL_DEPLOYMENT, 'evaluate', 'succeeded'),
                                   ('broken', 'train', 'failed')])
    assert q(small_store.url, "select name, alias from model_aliases") == [(SMALL_DEPLOYMENT, 'champion')]


def test_sigterm_ends_every_run_and_kernel(small_store):
    add_deployment(small_store, 'second')
    env = {**os.environ, **small_store.env}
    code = ('from cde_workbench.cli import train_demo_tasks; from cde_workbench.config import Workspace; '
            f'train_demo_tasks(Workspace.from_env(), [{SMALL_DEPLOYMENT!r}, "second"], progress=False)')
    proc = subprocess.Popen([sys.executable, '-c', code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, kernels = time.monotonic() + 180, []
        while len(kernels) < 2:   # both tasks are running their train notebook in a kernel of their own
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
            kernels = [p for p in psutil.Process(proc.pid).children(recursive=True) if 'ipykernel' in ' '.join(p.cmdline())]
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=90)[0].decode()
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode != 0, out
    gone, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f'still running after the demo stopped: {[p.cmdline() for p in alive]}'
    runs = q(small_store.url, 'select deployment, kind, status, error from runs')
    assert sorted(r[:3] for r in runs) == [('hgb_abnormal', 'train', 'failed'), ('second', 'train', 'failed')], runs
    assert all('signal 15' in r[3] for r in runs), runs
