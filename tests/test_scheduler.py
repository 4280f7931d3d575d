"""The scheduler (`Scheduler`, `cde schedule` in nbs/42_schedule and nbs/80_cli) with real runs: each run for its cron time
with `as_of` = that time and a full ledger row; the watchdog ends a hung run (kernel included) and the next cron time
still runs; a failing cell's error lands in the ledger's own columns; no two runs of one deployment overlap; SIGTERM ends
every run and kernel; and a scheduler killed with SIGKILL mid-run is followed, on restart, by the run marked failed and
the next cron time run exactly once."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import nbformat
import psutil
import pytest
import sqlalchemy as sa

from conftest import ROOT, SMALL_DEPLOYMENT, env_deployment, env_engine

CLOCKED = 'clocked'
T = lambda h, d=1, m=2: datetime(2024, m, d, h, tzinfo=timezone.utc)

# a scheduled notebook whose behaviour depends on its clock: it hangs at 06:00, fails at 18:00, its kernel dies at noon on
# the 2nd, and it succeeds otherwise
NOTEBOOK = """import os, signal, time
hour = as_of[11:13]
if hour == '06': time.sleep(600)
if hour == '18': raise ValueError(f'bad input at {as_of}')
if as_of.startswith('2024-02-02T12'): os.kill(os.getpid(), signal.SIGKILL)
print('done', deployment, as_of)"""


def q(engine, sql, **kw):
    with engine.connect() as c: return c.execute(sa.text(sql), kw).all()


def add_clocked(store, timeout_minutes: float, catch_up: str = 'skip'):
    "A deployment like the small store's hgb_abnormal, scheduled every six hours, with its own score notebook (NOTEBOOK), in a silent trial."
    from cde_workbench.deploy import set_status
    from cde_workbench.registry import get_model
    toml = (store.base / 'deployments' / SMALL_DEPLOYMENT / 'deployment.toml').read_text().replace(f'"{SMALL_DEPLOYMENT}"', f'"{CLOCKED}"')
    start, end = toml.index('[schedule]'), toml.index('[gates]')
    toml = toml[:start] + f'[schedule]\nscore = "0 */6 * * *"\ncatch_up = "{catch_up}"\ntimeout_minutes = {timeout_minutes}\n\n' + toml[end:]
    folder = store.base / 'deployments' / CLOCKED; folder.mkdir()
    (folder / 'deployment.toml').write_text(toml)
    params = nbformat.v4.new_code_cell('deployment = None\nrun_id = None\nas_of = None\nworkspace = None')
    params.metadata['tags'] = ['parameters']
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(NOTEBOOK)],
                                  metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nbformat.write(nb, folder / 'score.ipynb')
    engine = env_engine()
    with engine.connect() as c: rec = get_model(c, SMALL_DEPLOYMENT)
    set_status(engine, CLOCKED, 'silent', rec.model_id, 'test: scheduled')
    return env_deployment(CLOCKED)


def kernels_under(pid: int) -> list:
    "Running kernels started below process `pid`."
    try: procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess: return []
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and 'ipykernel' in ' '.join(p.cmdline()): out.append(p)
        except psutil.NoSuchProcess: pass
    return out


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.3)
    return v


def ledger(engine, name=CLOCKED):
    return q(engine, 'select scheduled_for, status, started_by, error_name, error_value, error_cell, error from runs '
                     'where deployment = :d order by scheduled_for, started_at', d=name)


def test_a_scheduled_run_is_for_its_cron_time_with_a_full_ledger_row(silent_store):
    "hgb_abnormal's weekly catch-up scoring run (Mondays 02:00) through the scheduler: as_of is the cron time, the ledger row says so."
    from cde_workbench.config import Workspace
    from cde_workbench.schedule import Scheduler
    engine, dep, rec = silent_store
    monday = datetime(2024, 2, 5, 2, 1, tzinfo=timezone.utc)
    s = Scheduler(Workspace.from_env(), [dep], clock=lambda: monday)
    out = s.tick(wait=True)
    assert [(o.run.kind, o.run.due, o.status) for o in out] == [('score', datetime(2024, 2, 5, 2, tzinfo=timezone.utc), 'succeeded')]
    (run_id, params, sched, by, pid, host, beat, timeout, nb), = q(engine, "select run_id, parameters, scheduled_for, started_by, pid, host, "
                                                                   "heartbeat_at, timeout_seconds, notebook from runs where kind = 'score'")
    assert json.loads(params)['as_of'] == '2024-02-05T02:00:00+00:00' and by == 'schedule' and timeout == 3600.0
    assert sched.startswith('2024-02-05 02:00') and pid != os.getpid() and host and beat   # run in a process of its own
    injected = [c for c in nbformat.read(nb, as_version=4).cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert 'as_of = "2024-02-05T02:00:00+00:00"' in injected[0].source
    n = q(engine, 'select count(*) from inferences where run_id = :r', r=run_id)[0][0]
    assert n > 0   # orders of the live feed up to that Monday scored
    assert s.tick(wait=True) == []   # the same clock again: nothing more is due
    assert q(engine, 'select count(*) from run_locks')[0][0] == 0
    assert q(engine, "select kind, last_due from schedule_state")[0][0] == 'score'


@pytest.mark.slow
def test_the_watchdog_ends_a_hung_run_and_the_next_cron_times_still_run(small_store):
    from cde_workbench.config import Workspace
    from cde_workbench.schedule import Scheduler
    dep = add_clocked(small_store, timeout_minutes=0.25)
    engine, clock = env_engine(), {'now': T(6)}
    s = Scheduler(Workspace.from_env(), [dep], clock=lambda: clock['now'])
    t0 = time.monotonic()
    s.tick()
    family = wait_for(lambda: kernels_under(os.getpid()), 60, 'the run to start its kernel')
    family += [psutil.Process(c.process.pid) for c in s.running.values()]
    while s.running: s.tick(); time.sleep(0.3)
    assert time.monotonic() - t0 < 60
    gone, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, f'left running after the timeout: {[p.cmdline() for p in alive]}'
    # the next cron times: one succeeds, one fails in a cell, one succeeds; then (06:00 on the 2nd missed: skipped) the kernel
    # dies at noon, and (18:00 missed) the next one succeeds
    for clock['now'] in (T(12), T(18), T(0, d=2), T(12, d=2), T(0, d=3)):
        s.tick(wait=True)
    rows = ledger(engine)
    assert [(r[0][:16], r[1], r[2]) for r in rows] == [('2024-02-01 06:00', 'failed', 'schedule'), ('2024-02-01 12:00', 'succeeded', 'schedule'),
                                                       ('2024-02-01 18:00', 'failed', 'schedule'), ('2024-02-02 00:00', 'succeeded', 'schedule'),
                                                       ('2024-02-02 12:00', 'failed', 'schedule'), ('2024-02-03 00:00', 'succeeded', 'schedule')]
    assert rows[4][3] == 'DeadKernelError', rows[4]
    assert rows[0][3] == 'RunTimeout' and 'timed out: still running after 0.25 min' in rows[0][6]
    # papermill's error, in the ledger's own columns: exception name, value and the cell's execution count
    assert rows[2][3:6] == ('ValueError', 'bad input at 2024-02-01T18:00:00+00:00', 3) and 'score.ipynb failed in cell 3' in rows[2][6]   # the parameters, papermill's injected ones, then this cell
    assert q(engine, 'select count(*) from run_locks')[0][0] == 0 and not kernels_under(os.getpid())


def test_missed_cron_times_are_caught_up_as_configured(small_store):
    "Back after a day down with catch_up = all: each missed cron time runs once, oldest first, with its own as_of."
    from cde_workbench.config import Workspace
    from cde_workbench.schedule import Scheduler
    dep = add_clocked(small_store, timeout_minutes=5, catch_up='all')
    engine = env_engine()
    from cde_workbench.store import schedule_state
    with engine.begin() as c: c.execute(schedule_state.insert().values(deployment=CLOCKED, kind='score', last_due=T(12), updated_at=T(12)))
    out = Scheduler(Workspace.from_env(), [dep], clock=lambda: T(0, d=2).replace(minute=1)).tick(wait=True)
    assert [(o.run.due.hour, o.run.started_by, o.status) for o in out] == [(18, 'catch-up', 'failed'), (0, 'schedule', 'succeeded')]
    assert [(r[0][:16], r[1]) for r in ledger(engine)] == [('2024-02-01 18:00', 'failed'), ('2024-02-02 00:00', 'succeeded')]


def schedule_cli(store, *args):
    env = {**os.environ, **store.env}
    return subprocess.Popen([sys.executable, '-c', 'from cde_workbench.cli import main; main()', 'schedule', 'run', '--deployment', CLOCKED,
                             '--poll', '0.3', *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def running_run(engine):
    rows = q(engine, "select run_id, pid from runs where deployment = :d and status = 'running'", d=CLOCKED)
    return rows[0] if rows else None


@pytest.mark.slow
def test_sigterm_ends_every_run_and_kernel_and_a_second_run_is_refused_meanwhile(small_store):
    from cde_workbench.config import Workspace
    from cde_workbench.schedule import RunLockedError, run_notebook
    dep = add_clocked(small_store, timeout_minutes=10)
    engine = env_engine()
    proc = schedule_cli(small_store, '--clock-start', '2024-02-01T05:59:58+00:00')
    try:
        wait_for(lambda: kernels_under(proc.pid), 90, 'the 06:00 run to start its kernel')
        family = psutil.Process(proc.pid).children(recursive=True)
        run_id, pid = running_run(engine)
        with pytest.raises(RunLockedError, match=rf"deployment 'clocked' has a run in progress: {run_id} \(process {pid} on "):
            run_notebook(Workspace.from_env(), dep, 'score', {'as_of': T(7).isoformat()})   # by hand, meanwhile: refused
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    gone, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, f'left running after the scheduler stopped: {[p.cmdline() for p in alive]}'
    (sched, status, by, name, value, cell, error), = ledger(engine)
    assert (status, name) == ('failed', 'SchedulerStopped') and 'the scheduler was stopped (stopped by signal 15)' in error
    assert q(engine, 'select count(*) from run_locks')[0][0] == 0
    assert q(engine, "select count(*) from runs where kind = 'score' and status = 'running'")[0][0] == 0


@pytest.mark.slow
@pytest.mark.parametrize('killed', ['scheduler', 'scheduler and run'])
def test_a_scheduler_killed_mid_run_leaves_a_failed_run_and_the_next_cron_time_runs_once(small_store, killed):
    """SIGKILL to the scheduler (its run process then ends itself), or to the scheduler and its run process together (the run's
    row still says running, its lock held by a dead process): on restart the run is failed and the next cron time runs once."""
    add_clocked(small_store, timeout_minutes=10)
    engine = env_engine()
    proc = schedule_cli(small_store, '--clock-start', '2024-02-01T05:59:58+00:00')
    try:
        wait_for(lambda: kernels_under(proc.pid), 90, 'the 06:00 run to start its kernel')
        family = psutil.Process(proc.pid).children(recursive=True)
        run_id, pid = running_run(engine)
        if killed == 'scheduler and run':   # frozen first, so that it cannot see its run end; then both killed
            proc.send_signal(signal.SIGSTOP); os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None: proc.kill()
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f'left running after the scheduler was killed: {[p.cmdline() for p in alive]}'
    if killed == 'scheduler and run':   # nobody was left to say how the run ended
        assert running_run(engine) == (run_id, pid) and q(engine, 'select run_id from run_locks') == [(run_id,)]
    again = schedule_cli(small_store, '--clock-start', '2024-02-01T11:59:58+00:00', '--until', '2024-02-01T12:00:01+00:00')
    try: out = again.communicate(timeout=120)[0].decode()
    finally:
        if again.poll() is None: os.killpg(again.pid, signal.SIGKILL)
    assert again.returncode == 0, out
    rows = ledger(engine)
    assert [(r[0][:16], r[1]) for r in rows] == [('2024-02-01 06:00', 'failed'), ('2024-02-01 12:00', 'succeeded')], (rows, out)
    name, error = rows[0][3], rows[0][6]
    if killed == 'scheduler':   # its run process, told by the kernel, says so; or, on a busy machine, the restarted scheduler found it ended first
        assert (name, error) == ('RunStopped', 'the scheduler (process %d) ended' % proc.pid) or (name == 'RunAbandoned' and 'has ended' in error), (name, error)
    else: assert name == 'RunAbandoned' and f'its process {pid} on ' in error and 'has ended' in error
    assert q(engine, 'select count(*) from run_locks')[0][0] == 0
    assert q(engine, "select last_due from schedule_state where deployment = 'clocked'")[0][0].startswith('2024-02-01 12:00')


@pytest.fixture
def icu_store(small_store):
    "The small store with icu_transfer_24h trained (one quick candidate) and in a silent trial, its prospective feed delivered."
    from conftest import deliver_feed
    from cde_workbench.deploy import set_status
    from cde_workbench.train import train_deployment
    folder = small_store.base / 'deployments' / 'icu_transfer_24h'; folder.mkdir()
    toml = (ROOT / 'deployments' / 'icu_transfer_24h' / 'deployment.toml').read_text().replace('bootstrap = 1000', 'bootstrap = 50')
    (folder / 'deployment.toml').write_text(toml.replace('candidates = ["logistic_regression", "hist_gradient_boosting"]', 'candidates = ["logistic_regression"]'))
    engine, dep = env_engine(), env_deployment('icu_transfer_24h')
    rec = train_deployment(engine, dep, small_store.base / 'var', progress=False)
    set_status(engine, dep.name, 'silent', rec.model_id, 'test: clock trigger')
    deliver_feed(engine)
    return engine, dep, rec


def test_the_clock_trigger_scores_the_wards_inpatients_once_per_cron_time(icu_store):
    "The scheduler runs the shared score notebook at the ICU model's cron time; it scores the population of its wards as known then."
    import numpy as np
    import polars as pl
    from cde_workbench.clock import ward_population
    from cde_workbench.config import Workspace
    from cde_workbench.feature_store import online_vector
    from cde_workbench.registry import load_bundle
    from cde_workbench.schedule import Scheduler, run_notebook
    from cde_workbench.tasks import exclusion_mask
    engine, dep, rec = icu_store
    from datetime import timedelta
    with engine.connect() as c:   # the six-hourly cron time of the feed's months with the most patients to score, and that population
        def population(when):
            pop = ward_population(c, when, dep.trigger.wards)
            return pop.filter(~pl.Series(exclusion_mask(c, dep.task, pop, as_of=when))) if pop.height else pop
        when = max((T(0, 1, m=1) + timedelta(hours=6 * i) for i in range(4 * 75)), key=lambda t: population(t).height)
        pop = population(when)
    assert pop.height >= 2 and set(pop['ward']) <= set(dep.trigger.wards), pop
    out = Scheduler(Workspace.from_env(), [dep], clock=lambda: when).tick(wait=True)
    assert [(o.run.kind, o.run.due, o.status) for o in out] == [('score', when, 'succeeded')], out
    rows = q(engine, 'select order_id, patient_key, encounter_id, prediction_time, trigger, output_mode, shown, decision, score, features, run_id '
                     'from inferences where deployment = :d order by order_id', d=dep.name)
    assert [r[0] for r in rows] == sorted(f'{e}@{when:%Y%m%dT%H%M}' for e in pop['encounter_id'])   # one packet per point
    assert {(r[4], r[5], r[6], r[10]) for r in rows} == {('schedule', 'silent', 0, out[0].run_id)}
    assert all(r[3].startswith(f'{when:%Y-%m-%d %H:%M}') and json.loads(r[9]) for r in rows)
    # the batch transform gives each point what the online path gives it alone, as known at the cron time: the same score
    bundle = load_bundle(rec)
    with engine.connect() as c:
        for r in rows:
            x = online_vector(c, bundle['featurizer'], r[1], when)
            assert np.isclose(bundle['estimator'].predict_proba(x)[0, 1], r[8], rtol=0, atol=1e-9)
            assert json.loads(r[9]) == {bundle['featurizer'].feature_names_[j]: v for j, v in zip(x.indices, x.data)}
    # the same cron time again (by hand): nothing is stored twice
    again = run_notebook(Workspace.from_env(), dep, 'score', {'as_of': when.isoformat()})
    assert q(engine, 'select count(*) from inferences where deployment = :d', d=dep.name)[0][0] == len(rows)
    assert q(engine, 'select count(*) from inferences where run_id = :r', r=again.run_id)[0][0] == 0


def test_run_locks_and_abandoned_runs_on_both_backends(store_url):
    "The lock is a row insert on SQLite and PostgreSQL alike: taken once, refused while its holder lives, taken over from a dead one."
    from cde_workbench.schedule import acquire_lock, lock_holder, recover_abandoned_runs, release_lock, run_ledger, this_host
    from cde_workbench.store import get_engine, run_locks, runs
    engine = get_engine(store_url)
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    assert acquire_lock(engine, 'a', 'r1') is None and acquire_lock(engine, 'a', 'r2').run_id == 'r1'
    with run_ledger(engine, 'b', 'score', {}, run_id='r3', heartbeat_seconds=None): pass
    with engine.begin() as c:   # r3 "still running" in a process that has ended, holding b's lock
        c.execute(runs.update().where(runs.c.run_id == 'r3').values(status='running', pid=dead.pid))
        c.execute(run_locks.insert().values(deployment='b', run_id='r3', acquired_at=T(0), heartbeat_at=T(0), pid=dead.pid, host=this_host()))
    assert recover_abandoned_runs(engine) == ['r3']
    with engine.connect() as c:
        assert c.execute(sa.select(runs.c.status, runs.c.error_name).where(runs.c.run_id == 'r3')).one() == ('failed', 'RunAbandoned')
        assert lock_holder(c, 'b') is None and lock_holder(c, 'a').run_id == 'r1'
    release_lock(engine, 'a', 'r1')
    assert acquire_lock(engine, 'a', 'r4') is None


@pytest.mark.slow
def test_schedule_list_and_once_from_the_command_line(small_store):
    add_clocked(small_store, timeout_minutes=5)
    env = {**os.environ, **small_store.env}
    cde = lambda *a: subprocess.run([sys.executable, '-c', 'from cde_workbench.cli import main; main()', 'schedule', *a, '--deployment', CLOCKED],
                                    env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    r = cde('list', '--at', '2024-02-01T10:00:00+00:00')
    assert r.returncode == 0 and re.fullmatch(r'clocked +score +0 \*/6 \* \* \* +last - +next 2024-02-01 12:00 UTC\n', r.stdout), r.stdout + r.stderr
    r = cde('once', '--at', '2024-02-01T12:01:00+00:00')
    assert r.returncode == 0 and re.search(r'clocked score for 2024-02-01 12:00 UTC: run \S+ succeeded', r.stdout), r.stdout + r.stderr
    assert 'last 2024-02-01 12:00 UTC' in cde('list', '--at', '2024-02-01T12:30:00+00:00').stdout
    r = cde('once', '--at', '2024-02-01T12:30:00+00:00')
    assert r.returncode == 0 and 'nothing due at 2024-02-01 12:30:00 UTC' in r.stdout
    r = cde('once', '--at', '2024-02-01T18:00:00+00:00')   # its notebook fails at 18:00: one line, exit status 2
    assert r.returncode == 2 and r.stderr.startswith('cde: error: 1 of 1 scheduled run(s) failed: clocked score ') and r.stderr.count('\n') == 1, r.stderr
    assert 'ValueError: bad input at 2024-02-01T18:00:00+00:00' in r.stderr
