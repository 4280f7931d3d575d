"""Dashboard access against the real `cde dashboard` (Voilà, jupyter_server) and Debian's Chromium: each person's own
token and role, the login page, the audit rows, Voilà's hardening, data values that never run as script, and a
SIGTERM that leaves no process of the server's session behind. One server for the module; the last test stops it."""
import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from conftest import chromium_page, free_port, screenshot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CDE = str(Path(sys.executable).parent / 'cde')
XSS = '<img src=x onerror=window.__x=1>'   # 32 characters: fits the store's patient_key
XSS_SCRIPT = '"><script>window.__x=2</script>'


def _store(var: Path) -> None:
    "A store with hgb_abnormal's model and three packets, two for patients whose keys are markup."
    from sklearn.linear_model import LogisticRegression
    from cde_workbench.config import Workspace
    from cde_workbench.registry import register_model
    from cde_workbench.store import dispose_engines, get_engine, inferences, runs
    eng = get_engine(Workspace.from_env({'CDE_VAR': str(var)}).database_url)
    est = LogisticRegression().fit(np.array([[0.], [1.]]), [0, 1])
    rec = register_model(eng, 'hgb_abnormal', {'estimator': est}, {'model': {'kind': 'logistic_regression'}},
                         {'test_auroc': {'estimate': 0.7, 'low': 0.6, 'high': 0.8}}, 'a' * 64, 'b' * 64, var=var)
    t0 = datetime(2024, 3, 1, 8, tzinfo=timezone.utc)
    with eng.begin() as c:
        c.execute(runs.insert().values(run_id='r1', deployment='hgb_abnormal', kind='score', status='succeeded', started_at=t0,
                                       finished_at=t0, parameters='{}'))
        c.execute(inferences.insert(), [dict(deployment='hgb_abnormal', model_id=rec.model_id, order_id=f'O{i}', patient_key=key,
                                             prediction_time=t0 + timedelta(hours=i), score=s, threshold=0.5, output_mode='silent',
                                             n_features=3, run_id='r1', scored_at=t0 + timedelta(hours=i),
                                             encounter_id=XSS, features=json.dumps({XSS: 1.0}))
                                        for i, (key, s) in enumerate([(XSS, 0.9), ('P2', 0.2), (XSS_SCRIPT, 0.4)])])
    dispose_engines()


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    "`cde dashboard` on a free port with two readers (datascience, clinician), in a session of its own."
    base = tmp_path_factory.mktemp('access')
    var = base / 'var'
    env = {k: v for k, v in os.environ.items() if k not in ('CDE_DASHBOARD_TOKEN', 'CDE_DATABASE_URL')}
    env.update(CDE_VAR=str(var), JUPYTER_PLATFORM_DIRS='1', JUPYTER_RUNTIME_DIR=str(base / 'runtime'))
    _store(var)
    from cde_workbench.access import add_user, users_file   # the commands that do this are tested in nbs/80_cli
    from cde_workbench.config import Workspace
    users = users_file(Workspace.from_env({'CDE_VAR': str(var)}))
    ds, cl = add_user(users, 'dr_data', 'datascience'), add_user(users, 'nurse_ward7', 'clinician')
    port = free_port()
    log = open(base / 'dashboard.log', 'wb')
    proc = subprocess.Popen([CDE, 'dashboard', '--port', str(port)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (base / 'dashboard.log').read_text()[-3000:]
        try: socket.create_connection(('127.0.0.1', port), timeout=1).close(); break
        except OSError: time.sleep(0.2)
    yield dict(port=port, ds=ds, cl=cl, proc=proc, var=var, env=env, base=base)
    if proc.poll() is None:
        from cde_workbench.access import stop_session
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(30)
        except subprocess.TimeoutExpired: stop_session(proc, 1)
    log.close()


def _get(port, path, headers=None):
    "A GET with the path sent as it is (no normalisation): status, headers, body."
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    c.request('GET', path, headers=headers or {})
    r = c.getresponse(); body = r.read().decode(errors='replace'); c.close()
    return r.status, dict(r.getheaders()), body


def _audit(var):
    from cde_workbench.config import Workspace
    from cde_workbench.store import dispose_engines, get_engine
    eng = get_engine(Workspace.from_env({'CDE_VAR': str(var)}).database_url)
    try:
        with eng.connect() as c: return c.exec_driver_sql('select actor, action, target from audit_log order by id').all()
    finally: dispose_engines()


def test_no_token_or_a_wrong_one_gets_the_login_page(server):
    p = server['port']
    for path in ('/', '/voila/render/monitor.ipynb', '/voila/render/ward.ipynb', '/voila/render/monitor.ipynb?token=' + 'x' * 43):
        status, headers, _ = _get(p, path)
        assert status == 302 and headers['Location'].startswith('/login'), (path, status, headers)
    status, _, body = _get(p, '/login')
    assert status == 200 and 'type="password"' in body and 'hgb_abnormal' not in body
    assert _get(p, '/api/kernels')[0] in (302, 403, 404)   # no kernel API without a user either


def test_no_token_on_any_command_line(server):
    pids = [server['proc'].pid, *_descendants(server['proc'].pid)]
    cmdlines = [Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode() for pid in pids if Path(f'/proc/{pid}/cmdline').exists()]
    assert any('voila' in c for c in cmdlines), cmdlines
    assert not any(server['ds'] in c or server['cl'] in c or '--token' in c for c in cmdlines), cmdlines


def test_a_clinician_is_refused_the_health_page_and_the_refusal_is_audited(server):
    status, _, body = _get(server['port'], '/voila/render/monitor.ipynb', {'Authorization': f"token {server['cl']}"})
    assert status == 403 and 'hgb_abnormal' not in body
    assert ('nurse_ward7', 'dashboard.refused', 'monitor.ipynb') in _audit(server['var'])


def test_a_clinician_is_refused_the_overview_and_deployment_health_pages(server):
    for page in ('overview.ipynb', 'health.ipynb'):
        status, _, body = _get(server['port'], f'/voila/render/{page}', {'Authorization': f"token {server['cl']}"})
        assert status == 403 and 'hgb_abnormal' not in body, (page, status)
        assert ('nurse_ward7', 'dashboard.refused', page) in _audit(server['var'])


def test_a_clinician_opens_the_ward_view_at_its_own_address(server):
    "`cde dashboard` serves every page of the dashboards folder; the ward view is the clinicians' (its content: tests/test_ward.py)."
    status, _, body = _get(server['port'], '/voila/render/ward.ipynb', {'Authorization': f"token {server['cl']}"})
    assert status == 200, body[-2000:]
    assert ('nurse_ward7', 'dashboard.open', 'ward.ipynb') in _audit(server['var'])


def test_static_traversal_is_refused(server):
    """Paths that climb out of the static and file folders are never served: 404, or tornado's 403 (a path outside the
    static root; /voila/files/, where Voilà redirects any other path, serves no file at all)."""
    auth = {'Authorization': f"token {server['ds']}"}
    for path in ('/static/../dashboard_users.json', '/static/../../var/dashboard_users.json', '/voila/static/../../../../../../etc/passwd',
                 '/voila/static/..%2f..%2f..%2fetc%2fpasswd', '/voila/files/../../var/dashboard_users.json', '/static/..%2f..%2fvoila.py',
                 '/voila/files/..%2f..%2fREADME.md'):
        hops = [path]
        status, headers, body = _get(server['port'], path, auth)
        while status in (301, 302) and len(hops) < 5:
            hops.append(headers['Location'])
            status, headers, body = _get(server['port'], headers['Location'], auth)
        assert status in (403, 404) and 'root:' not in body and 'token_sha256' not in body and 'Workspace' not in body, (hops, status)


def test_hostile_values_are_text_in_a_real_browser_and_the_opening_is_audited(server):
    with chromium_page() as (page, dialogs):
        page.goto(f"http://127.0.0.1:{server['port']}/voila/render/monitor.ipynb?token={server['ds']}", timeout=90_000)
        page.wait_for_selector('#packets-hgb_abnormal', state='attached', timeout=120_000)
        assert 'token' not in page.url and page.url.endswith('/voila/render/monitor.ipynb'), page.url   # out of the address bar
        page.wait_for_timeout(500)   # let any injected handler fire
        assert page.evaluate('window.__x') is None and not dialogs
        screenshot(page, 'monitor-hostile-values')
        cells = page.locator('td').all_inner_texts()
        assert XSS in cells and XSS_SCRIPT in cells, cells
        assert page.locator('img[src="x"]').count() == 0 and page.locator('table script').count() == 0
        assert 'monitor_view(' not in page.content() and 'CDE_DASHBOARD_USER' not in page.content()   # sources stripped
        # the token was for the first request: the cookie carries the session from here (the login page sends it on)
        again = page.request.get(f"http://127.0.0.1:{server['port']}/login", max_redirects=0)
        assert again.status == 302 and again.headers['location'] == '/', again.status
    opened = [r for r in _audit(server['var']) if r[1] == 'dashboard.open']
    assert opened[-1:] == [('dr_data', 'dashboard.open', 'monitor.ipynb')]


def test_an_execute_request_over_the_kernel_websocket_is_ignored(server, tmp_path):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect
    auth = {'Authorization': f"token {server['ds']}"}
    status, _, body = _get(server['port'], '/voila/render/monitor.ipynb', auth)   # rendering the page starts its kernel
    assert status == 200
    kernel = re.search(r'"kernelId":\s*"([0-9a-f-]{36})"', body) or re.search(r'kernel_id["\']?\s*[:=]\s*["\']([0-9a-f-]{36})', body)
    assert kernel, body[-2000:]
    marker = tmp_path / 'ran'

    def msg(kind, content):
        mid = os.urandom(8).hex()
        return mid, json.dumps({'header': {'msg_id': mid, 'msg_type': kind, 'session': 's', 'username': 'u', 'version': '5.3', 'date': ''},
                                'parent_header': {}, 'metadata': {}, 'content': content, 'channel': 'shell', 'buffers': []})

    async def talk():
        ws = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{server['port']}/api/kernels/{kernel.group(1)}/channels", headers=auth))
        replies = {}
        async def read_for(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try: m = await asyncio.wait_for(ws.read_message(), end - time.monotonic())
                except asyncio.TimeoutError: break
                if m is None: break
                if isinstance(m, str):
                    d = json.loads(m); replies.setdefault(d['parent_header'].get('msg_id'), []).append(d['msg_type'])
                    # the shell channel answers in order: once the later request is answered, the earlier one had its chance
                    if d['msg_type'] == 'kernel_info_reply': end = min(end, time.monotonic() + 1)
        ex_id, ex = msg('execute_request', {'code': f'open({str(marker)!r}, "w").write("x")', 'silent': False, 'store_history': False,
                                            'user_expressions': {}, 'allow_stdin': False, 'stop_on_error': True})
        ws.write_message(ex)
        info_id, info = msg('kernel_info_request', {})
        ws.write_message(info)   # allowed: shows that the channel works, so the silence above means something
        await read_for(30)
        ws.close()
        return replies.get(ex_id, []), replies.get(info_id, [])

    executed, info = asyncio.run(talk())
    assert 'kernel_info_reply' in info, info
    assert executed == [] and not marker.exists()


def test_sigterm_ends_voila_and_every_kernel_and_frees_the_port(server):
    "Runs last: the page opened above started a kernel; SIGTERM to `cde dashboard` must leave nothing of it running."
    proc, port = server['proc'], server['port']
    tree = _descendants(proc.pid)
    cmdlines = {pid: Path(f'/proc/{pid}/cmdline').read_bytes() for pid in tree if Path(f'/proc/{pid}/cmdline').exists()}
    assert any(b'ipykernel' in c for c in cmdlines.values()), cmdlines   # a kernel is running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    alive = [pid for pid in tree if _alive(pid)]
    assert alive == [], {pid: cmdlines.get(pid) for pid in alive}
    with pytest.raises(ConnectionRefusedError): socket.create_connection(('127.0.0.1', port), timeout=2)   # nobody listens
    with socket.socket() as s:   # and a new server may listen there (as tornado binds: connections in TIME_WAIT do not count)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', port)); s.listen()


def _descendants(pid: int) -> list[int]:
    "Every process below `pid`, from /proc (kernels are grandchildren of `cde dashboard`)."
    parent = {}
    for d in Path('/proc').glob('[0-9]*'):
        try: parent[int(d.name)] = int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError): pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids; todo += kids
    return out


def _alive(pid: int) -> bool:
    try: state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError: return False
    return state != 'Z'
