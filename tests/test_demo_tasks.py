"""The demo trains its tasks two at a time, each in its own worker process (`train_demo_tasks` in nbs/75_demo): one task's
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


def _children(pid):
    try: return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess: return []


def _cmdline(p):
    try: return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess): return []


@pytest.mark.slow
def test_a_failing_task_does_not_stop_the_one_running_beside_it(small_store):
    from cde_workbench.demo import train_demo_tasks
    from cde_workbench.config import PipelineError, Workspace
    add_deployment(small_store, 'broken', **{'train_years = [2019, 2020, 2021]': 'train_years = [2011]'})   # no data: train fails
    with pytest.raises(PipelineError, match=r"^1 of 2 demo tasks failed: broken: train\.ipynb failed in cell") as e:
        train_demo_tasks(Workspace.from_env(), [SMALL_DEPLOYMENT, 'broken'], workers=2, progress=False)
    assert 'not started' not in str(e.value)
    runs = q(small_store.url, 'select deployment, kind, status from runs order by started_at')
    assert sorted(runs) == sorted([(SMALL_DEPLOYMENT, 'train', 'succeeded'), (SMALL_DEPLOYMENT, 'evaluate', 'succeeded'),
                                   ('broken', 'train', 'failed')])
    assert q(small_store.url, "select name, alias from model_aliases") == [(SMALL_DEPLOYMENT, 'champion')]


@pytest.mark.slow
def test_sigterm_ends_every_run_and_kernel(small_store):
    add_deployment(small_store, 'second')
    env = {**os.environ, **small_store.env}
    code = ('from cde_workbench.demo import train_demo_tasks; from cde_workbench.config import Workspace; '
            f'train_demo_tasks(Workspace.from_env(), [{SMALL_DEPLOYMENT!r}, "second"], progress=False)')
    proc = subprocess.Popen([sys.executable, '-c', code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, running, kernels = time.monotonic() + 180, 0, []
        # wait until both tasks are running their train notebook, each in a kernel of its own: a run is marked running
        # a moment before its kernel starts, so on a slow machine the two are seen at different polls
        while running < 2 or len(kernels) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
            running = q(small_store.url, "select count(*) from runs where status = 'running'")[0][0]
            kernels = [p for p in _children(proc.pid) if 'ipykernel' in ' '.join(_cmdline(p))]
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


def _kernels_of_this_process():
    """Kernels this process started that are still running (a zombie has ended; its exit status only waits to be read).
    Direct children only: the end-to-end tests' demo, started in the background by this session, has kernels of its own."""
    found = []
    for p in psutil.Process().children(recursive=False):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and 'ipykernel' in ' '.join(p.cmdline()): found.append(p)
        except psutil.NoSuchProcess: pass
    return found


def test_warm_kernels_give_each_run_a_fresh_kernel_started_ahead(tmp_path):
    "Each papermill run takes a kernel of its own, started and given its imports before the run; none is left after close."
    import nbformat
    import papermill as pm
    from cde_workbench.demo import WarmKernels
    code = "import os, sys\nprint(os.getpid(), 'colorsys' in sys.modules, get_ipython().execution_count)"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), tmp_path / 'nb.ipynb')
    seen, kernels = [], []
    with WarmKernels(preload=('colorsys',), total=3) as warm:
        assert warm.started == 1   # the first run's kernel starts at once
        for i in range(3):
            out = tmp_path / f'run{i}.ipynb'
            pm.execute_notebook(str(tmp_path / 'nb.ipynb'), str(out), kernel_name='python3', progress_bar=False,
                                kernel_manager_class=warm.manager_class)
            cell = nbformat.read(out, as_version=4).cells[0]
            seen.append([*cell.outputs[0]['text'].split(), str(cell.execution_count)])
            assert warm.started == min(i + 2, 3)   # the next run's kernel started while this one ran; never more than total
            kernels += [p.pid for p in _kernels_of_this_process()]
    pids = [s[0] for s in seen]
    assert len(set(pids)) == 3, seen                      # a fresh kernel per run
    assert all(s[1] == 'True' for s in seen), seen        # its imports done before the run
    pm.execute_notebook(str(tmp_path / 'nb.ipynb'), str(tmp_path / 'cold.ipynb'), kernel_name='python3', progress_bar=False)
    cold = nbformat.read(tmp_path / 'cold.ipynb', as_version=4).cells[0]
    assert cold.outputs[0]['text'].split()[1] == 'False'   # a cold kernel has not imported it
    # ... and the imports ahead did not count as a cell: execution counts as in a cold kernel
    assert all(s[2:] == [cold.outputs[0]['text'].split()[2], str(cold.execution_count)] for s in seen), (seen, cold)
    assert not _kernels_of_this_process()
    assert not any(psutil.pid_exists(int(p)) and psutil.Process(int(p)).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_warm_kernels_report_a_failed_import_and_leave_no_kernel():
    from cde_workbench.config import PipelineError
    from cde_workbench.demo import WarmKernels
    with WarmKernels(preload=('no_such_module_for_cde',), total=1) as warm:
        with pytest.raises(PipelineError, match="could not import no_such_module_for_cde: ModuleNotFoundError"):
            warm.take()
    assert not _kernels_of_this_process()


def test_a_reused_kernel_starts_each_run_as_a_new_session(tmp_path):
    "With reuse, one kernel serves every run: the previous run's variables are gone and the cells are numbered from 1 again."
    import nbformat
    import papermill as pm
    from cde_workbench.demo import WarmKernels
    code = ("import os\nprint(os.getpid(), 'left' in globals(), get_ipython().execution_count, len(In))\n"
            "left = 'by this run'")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code), nbformat.v4.new_code_cell('pass')]),
                   tmp_path / 'nb.ipynb')
    seen = []
    with WarmKernels(total=1, reuse=True) as warm:
        for i in range(3):
            out = tmp_path / f'run{i}.ipynb'
            pm.execute_notebook(str(tmp_path / 'nb.ipynb'), str(out), kernel_name='python3', progress_bar=False,
                                kernel_manager_class=warm.manager_class)
            nb = nbformat.read(out, as_version=4)
            seen.append([*nb.cells[0].outputs[0]['text'].split(), [c.execution_count for c in nb.cells]])
        assert warm.started == 1
        assert len(_kernels_of_this_process()) == 1
    assert len({s[0] for s in seen}) == 1, seen                          # one kernel
    assert all(s[1:] == seen[0][1:] for s in seen), seen                 # ... and every run sees it as the first did
    assert seen[0][1] == 'False' and seen[0][4] == [1, 2], seen          # no variable left, cells numbered from 1
    assert not _kernels_of_this_process()


def test_closing_the_pool_stops_a_kernel_still_taken():
    "A run stopped before papermill let go of its kernel (Ctrl-C, SIGTERM): closing the pool stops that kernel too."
    from cde_workbench.demo import WarmKernels
    with WarmKernels(total=1) as warm:
        km = warm.take()
        assert len(_kernels_of_this_process()) == 1 and km.has_kernel
    assert not _kernels_of_this_process()
