"""Shared fixtures: an isolated var/ and reports/ per test session, SQLite and a throwaway PostgreSQL store."""
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgserver import postgres_available, stop_all, throwaway_postgres  # noqa: E402


# tests/airflow runs in its own environment with Airflow installed (`make airflow-test`), never in the workbench's
collect_ignore = ['airflow']

SHARED = ROOT.parent / 'shared' / 'data'   # ../shared/data: public test data kept outside the repository


def in_ci() -> bool:
    "Whether the tests run under CI (env CI set and not empty/0/false), where a missing input is a failure, never a skip."
    return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')


def needs_shared(path: Path, what: str) -> None:
    """Call at module level: skip the module when `path` (under ../shared/data) is missing, or fail it when CI is set,
    so that CI cannot pass by silently skipping the tests on the public data."""
    if Path(path).exists(): return
    msg = f'{what} not found at {Path(path).resolve()} (../shared/data relative to the repository)'
    if in_ci(): pytest.fail(f'{msg}; CI is set, so this fails rather than skips', pytrace=False)
    pytest.skip(msg, allow_module_level=True)


@pytest.fixture(scope='session', autouse=True)
def isolated_var(tmp_path_factory):
    "Every test session writes under its own temporary var/ and reports/, never the checkout's."
    base = tmp_path_factory.mktemp('cde')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CDE_VAR', str(base / 'var')); mp.setenv('CDE_REPORTS', str(base / 'reports'))
        mp.delenv('CDE_DATABASE_URL', raising=False); mp.delenv('CDE_SITE_KEY_FILE', raising=False)
        yield base


@pytest.fixture(scope='session')
def pg_url():
    "A brand-new PostgreSQL server on 127.0.0.1 for the session (make test installs the binaries)."
    if not postgres_available():
        if os.environ.get('CDE_SKIP_POSTGRES') == '1' and not in_ci(): pytest.skip('PostgreSQL binaries not installed and CDE_SKIP_POSTGRES=1')
        pytest.fail('PostgreSQL server binaries are not installed: run `make test`, which installs them')
    with throwaway_postgres() as url:
        yield url


