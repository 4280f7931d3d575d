"""The ward view (nbs/51b_ward) against a small store: the numbers on the page are the store's, values from data are
text, silent deployments stay off the page; and the real page served by Voilà, opened in Chromium by
a clinician who picks a ward."""
import html
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

from conftest import chromium_page, screenshot, voila_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVIL = '<img src=x onerror=alert(1)>'            # fits the store's 32-character ward column
EVIL_FEATURE = 'lab:<img src=x onerror=alert(2)>:q0'
# patient -> (ward, hours before now admitted, hours before now discharged or None)
STAYS = {'P1': ('MED1', 48, None), 'P2': ('MED1', 40, None), 'P3': ('MED1', 30, None), 'P4': (EVIL, 20, None),
         'P5': ('MED1', 50, 10)}
# hgb_abnormal packets: (patient, hours before now predicted, score, features)
PACKETS = [('P1', 30, 0.21, {'lab:HGB:q2': 1.0}), ('P1', 20, 0.35, {'lab:HGB:q0': 1.0}), ('P1', 5, 0.62, {'lab:HGB:q0': 2.0}),
           ('P2', 60, 0.90, {'lab:HGB:q4': 1.0}),                       # before this stay: not on the page
           ('P2', 8, 0.11, {'num:K:last': 3.0, 'num:K:hours_since': 4.0}),
           ('P4', 3, 0.33, {EVIL_FEATURE: 1.0}), ('P5', 12, 0.80, {}),  # P5 has left
           ('P1', -2, 0.99, {})]                                        # predicted after the clock: not known yet


def _store(var: Path, now: datetime):
    "A store whose hgb_abnormal (threshold mode) is live, k_abnormal live but silent, with the stays and packets above."
    from cde_workbench.config import Workspace
    from cde_workbench.deploy import set_status
    from cde_workbench.store import adt_events, get_engine, inferences, models, runs
    eng = get_engine(Workspace.from_env({'CDE_VAR': str(var)}).database_url)
    h = lambda x: now - timedelta(hours=x)
    with eng.begin() as c:
        c.execute(models.insert().values(name='m', version=1, sha256='0', path='-', feature_set_hash='f', data_fingerprint='d',
                                         code_version='c', params='{}', metrics='{}', created_at=h(100)))
        c.execute(runs.insert().values(run_id='r1', deployment='hgb_abnormal', kind='score', status='succeeded', started_at=h(100), parameters='{}'))
        adt = [dict(patient_key=k, encounter_id='E' + k, event_type='A01', ward=w, event_time=h(a), stored_time=h(a), source='t')
               for k, (w, a, _) in STAYS.items()]
        adt += [dict(patient_key=k, encounter_id='E' + k, event_type='A03', ward=w, event_time=h(d), stored_time=h(d), source='t')
                for k, (w, _, d) in STAYS.items() if d is not None]
        c.execute(adt_events.insert(), adt)
        rows = [dict(deployment=dep, model_id=1, order_id=f'{dep[:3]}{k}{i}', patient_key=k, prediction_time=h(x), score=s, threshold=0.5,
                     output_mode='threshold', n_features=len(f), run_id='r1', scored_at=h(x) + timedelta(minutes=1), shown=s >= 0.5,
                     features=json.dumps(f))
                for dep in ('hgb_abnormal', 'k_abnormal') for i, (k, x, s, f) in enumerate(PACKETS)]
        c.execute(inferences.insert(), rows)
    for n in ('hgb_abnormal', 'k_abnormal'):
        for s in ('silent', 'live'): set_status(eng, n, s, model_id=1, actor='tester')
    return eng


def _expected(eng, ward: str, now: datetime) -> dict:
    "Each current patient of `ward` -> hgb_abnormal's latest score of the stay as known at `now`, read straight from the store."
    from cde_workbench.store import inferences
    i = inferences.c
    out = {}
    with eng.connect() as c:
        for k, (w, a, d) in STAYS.items():
            if w != ward or d is not None: continue
            r = c.execute(sa.select(i.score).where(i.deployment == 'hgb_abnormal', i.patient_key == k, i.prediction_time <= now,
                                                   i.scored_at <= now, i.prediction_time >= now - timedelta(hours=a))
                          .order_by(i.prediction_time.desc()).limit(1)).first()
            out[k] = '—' if r is None else f'{r[0]:.2f}'
    return out


