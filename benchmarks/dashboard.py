"""First render of the deployment-health dashboard in a real browser, against recomputing its figures from packets.

- dashboard_render_seconds: `dashboards/health.ipynb` served by Voilà as `cde dashboard` serves it (its settings, the
  identity provider and page hook, a data-science user's token), opened in Debian's Chromium (Playwright): from
  `page.goto` to the health page's figures on screen (`#health-asof` attached), the kernel's start, the imports and
  the store reads included. The page of a fresh server, then two more renders (each a new kernel); the value is the
  first, the other two are in the note. Target: at most 5 s, and at least 3x faster than the baseline.
- The baseline: recomputing the same figures from packets, as the monitoring run does (`monitoring.run_monitoring`,
  n_boot = 500, 28-day windows stepped weekly over the year, subgroups, drift, data quality): the fastest of the
  twelve deployments' runs (the first is the deployment the page shows; the machine is shared), in this process
  with its imports already warm (so the baseline leaves out a kernel's start and imports that the render pays: the
  ratio is conservative).

The store: twelve deployments (the project's twelve lab deployments), one year of packets each (`PER_DAY` orders a
day, 2023-03-01 to 2024-03-01), every packet labelled 2 to 60 hours later, 4,000 patients with sex and birth year, a
model version per deployment registered with test-year predictions and feature rows (the drift reference); packets,
labels and patients written in bulk (executemany in chunks of 20,000, one transaction per table). Then one
monitoring run per deployment stores its figures, as the scheduler would; their wall times give the baseline.

Run: .venv/bin/python benchmarks/dashboard.py
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ('alb_abnormal', 'bun_abnormal', 'ca_abnormal', 'co2_abnormal', 'creat_abnormal', 'hct_abnormal', 'hgb_abnormal',
               'k_abnormal', 'mg_abnormal', 'na_abnormal', 'plt_abnormal', 'wbc_abnormal')
PER_DAY = int(os.environ.get('BENCH_DASHBOARD_PER_DAY', 100))   # a smaller figure only to try the script out
START, DAYS = datetime(2023, 3, 1, tzinfo=timezone.utc), 365
NAMES = ['lab:X:q0', 'lab:X:q1', 'lab:X:q2', 'lab:X:q3', 'lab:X:q4', 'num:X:last', 'num:X:missing', 'sex:F', 'sex:M', 'age:65+']
CHUNK = 20_000


def _bulk(conn, table, rows):
    for i in range(0, len(rows), CHUNK): conn.execute(table.insert(), rows[i:i + CHUNK])


def _features(rng, n, drift=0.0):
    "Sparse feature rows as the featurizer stores them (JSON by name) and as a CSR matrix, one lab bin set per row."
    import scipy.sparse as sp
    b = np.clip((rng.normal(2 + drift, 1.2, n)).round().astype(int), 0, 4)
    val = rng.normal(12 - drift, 1.5, n)
    miss = rng.random(n) < 0.1
    sex = rng.random(n) < 0.5
    rows, dense = [], np.zeros((n, len(NAMES)))
    for k in range(n):
        d = {} if miss[k] else {f'lab:X:q{b[k]}': 1.0, 'num:X:last': round(float(val[k]), 2)}
        if miss[k]: d['num:X:missing'] = 1.0
        d['sex:F' if sex[k] else 'sex:M'] = 1.0
        rows.append(d)
        for name, v in d.items(): dense[k, NAMES.index(name)] = v
    return rows, sp.csr_matrix(dense)


def build_store(var: Path, seed: int = 0) -> tuple:
    "The twelve deployments' models, packets, labels and patients; returns (workspace, engine, seconds to write the packets)."
    import polars as pl
    import scipy.sparse as sp
    from cde_workbench.config import Workspace
    from cde_workbench.deploy import set_status
    from cde_workbench.registry import register_model
    from cde_workbench.store import get_engine, inference_labels, inferences, patients, runs
    from cde_workbench.train import TEST_FEATURES_FILE
    ws = Workspace.under(var)
    for n in DEPLOYMENTS: shutil.copytree(ROOT / 'deployments' / n, ws.deployments / n)
    eng = get_engine(ws.database_url)
    rng = np.random.default_rng(seed)
    n_pat = 4000
    with eng.begin() as c:
        _bulk(c, patients, [dict(patient_key=f'P{k}', birth_year=int(rng.integers(1930, 2000)), sex='F' if k % 2 else 'M', race_ethnicity='-',
                                  stored_time=START - timedelta(days=400), source='bench') for k in range(n_pat)])
    t_write, iid = 0.0, 0
    for d, name in enumerate(DEPLOYMENTS):
        m = 3000
        z = rng.normal(-1, 1.5, m)
        y = (rng.random(m) < 1 / (1 + np.exp(-z))).astype(int)
        _, Xt = _features(rng, m)
        buf = io.BytesIO(); sp.save_npz(buf, Xt)
        tp = pl.DataFrame({'patient_key': [f'T{k % 1500}' for k in range(m)], 'order_id': [f'T{d}-{k}' for k in range(m)],
                           'label': y, 'score': 1 / (1 + np.exp(-z))})
        rec = register_model(eng, name, {'feature_names': NAMES, 'component': name.split('_')[0].upper()}, {}, {}, 'f', 'd', tp, var=ws.var,
                             files={TEST_FEATURES_FILE: buf.getvalue()})
        set_status(eng, name, 'silent', rec.model_id, 'benchmark', actor='bench')
        n = PER_DAY * DAYS
        t = START + timedelta(seconds=1) + np.sort(rng.random(n)) * timedelta(days=DAYS)
        z = rng.normal(-1, 1.5, n) + np.where(np.arange(n) > n * 0.7, 0.5, 0.0)   # drift late in the year
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        s = 1 / (1 + np.exp(-z + rng.normal(0, 0.8, n)))
        feats, _ = _features(rng, n, drift=0.0)
        pat = rng.integers(0, n_pat, n)
        delay = rng.uniform(2, 60, n)
        t0 = time.perf_counter()
        with eng.begin() as c:
            c.execute(runs.insert(), [dict(run_id=f'score-{name}', deployment=name, kind='score', status='succeeded', started_at=START, parameters='{}'),
                                      dict(run_id=f'labels-{name}', deployment=name, kind='labels', status='succeeded', started_at=START + timedelta(days=DAYS),
                                           parameters=json.dumps({'as_of': (START + timedelta(days=DAYS + 3)).isoformat()}))])
            _bulk(c, inferences, [dict(inference_id=iid + k + 1, deployment=name, model_id=rec.model_id, order_id=f'{d}-{k}', patient_key=f'P{pat[k]}',
                                       prediction_time=t[k], score=float(s[k]), threshold=0.5, output_mode='silent', n_features=len(feats[k]),
                                       run_id=f'score-{name}', scored_at=t[k] + timedelta(seconds=1), features=json.dumps(feats[k]))
                                  for k in range(n)])
            _bulk(c, inference_labels, [dict(inference_id=iid + k + 1, version=1, label=int(y[k]), label_time=t[k] + timedelta(hours=float(delay[k])),
                                             stored_time=min(t[k] + timedelta(hours=float(delay[k]) + 1), START + timedelta(days=DAYS + 3)),
                                             run_id=f'labels-{name}', extracted_at=START + timedelta(days=DAYS + 3)) for k in range(n)])
        t_write += time.perf_counter() - t0
        iid += n
    return ws, eng, t_write


def monitor_all(ws, eng, as_of: datetime) -> tuple[float, int]:
    "One monitoring run per deployment, through the run ledger as the scheduler runs it; each run's wall time and the first's figures' count."
    from cde_workbench.deployment import load_deployment
    from cde_workbench.gates import store_gate_figures
    from cde_workbench.monitoring import run_monitoring
    from cde_workbench.schedule import run_ledger
    took_all, n_figs = [], None
    for name in DEPLOYMENTS:
        dep = load_deployment(name, ws.deployments)
        with run_ledger(eng, name, 'monitor', {'as_of': as_of.isoformat()}, heartbeat_seconds=None) as run_id:
            t0 = time.perf_counter()
            s = run_monitoring(eng, dep, as_of, run_id, n_boot=500)
            took = time.perf_counter() - t0
            store_gate_figures(eng, dep, run_id, as_of)
        took_all.append(took); n_figs = n_figs or s.figures.height
        print(f'  monitoring {name}: {took:.1f} s, {s.figures.height} figures, {s.packets} packets', flush=True)
    return took_all, n_figs


def render_seconds(ws, base: Path, renders: int = 3) -> list[float]:
    "Seconds from goto to the health page's figures on screen, in Chromium, for `renders` page loads (each a new kernel)."
    import http.client
    from playwright.sync_api import sync_playwright
    from cde_workbench.access import add_user, stop_session, users_file, voila_command, write_voila_config
    sock = __import__('socket').socket(); sock.bind(('127.0.0.1', 0)); port = sock.getsockname()[1]; sock.close()
    token = 'bench-token-' + os.urandom(16).hex()
    add_user(users_file(ws), 'bench_' + os.urandom(4).hex(), 'datascience', token)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith('CDE_')}, **ws.as_env(),
           'JUPYTER_PLATFORM_DIRS': '1', 'JUPYTER_RUNTIME_DIR': str(base / 'runtime')}
    log = open(base / 'voila.log', 'wb')
    proc = subprocess.Popen(voila_command(port, write_voila_config(ws.var / 'dashboard', users_file(ws))), cwd=ROOT / 'dashboards', env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    out = []
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline: raise RuntimeError((base / 'voila.log').read_text()[-2000:])
            try:
                c = http.client.HTTPConnection('127.0.0.1', port, timeout=2); c.request('GET', '/'); c.getresponse(); c.close(); break
            except OSError: time.sleep(0.2)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path='/usr/bin/chromium', args=['--no-sandbox', '--disable-gpu', '--disable-background-networking'])
            try:
                for _ in range(renders):
                    page = browser.new_page()
                    t0 = time.perf_counter()
                    page.goto(f'http://127.0.0.1:{port}/voila/render/health.ipynb?token={token}', timeout=120_000)
                    page.wait_for_selector('#health-asof', state='attached', timeout=120_000)
                    out.append(time.perf_counter() - t0)
                    page.close()
            finally: browser.close()
    finally:
        stop_session(proc, grace=10); log.close()
    return out


def bench_dashboard():
    from cde_workbench.store import dispose_engines
    tmp = Path(tempfile.mkdtemp(prefix='cde-bench-dash-'))
    try:
        t0 = time.perf_counter()
        ws, eng, t_write = build_store(tmp / 'ws')
        n = PER_DAY * DAYS * len(DEPLOYMENTS)
        print(f'  store: {n:,} packets and labels written in {t_write:.1f} s (setup {time.perf_counter() - t0:.1f} s)', flush=True)
        as_of = START + timedelta(days=DAYS + 3)
        took, n_figs = monitor_all(ws, eng, as_of)
        baseline = min(took)   # the fastest of the twelve runs (same packets per deployment): the machine is shared, a slow run is not the baseline
        dispose_engines()
        r = render_seconds(ws, tmp)
    finally: shutil.rmtree(tmp, ignore_errors=True)
    first = r[0]
    note = (f'{len(DEPLOYMENTS)} deployments x {DAYS} days x {PER_DAY} packets/day ({n:,} packets, written in bulk in {t_write:.1f} s); '
            f'health.ipynb in Chromium via Voila, kernel start included: first {first:.2f} s, then {", ".join(f"{x:.2f}" for x in r[1:])} s; '
            f'baseline: the fastest run_monitoring of one deployment from its {PER_DAY * DAYS:,} packets ({n_figs} figures, n_boot 500, warm imports; '
            f'the page\'s deployment {took[0]:.1f} s, median of the 12 {float(np.median(took)):.1f} s); '
            f'target <= 5 s and ratio >= 3')
    return {'dashboard_render_seconds': {'value': round(first, 2), 'unit': 's', 'baseline': round(baseline, 2), 'ratio': round(baseline / first, 1),
                                         'note': note}}


if __name__ == '__main__':
    for name, v in bench_dashboard().items():
        ratio = f"  ratio {v['ratio']}x (baseline {v['baseline']} {v['unit']})" if v['ratio'] else ''
        print(f"{name:30s} {v['value']:>8} {v['unit']}{ratio}   [{v['note']}]")