@pytest.fixture(params=['sqlite', 'postgresql'])
def store_url(request, tmp_path):
    "The store on each backend: a fresh SQLite file, or a fresh database on the session's PostgreSQL server."
    if request.param == 'sqlite':
        yield f'sqlite:///{tmp_path}/store.sqlite'
        return
    import sqlalchemy as sa
    base = request.getfixturevalue('pg_url')
    name = f'cde_{abs(hash(request.node.nodeid)) % 10**10}'
    admin = sa.create_engine(base, isolation_level='AUTOCOMMIT')
    with admin.connect() as c: c.execute(sa.text(f'CREATE DATABASE {name}'))
    yield base.rsplit('/', 1)[0] + f'/{name}'
    from cde_workbench.store import dispose_engines
    dispose_engines()
    with admin.connect() as c: c.execute(sa.text(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)'))
    admin.dispose()


# ----------------------------------------------------------------------------------------------------------------------
# A small trained store, built once per session and copied by the tests that change it.

SMALL_DEPLOYMENT = 'hgb_abnormal'


def env_engine():
    "The store the environment points at (tests stand where the command line stands)."
    from cde_workbench.config import Workspace
    from cde_workbench.store import get_engine
    return get_engine(Workspace.from_env().database_url)


def env_key() -> bytes:
    "The site key the environment points at: the one the command line (and its kernels) pseudonymise with."
    from cde_workbench.config import Workspace
    from cde_workbench.pseudonyms import site_key
    return site_key(Workspace.from_env().site_key_file)


def env_deployment(name: str = SMALL_DEPLOYMENT):
    "A deployment from the folder the environment points at: tests stand where the command line stands."
    from cde_workbench.config import Workspace
    from cde_workbench.deployment import load_deployment
    return load_deployment(name, Workspace.from_env().deployments)


@dataclass(frozen=True)
class SmallStore:
    "A store under `base`: var/ (SQLite store, model bundles), reports/, deployments/ and a site key."
    base: Path

    @property
    def env(self) -> dict[str, str]:
        "The CDE_* variables that point the workbench (and its papermill kernels) at this store."
        b = self.base
        return {'CDE_VAR': str(b / 'var'), 'CDE_REPORTS': str(b / 'reports'), 'CDE_DEPLOYMENTS': str(b / 'deployments'),
                'CDE_SITE_KEY_FILE': str(b / 'site.key')}

    @property
    def url(self) -> str: return f"sqlite:///{self.base / 'var' / 'cde.sqlite'}"

    def apply(self, mp: pytest.MonkeyPatch) -> None:
        "Point the environment at this store for the duration of `mp`."
        for k, v in self.env.items(): mp.setenv(k, v)
        mp.delenv('CDE_DATABASE_URL', raising=False)

    def copy(self, dest: Path) -> 'SmallStore':
        "A copy under `dest` to change freely (the model bundles, immutable once registered, stay shared)."
        shutil.copytree(self.base, dest, ignore=shutil.ignore_patterns('extract'))
        return SmallStore(dest)


@pytest.fixture(scope='session')
def small_trained_store(tmp_path_factory) -> SmallStore:
    """200 synthetic patients, their warehouse extract loaded, and `hgb_abnormal` trained with two quick candidates
    (logistic regression, a 40-tree forest) and 200 bootstrap resamples; no deployment status set, no HL7 feed yet.
    Read-only: tests that change the store use `small_store` (a copy)."""
    from cde_workbench.deployment import load_deployment
    from cde_workbench.store import dispose_engines, get_engine
    from cde_workbench.synth import HospitalConfig, generate, write_warehouse_extract
    from cde_workbench.train import train_deployment
    from cde_workbench.warehouse import load_warehouse_extract
    store = SmallStore(tmp_path_factory.mktemp('small-store'))
    with pytest.MonkeyPatch.context() as mp:
        store.apply(mp)
        folder = store.base / 'deployments' / SMALL_DEPLOYMENT; folder.mkdir(parents=True)
        shutil.copytree(ROOT / 'deployments' / '_pipelines', store.base / 'deployments' / '_pipelines')
        toml = (ROOT / 'deployments' / SMALL_DEPLOYMENT / 'deployment.toml').read_text()
        toml = re.sub(r'n_estimators = \[\d+\]', 'n_estimators = [40]', re.sub(r'bootstrap = \d+', 'bootstrap = 200', toml))
        toml = re.sub(r'candidates = \[.*\]', 'candidates = ["logistic_regression", "random_forest"]', toml)   # keep it short
        assert 'n_estimators = [40]' in toml and 'bootstrap = 200' in toml and '"random_forest"]' in toml
        (folder / 'deployment.toml').write_text(toml)
        write_warehouse_extract(generate(HospitalConfig(n_patients=200, seed=5)), store.base / 'extract', env_key())
        engine = get_engine(store.url)
        try:
            load_warehouse_extract(engine, store.base / 'extract')
            train_deployment(engine, load_deployment(SMALL_DEPLOYMENT, store.base / 'deployments'), store.base / 'var', progress=False)
        finally: dispose_engines()   # closes the SQLite files, so that copies are complete
    return store


@pytest.fixture
def small_store(small_trained_store, tmp_path, monkeypatch) -> SmallStore:
    "A private copy of the small trained store, with the environment pointing at it for the test."
    from cde_workbench.store import dispose_engines
    store = small_trained_store.copy(tmp_path / 'store')
    store.apply(monkeypatch)
    yield store
    dispose_engines()


def deliver_feed(engine, until=None) -> int:
    """Store and process the small hospital's prospective HL7 feed (up to `until`), each message received at its own time,
    as the receiver's replay clock does; returns how many messages were delivered."""
    from cde_workbench.events import process_pending
    from cde_workbench.ids import store_messages
    from cde_workbench.synth import HospitalConfig, generate, hl7_feed
    feed = [(m, t, 'test') for t, m in hl7_feed(generate(HospitalConfig(n_patients=200, seed=5))) if until is None or t <= until]
    store_messages(engine, feed)
    process_pending(engine, key=env_key())   # the workspace's key: the test's environment points at it
    return len(feed)


@pytest.fixture
def silent_store(small_store):
    "The small store with its prospective feed delivered and `hgb_abnormal` in a silent trial of its trained model: (engine, deployment, model)."
    from cde_workbench.deploy import set_status
    from cde_workbench.registry import get_model
    engine = env_engine()
    assert deliver_feed(engine) > 200
    dep = env_deployment()
    with engine.connect() as c: rec = get_model(c, dep.name)
    set_status(engine, dep.name, 'silent', rec.model_id, 'test: silent trial')
    return engine, dep, rec


# ----------------------------------------------------------------------------------------------------------------------
# The demo, run once per session as a user runs it, for every end-to-end test that needs a fully trained store. It starts
# in the background as soon as the tests are collected, and the tests that use it run last: the demo (mostly papermill
# kernels and model fitting) runs beside the rest of the suite instead of after it.

# 600 patients, seed 3 by default; CDE_TEST_DEMO_PATIENTS=3000 CDE_TEST_DEMO_SEED=7 runs the end-to-end tests on `make
# demo`'s own hospital (there hgb_abnormal passes its go-live gates, so the ward view shows live scores), the time-out scaled
DEMO_PATIENTS = int(os.environ.get('CDE_TEST_DEMO_PATIENTS') or 600)
DEMO_ARGS = ('demo', '--patients', str(DEMO_PATIENTS), '--seed', os.environ.get('CDE_TEST_DEMO_SEED') or '3')
DEMO_TIMEOUT = 900 * max(1, DEMO_PATIENTS // 600)   # seconds from its start
_DEMO: dict = {}


def _start_demo() -> None:
    import subprocess
    import tempfile
    import time
    base = Path(tempfile.mkdtemp(prefix='cde-test-demo-'))
    env = {**os.environ, 'CDE_VAR': str(base / 'var'), 'CDE_REPORTS': str(base / 'reports')}
    for k in ('CDE_DATABASE_URL', 'CDE_SITE_KEY_FILE'): env.pop(k, None)
    out, err = open(base / 'demo.out', 'w'), open(base / 'demo.err', 'w')
    proc = subprocess.Popen([str(Path(sys.executable).parent / 'cde'), *DEMO_ARGS], stdout=out, stderr=err, env=env, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    _DEMO.update(proc=proc, base=base, env=env, started=time.monotonic(), files=(out, err))


def pytest_configure(config):
    """SIGTERM (a CI time-out, `kill`) stops the session's PostgreSQL servers and background demo at once, then ends the
    session as Ctrl-C does (fixture teardown after an interrupted test may not get as far): nothing is left holding a port."""
    import signal
    def _interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # once
        stop_all()
        _stop_demo()
        raise KeyboardInterrupt(f'stopped by signal {signum}')
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_itemcollected(item):
    "The end-to-end tests on the demo's store are system tests: `make soak` runs them (and starts the demo), `make test` does not."
    if 'demo' in getattr(item, 'fixturenames', ()): item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    "Tests that use the `demo` fixture run last; the demo starts now, in the background, when any of them was selected."
    uses = [i for i in items if 'demo' in getattr(i, 'fixturenames', ())]
    if not uses or config.option.collectonly: return
    later = set(uses)
    items[:] = [i for i in items if i not in later] + uses
    _start_demo()


def _stop_demo() -> None:
    "Stop the background demo if it is still running (SIGTERM, which ends its kernels and MLLP receiver)."
    import subprocess
    proc = _DEMO.get('proc')
    if proc is None or proc.poll() is not None: return
    proc.terminate()
    try: proc.wait(60)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def pytest_sessionfinish(session, exitstatus):
    "Stop a demo still running (an interrupted or failed session) and tidy up after a pass."
    if not _DEMO: return
    _stop_demo()
    for f in _DEMO['files']: f.close()
    if exitstatus == 0: shutil.rmtree(_DEMO['base'], ignore_errors=True)


@pytest.fixture(scope='session')
def demo():
    """`cde demo` on a small hospital (600 patients unless CDE_TEST_DEMO_PATIENTS says otherwise) in its own process, private var/ and reports/: its output, environment,
    store engine and folder. Shared by every test of the session: a test may add to its store only what no other test counts."""
    import subprocess
    import time
    import sqlalchemy as sa
    if not _DEMO: _start_demo()
    proc, base = _DEMO['proc'], _DEMO['base']
    try: proc.wait(max(1.0, DEMO_TIMEOUT - (time.monotonic() - _DEMO['started'])))
    except subprocess.TimeoutExpired:
        proc.kill(); proc.wait()
    for f in _DEMO['files']: f.flush()
    out, err = (base / 'demo.out').read_text(), (base / 'demo.err').read_text()
    assert proc.returncode == 0, f'cde {" ".join(DEMO_ARGS)} exited with {proc.returncode} (timeout {DEMO_TIMEOUT} s):\n' + out[-3000:] + err[-3000:]
    engine = sa.create_engine(f"sqlite:///{base / 'var' / 'cde.sqlite'}")
    yield {'env': _DEMO['env'], 'out': out, 'engine': engine, 'base': base}
    engine.dispose()


# ---- helpers shared by the command-line and browser tests

CDE = [str(Path(sys.executable).parent / 'cde')]
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking']


@contextmanager
def chromium_page():
    """A new page in Debian's Chromium (Playwright) and the list of messages of any dialog it opened (each dismissed: a
    dialog is script that ran); the browser is closed on exit."""
    from playwright.sync_api import sync_playwright
    assert Path(CHROMIUM).exists(), 'Chromium missing: make test installs it'
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, dialogs = browser.new_page(), []
            page.on('dialog', lambda d: (dialogs.append(d.message), d.dismiss()))
            yield page, dialogs
        finally: browser.close()


def screenshot(page, name: str) -> Path:
    """A full-page screenshot kept as a test artefact: var/test-artefacts/screenshots/<name>.png under the repository (or under
    $CDE_TEST_ARTEFACTS), where a reviewer or CI finds it after the run; the path."""
    out = Path(os.environ.get('CDE_TEST_ARTEFACTS') or ROOT / 'var' / 'test-artefacts') / 'screenshots' / f'{name}.png'
    out.parent.mkdir(parents=True, exist_ok=True)
    # Voila and JupyterLab scroll inside a container, so a full-page shot would stop at the window: the window is made as
    # tall as the tallest scrolling content for the shot (at most 12,000 pixels), then restored
    size = page.viewport_size
    tall = page.evaluate('Math.max(document.body.scrollHeight, ...[...document.querySelectorAll("*")].map(e => e.scrollHeight))')
    page.set_viewport_size({'width': size['width'], 'height': max(size['height'], min(int(tall) + 40, 12_000))})
    try: page.screenshot(path=str(out), full_page=True)
    finally: page.set_viewport_size(size)
    return out


def cde(*args, env=None):
    "Run the `cde` command from the repository with extra environment variables; its completed process."
    import subprocess
    e = {**os.environ, **(env or {})}
    return subprocess.run([*CDE, *args], capture_output=True, text=True, env=e, timeout=120, cwd=ROOT)


def one_line_error(r, *needles):
    "The command failed as bad input should: exit status 2, one line on stderr naming the problem, no traceback."
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.count('\n') == 0 and err.startswith('cde: error: ') and 'Traceback' not in r.stderr + r.stdout, r.stderr
    for n in needles: assert n in err, (n, err)


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on now."
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@contextmanager
def voila_server(env: dict, base: Path, timeout: float = 60, role: str = 'datascience', notebook: Path | None = None):
    """One dashboard page (default the monitoring one) served alone at / by Voilà on 127.0.0.1, with what `cde dashboard` serves it with (the users file, Voilà's
    settings file, a session of its own): yields (port, token of a new user with `role`, status of an unauthenticated
    GET /); on exit the server and everything it started are ended."""
    import http.client, subprocess, time
    from cde_workbench.access import add_user, stop_session, users_file, voila_command, write_voila_config
    from cde_workbench.dashboard import dashboard_notebook
    from cde_workbench.config import Workspace
    ws = Workspace.from_env(env)
    port, token = free_port(), 'test-token-' + os.urandom(16).hex()
    users = users_file(ws)
    add_user(users, 'tester-' + os.urandom(4).hex(), role, token)
    env = {k: v for k, v in env.items() if k != 'CDE_DASHBOARD_TOKEN'}
    env = {**env, 'JUPYTER_PLATFORM_DIRS': '1', 'JUPYTER_RUNTIME_DIR': str(base / 'runtime')}
    log = open(base / 'voila.log', 'wb')
    proc = subprocess.Popen(voila_command(port, write_voila_config(ws.var / 'dashboard', users), notebook=notebook or dashboard_notebook()), cwd=ROOT / 'dashboards', env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (base / 'voila.log').read_text()[-2000:]
            try:
                c = http.client.HTTPConnection('127.0.0.1', port, timeout=2); c.request('GET', '/'); status = c.getresponse().status; c.close()
                break
            except OSError: time.sleep(0.2)
        yield port, token, status
    finally:
        stop_session(proc, grace=10)
        log.close()