def _on_page(text: str) -> dict:
    "patient -> the hgb_abnormal score cell's text, from the page's HTML (the ids the page gives its cells)."
    pats = dict(re.findall(r'id="patient-(\d+)">(.*?)</td>', text))
    scores = dict(re.findall(r'id="score-hgb_abnormal-(\d+)"[^>]*>(.*?)</td>', text))
    return {html.unescape(pats[i]): scores[i] for i in pats}


def test_the_ward_view_shows_the_stores_numbers_and_escapes_data(tmp_path):
    from cde_workbench.config import Workspace
    from cde_workbench.store import audit_log, dispose_engines
    from cde_workbench.ward import live_deployments, ward_names, ward_view_html
    now = datetime.now(timezone.utc).replace(microsecond=0)
    eng = _store(tmp_path / 'var', now)
    try:
        deps = live_deployments(eng, Workspace.from_env({'CDE_VAR': str(tmp_path / 'var')}).deployments)
        assert [d.name for d in deps] == ['hgb_abnormal']             # k_abnormal is live but silent: never on the ward view
        assert ward_names(eng, now) == sorted([EVIL, 'MED1'])
        page = ward_view_html(eng, 'MED1', now, deps, 'nurse_a')
        assert _on_page(page) == _expected(eng, 'MED1', now) == {'P1': '0.62', 'P2': '0.11', 'P3': '—'}
        assert 'low hemoglobin twice in the last 14 days' in page and 'low potassium (3.0 mmol/L)' in page
        assert 'title="0.21 → 0.35 → 0.62"' in page and 'k_abnormal' not in page
        evil = ward_view_html(eng, EVIL, now, deps, 'nurse_a')
        assert '<img' not in evil
        assert f'<h2>Ward {html.escape(EVIL)}</h2>' in evil and html.escape('low <img src=x onerror=alert(2)> once') in evil
        assert _on_page(evil) == _expected(eng, EVIL, now) == {'P4': '0.33'}
        with eng.connect() as c:
            rows = c.execute(sa.select(audit_log.c.actor, audit_log.c.detail).where(audit_log.c.action == 'dashboard.patient_list')
                             .order_by(audit_log.c.id)).all()
        assert [(a, json.loads(d)['ward'], json.loads(d)['patient_keys']) for a, d in rows] == [
            ('nurse_a', 'MED1', ['P1', 'P2', 'P3']), ('nurse_a', EVIL, ['P4'])]
    finally: dispose_engines()


