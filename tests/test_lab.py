"""`cde lab`: JupyterLab for researchers. The getting-started notebook runs to the end under papermill and in the browser;
the token never appears in a command line; a port in use is a one-line error; SIGTERM ends JupyterLab and its kernels."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from conftest import CDE, ROOT, chromium_page, cde, free_port, one_line_error, screenshot

NOTEBOOK = ROOT / 'research' / 'getting_started.ipynb'


def lab_env(tmp_path: Path, **extra) -> dict:
    "The environment of a `cde lab` on a workspace of its own under `tmp_path` (no token of ours unless given)."
    env = {k: v for k, v in os.environ.items() if k not in ('CDE_LAB_TOKEN', 'JUPYTER_TOKEN', 'CDE_DATABASE_URL', 'CDE_SITE_KEY_FILE')}
    return {**env, 'CDE_VAR': str(tmp_path / 'var'), 'CDE_REPORTS': str(tmp_path / 'reports'), **extra}


def api(port: int, token: str, path: str, method: str = 'GET', body: dict | None = None):
    "Status and JSON of a JupyterLab REST call with the token in the Authorization header."
    req = urllib.request.Request(f'http://127.0.0.1:{port}{path}', method=method, headers={'Authorization': f'token {token}'},
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r: return r.status, json.loads(r.read() or b'null')
    except urllib.error.HTTPError as e: return e.code, None


@contextmanager
def running_lab(tmp_path: Path, *args, env: dict | None = None, timeout: float = 120):
    """`cde lab --port P` as a user starts it: yields (process, port, token, url printed); on exit it gets SIGTERM if it still
    runs (and, as a last resort for a failed test, its whole session is killed)."""
    port = free_port()
    env = env or lab_env(tmp_path)
    out, err = open(tmp_path / 'lab.out', 'w+'), open(tmp_path / 'lab.err', 'w')
    proc = subprocess.Popen([*CDE, 'lab', '--port', str(port), *args], env=env, cwd=ROOT, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, url, token = time.monotonic() + timeout, None, env.get('CDE_LAB_TOKEN')
        while True:
            log = (tmp_path / 'lab.out').read_text() + (tmp_path / 'lab.err').read_text()[-3000:]
            assert proc.poll() is None, f'cde lab exited with {proc.returncode}:\n{log}'
            assert time.monotonic() < deadline, f'JupyterLab not up in {timeout} s:\n{log}'
            if url is None and 'lab: open ' in (text := (tmp_path / 'lab.out').read_text()):
                url = text.split('lab: open ', 1)[1].split()[0]
                if token is None: token = url.split('?token=', 1)[1]
            if url is not None:
                try:
                    if api(port, token, '/api/status')[0] == 200: break
                except OSError: pass
            time.sleep(0.3)
        yield proc, port, token, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try: proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        out.close(); err.close()


def processes_with(text: str) -> list[psutil.Process]:
    "Live processes whose command line contains `text`."
    found = []
    for p in psutil.process_iter(['cmdline', 'status']):
        try:
            if p.info['status'] != psutil.STATUS_ZOMBIE and text in ' '.join(p.info['cmdline'] or ()): found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied): pass
    return found


def start_kernel(port: int, token: str, runtime: Path, timeout: float = 60) -> psutil.Process:
    "Start a kernel through JupyterLab's API; its process (found by its connection file in the lab's runtime folder)."
    status, k = api(port, token, '/api/kernels', 'POST', {'name': 'python3'})
    assert status == 201, status
    deadline = time.monotonic() + timeout
    while not (found := processes_with(str(runtime / f"kernel-{k['id']}.json"))):
        assert time.monotonic() < deadline, 'the kernel process did not appear'
        time.sleep(0.2)
    return found[0]


def port_is_free(port: int) -> bool:
    "Nothing listens on the port (connections closed a moment ago, in TIME_WAIT, do not count: the server binds as this does)."
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try: s.bind(('127.0.0.1', port)); return True
        except OSError: return False


def test_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0)); busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = cde('lab', '--port', str(port), env=lab_env(tmp_path))
        one_line_error(r, f'port {port} on 127.0.0.1 is in use', '--port')
        assert time.monotonic() - t0 < 30
    assert not (tmp_path / 'var' / 'lab' / 'runtime').exists() or not any((tmp_path / 'var' / 'lab' / 'runtime').iterdir())


def test_a_weak_chosen_token_is_a_one_line_error(tmp_path):
    r = cde('lab', '--port', str(free_port()), env=lab_env(tmp_path, CDE_LAB_TOKEN='password'))
    one_line_error(r, 'CDE_LAB_TOKEN', 'at least 32')
    assert 'password' not in r.stderr


@pytest.mark.slow
def test_token_never_in_argv_and_sigterm_ends_lab_and_kernels(tmp_path):
    "JupyterLab up in ~15 s on 2 busy cores: slow."
    runtime = tmp_path / 'var' / 'lab' / 'runtime'
    with running_lab(tmp_path) as (proc, port, token, url):
        assert len(token) >= 32 and url == f'http://127.0.0.1:{port}/lab/tree/getting_started.ipynb?token={token}'
        assert api(port, 'wrong-' + token, '/api/contents')[0] == 403   # the token is needed
        status, nb = api(port, token, '/api/contents/getting_started.ipynb?content=0')
        assert status == 200 and nb['type'] == 'notebook'
        status, pipes = api(port, token, '/api/contents/pipelines')       # the deployments' pipelines, through the link
        assert status == 200 and {'train.ipynb', 'evaluate.ipynb', 'report.ipynb'} <= {c['name'] for c in pipes['content']}
        kernels = [start_kernel(port, token, runtime) for _ in range(2)]
        server = [p for p in processes_with('-m jupyterlab') if f'--ServerApp.port={port}' in ' '.join(p.cmdline())]
        assert len(server) == 1 and '--ServerApp.ip=127.0.0.1' in server[0].cmdline()
        assert processes_with(token) == []                                  # in no process's arguments, ours or any other
        cfg = tmp_path / 'var' / 'lab' / 'jupyter_lab_config.json'
        assert cfg.stat().st_mode & 0o777 == 0o600 and token in cfg.read_text()
        for k in kernels: assert 'JUPYTER_TOKEN' not in k.environ() and token not in json.dumps(k.environ())
        assert (tmp_path / 'lab.out').read_text().count(token) == 1         # shown once, to whoever started it
        assert token not in (tmp_path / 'lab.err').read_text()               # the server's own log masks it
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        stopped = time.monotonic() - t0
        everything = server + kernels
        psutil.wait_procs(everything, timeout=5)
        assert [p.pid for p in everything if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert processes_with(str(runtime)) == [] and port_is_free(port), 'something outlived cde lab'
        assert 'lab: stopped' in (tmp_path / 'lab.out').read_text()
        print(f'stopped in {stopped:.1f} s')


@pytest.mark.slow
def test_kernels_that_outlive_a_crashed_server_are_ended(tmp_path):
    "The server killed outright cannot shut its kernels down (each runs in a session of its own): cde lab ends them."
    runtime = tmp_path / 'var' / 'lab' / 'runtime'
    with running_lab(tmp_path) as (proc, port, token, url):
        kernel = start_kernel(port, token, runtime)
        time.sleep(1.0)   # cde lab looks at the server's descendants twice a second
        server = [p for p in processes_with('-m jupyterlab') if f'--ServerApp.port={port}' in ' '.join(p.cmdline())][0]
        server.kill()
        assert proc.wait(60) == 1   # the server's end is reported as a failure
        psutil.wait_procs([kernel], timeout=5)
        assert not kernel.is_running() or kernel.status() == psutil.STATUS_ZOMBIE
        assert processes_with(str(runtime)) == [] and port_is_free(port)


def scan_outputs(nb: dict) -> str:
    "Every output's text of an executed notebook."
    parts = []
    for c in nb['cells']:
        for o in c.get('outputs', []):
            parts.append(''.join(o.get('text', '')))
            for v in o.get('data', {}).values(): parts.append(v if isinstance(v, str) else ''.join(v) if isinstance(v, list) else json.dumps(v))
            parts.extend(o.get('traceback', []))
    return '\n'.join(parts)


@pytest.mark.slow
def test_getting_started_runs_under_papermill_through_the_library(tmp_path, monkeypatch):
    "From question to registered model and report in a scratch workspace; no identifier in any output. ~30 s: slow."
    import papermill as pm
    import sqlalchemy as sa
    from cde_workbench.export import Identifiers, find_identifier, store_identifiers
    from cde_workbench.synth import HospitalConfig, generate
    monkeypatch.setenv('CDE_VAR', str(tmp_path / 'var'))
    before = NOTEBOOK.read_bytes()
    t0 = time.monotonic()
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / 'out.ipynb'), kernel_name='python3', cwd=str(NOTEBOOK.parent), progress_bar=False)
    took = time.monotonic() - t0
    assert NOTEBOOK.read_bytes() == before
    nb = json.loads((tmp_path / 'out.ipynb').read_text())
    last = [c for c in nb['cells'] if c['cell_type'] == 'code'][-1]
    assert 'test AUROC' in scan_outputs({'cells': [last]})
    ws = tmp_path / 'var' / 'getting-started'
    reports = list((ws / 'reports' / 'my_first_task').glob('v1/evaluation.html'))
    assert len(reports) == 1 and '<h1>my_first_task v1: evaluation on the test years</h1>' in reports[0].read_text()
    engine = sa.create_engine(f"sqlite:///{ws / 'var' / 'cde.sqlite'}")
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT name, version, sha256 FROM models")).all()
            audited = c.execute(sa.text("SELECT count(*) FROM audit_log WHERE action = 'model.register'")).scalar_one()
        assert [(r.name, r.version) for r in rows] == [('my_first_task', 1)] and audited == 1
        assert (ws / 'var' / 'models' / 'my_first_task' / 'v1' / 'model.skops').exists()
        # what the store holds, and what the synthetic hospital generated before its extract was pseudonymised
        stored = store_identifiers(engine).values
        h = generate(HospitalConfig(n_patients=200, seed=5)).patients   # the notebook's default parameters
        known = Identifiers({**stored, 'MRN': frozenset(h['mrn']),
                             'name': frozenset(f'{g} {f}' for g, f in zip(h['given_name'], h['family_name']))})
        assert all(known.values[k] for k in ('MRN', 'name', 'patient key', 'order id', 'research surrogate id'))
        text = scan_outputs(nb)
        assert find_identifier(text, known) is None, find_identifier(text, known)
        assert not [d for d in h['birth_date'].cast(str) if d in text]
    finally: engine.dispose()
    print(f'getting-started notebook under papermill: {took:.1f} s')


@pytest.mark.slow
def test_getting_started_runs_in_jupyterlab_in_chromium(tmp_path):
    """`cde lab` opened in Chromium with its token; the getting-started notebook (a researcher's copy of research/) is run
    with Run > Run All Cells until its last cell shows the registered model's test AUROC; a screenshot is kept."""
    root = tmp_path / 'research'; root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)   # JupyterLab autosaves what it runs: the checkout's copy stays clean
    (root / 'pipelines').symlink_to(ROOT / 'deployments' / '_pipelines')
    token = 'lab-test-' + os.urandom(20).hex()
    with running_lab(tmp_path, '--root', str(root), env=lab_env(tmp_path, CDE_LAB_TOKEN=token)) as (proc, port, _, url):
        assert url == f'http://127.0.0.1:{port}/lab/tree/getting_started.ipynb'   # a chosen token is not printed
        with chromium_page() as (page, dialogs):
            page.set_viewport_size({'width': 1400, 'height': 1000})
            page.goto(f'{url}?token={token}', wait_until='domcontentloaded', timeout=90_000)
            page.locator('.jp-Notebook .jp-Cell').first.wait_for(timeout=90_000)
            page.get_by_text('Python 3 (ipykernel) | Idle').wait_for(timeout=90_000)   # the kernel is up and connected
            first_prompt = page.locator('.jp-Notebook .jp-CodeCell .jp-InputPrompt').first
            for attempt in range(3):   # a menu opened while the page still settles may close before the click lands
                page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
                page.locator('.lm-Menu-itemLabel', has_text='Run All Cells').first.click()
                try:
                    page.wait_for_function('el => /[0-9*]/.test(el.textContent)', arg=first_prompt.element_handle(), timeout=15_000)
                    break
                except Exception:
                    if attempt == 2: raise
                    page.keyboard.press('Escape')
            last = page.locator('.jp-Notebook .jp-CodeCell').last
            try: last.locator('.jp-OutputArea-output', has_text='test AUROC').wait_for(timeout=240_000)
            finally: screenshot(page, 'lab-getting-started')
            errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]', has_text='Traceback')
            assert errors.count() == 0
            last.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / 'getting_started.png'))
            assert dialogs == []
        assert (tmp_path / 'var' / 'getting-started' / 'reports' / 'my_first_task' / 'v1' / 'evaluation.html').exists()
    assert (tmp_path / 'getting_started.png').stat().st_size > 10_000