def test_a_clinician_opens_the_ward_view_in_a_browser_and_picks_a_ward(tmp_path):
    from cde_workbench.store import audit_log, dispose_engines
    now = datetime.now(timezone.utc).replace(microsecond=0)
    eng = _store(tmp_path / 'var', now)
    expected = _expected(eng, 'MED1', now)
    dispose_engines()
    env = {k: v for k, v in os.environ.items() if k != 'CDE_DATABASE_URL'}
    with voila_server({**env, 'CDE_VAR': str(tmp_path / 'var')}, tmp_path, timeout=90, role='clinician',
                      notebook=ROOT / 'dashboards' / 'ward.ipynb') as (port, token, _):
        with chromium_page() as (page, dialogs):
            page.goto(f'http://127.0.0.1:{port}/?token={token}', timeout=90_000)
            page.wait_for_selector('.cde-ward', state='attached', timeout=120_000)   # the first ward (the hostile name sorts first)
            assert page.locator('.cde-ward h2').inner_text() == f'Ward {EVIL}'
            page.locator('select').first.select_option(label='MED1')
            page.wait_for_selector('text=Ward MED1', timeout=30_000)
            page.wait_for_timeout(500)   # let any injected handler fire
            shown = {page.locator(f'#patient-{i}').inner_text(): page.locator(f'#score-hgb_abnormal-{i}').inner_text()
                     for i in range(page.locator('[id^="patient-"]').count())}
            assert shown == expected == {'P1': '0.62', 'P2': '0.11', 'P3': '—'}
            assert not dialogs and page.locator('img[src="x"]').count() == 0      # no script ran
            last = now - timedelta(hours=10)   # P5's discharge, the feed's latest message: the page's clock is the wall clock, and it says so
            assert f'ADT feed has been silent since {last:%Y-%m-%d %H:%M} UTC (10 hours before' in page.locator('.cde-ward').inner_text()
            screenshot(page, 'ward')
    with eng.connect() as c:
        rows = c.execute(sa.select(audit_log.c.actor, audit_log.c.action, audit_log.c.detail)
                         .where(audit_log.c.action.in_(('dashboard.open', 'dashboard.patient_list'))).order_by(audit_log.c.id)).all()
    dispose_engines()
    assert [(a, json.loads(d)['page'], json.loads(d)['role']) for a, act, d in rows if act == 'dashboard.open'] == [
        (rows[0][0], 'ward.ipynb', 'clinician')]
    assert [json.loads(d)['ward'] for a, act, d in rows if act == 'dashboard.patient_list'] == [EVIL, 'MED1']
    assert {a for a, _, _ in rows} == {rows[0][0]} and rows[0][0].startswith('tester-')


def test_the_demos_ward_round_fills_the_ward_view_with_the_stores_scores(small_store):
    """The demo's ward round on the small hospital with open stays (its warehouse extract is the same with or without them:
    the open stays are prospective): after going live, every current inpatient has a live score on the ward view, equal
    to the store's packet, and the page names the stopped feed's last message (the hospital ends in 2024)."""
    from cde_workbench.config import Workspace, utcnow
    from cde_workbench.demo import demo_ward_round
    from cde_workbench.deploy import set_status
    from cde_workbench.deployment import load_deployment
    from cde_workbench.events import process_pending
    from cde_workbench.ids import store_messages
    from cde_workbench.pseudonyms import site_key
    from cde_workbench.registry import get_model
    from cde_workbench.store import get_engine, inferences
    from cde_workbench.synth import HospitalConfig, generate, hl7_feed
    from cde_workbench.ward import live_deployments, ward_names, ward_patients, ward_view_html
    ws = Workspace.from_env()
    eng = get_engine(ws.database_url)
    store_messages(eng, [(m, t, 'test') for t, m in hl7_feed(generate(HospitalConfig(n_patients=200, seed=5, open_stays=12)))])
    process_pending(eng, key=site_key(ws.site_key_file))
    dep = load_deployment('hgb_abnormal', ws.deployments)
    with eng.connect() as c: rec = get_model(c, dep.name)
    for s in ('silent', 'live'): set_status(eng, dep.name, s, rec.model_id, 'test')
    w = demo_ward_round(eng, dep)
    assert w['scored'] == 12 and w['at'].startswith('2024-03-31'), w   # the 12 open stays, at the feed's last message
    now = utcnow()
    deps = live_deployments(eng, ws.deployments)
    assert [d.name for d in deps] == ['hgb_abnormal'] and ward_names(eng, now) == w['wards']
    i = inferences.c
    with eng.connect() as c:
        stored = dict(c.execute(sa.select(i.patient_key, i.score).where(i.trigger == 'hook', i.output_mode == 'threshold')).all())
    shown = {}
    for ward in w['wards']:
        df = ward_patients(eng, ward, now, deps)
        shown |= dict(zip(df['patient_key'], df['hgb_abnormal:score']))
        page = ward_view_html(eng, ward, now, deps, 'nurse_a')
        assert _on_page(page) == {k: f'{v:.2f}' for k, v in zip(df['patient_key'], df['hgb_abnormal:score'])}
        assert f"ADT feed has been silent since {w['at'][:10]} {w['at'][11:16]} UTC" in page
    assert shown == stored and len(shown) == 12 and all(v is not None for v in shown.values())
