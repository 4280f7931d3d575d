"""The overview and deployment-health dashboards (nbs/51c_overview) against a store whose figures were written by the
monitoring's own `store_results`: the numbers on the pages are the store's (read here with plain SQL), values from data
(a deployment's name, a ward, a feature, alert and error text) are text; and both pages served by Voilà and opened in
Chromium with a data-science token (a deployment, a window and a subgroup picked), a clinician refused."""
import html
import json
import os
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

from conftest import chromium_page, screenshot, voila_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVIL = '<img src=x onerror=alert(1)>'            # a deployment's name in the store, a ward, a feature, an alert's metric, an error
DEPS = ('hgb_abnormal', 'k_abnormal')


def figure(metric, value, window_start, window_end, *, group_name='all', group_value='all', ci_low=None, ci_high=None, n=None, **detail):
    "One stored figure row, as `monitoring.figure` makes it."
    return dict(metric=metric, group_name=group_name, group_value=group_value, window_start=window_start, window_end=window_end, value=value,
                ci_low=ci_low, ci_high=ci_high, n=n, detail=json.dumps(detail, sort_keys=True))


def _store(base: Path, now: datetime):
    "Two deployment folders; packets, monitoring figures (two runs each), alerts and runs for them and for a store-only deployment named EVIL."
    from cde_workbench.config import Workspace
    from cde_workbench.deploy import set_status
    from cde_workbench.store import alerts, get_engine, inferences, models, monitoring_results, runs
    ws = Workspace.from_env({'CDE_VAR': str(base / 'var'), 'CDE_DEPLOYMENTS': str(base / 'deployments')})
    for n in DEPS: shutil.copytree(ROOT / 'deployments' / n, ws.deployments / n)
    eng = get_engine(ws.database_url)
    day = timedelta(days=1)
    with eng.begin() as c:
        c.execute(models.insert().values(name='m', version=1, sha256='0', path='-', feature_set_hash='f', data_fingerprint='d',
                                         code_version='c', params='{}', metrics='{}', created_at=now - 400 * day))
        for dep, k in ((DEPS[0], 0), (DEPS[1], 1), (EVIL, 2)):
            c.execute(runs.insert(), [dict(run_id=f's{k}', deployment=dep, kind='score', status='succeeded', started_at=now - 300 * day, parameters='{}'),
                                      dict(run_id=f'old{k}', deployment=dep, kind='monitor', status='succeeded', started_at=now - 8 * day, parameters='{}')])
            c.execute(runs.insert(), [dict(run_id=f'm{k}', deployment=dep, kind='monitor', status='succeeded', started_at=now - day, parameters='{}')])
            c.execute(runs.insert(), [dict(run_id=f'f{k}', deployment=dep, kind='monitor', status='failed', started_at=now - 2 * day, parameters='{}',
                                           error_name='ValueError', error_value=EVIL)])
            c.execute(inferences.insert(), [dict(deployment=dep, model_id=1, order_id=f'{k}-{i}', patient_key=f'P{i}', score=0.3, threshold=0.5,
                                                 prediction_time=now - timedelta(hours=11 * i + k), output_mode='silent', n_features=1, run_id=f's{k}',
                                                 scored_at=now - timedelta(hours=11 * i + k)) for i in range(40 + 10 * k)])
        c.execute(alerts.insert(), [dict(deployment=dep, rule='{}', metric=m, first_seen=now - 3 * day, last_seen=now - day, last_value=0.31,
                                         threshold=0.2, direction='above', n=14, status=s)
                                    for dep, m, s in ((DEPS[0], 'psi_score', 'open'), (DEPS[0], EVIL, 'open'), (DEPS[0], 'auroc', 'resolved'),
                                                      (EVIL, 'psi_score', 'open'))])
    as_of = now - day
    for dep, k in ((DEPS[0], 0), (DEPS[1], 1), (EVIL, 2)):
        for run, shift in ((f'old{k}', 0.2), (f'm{k}', 0.0)):   # the older run's figures are never shown
            rows = []
            for w in range(60):
                we = as_of - 7 * w * day
                v = 0.80 - 0.002 * w - 0.01 * k - shift
                rows += [figure('auroc', v, we - 28 * day, we, ci_low=v - 0.05, ci_high=v + 0.04, n=200 + w)] * (k != 1 or w > 0)   # k_abnormal: none in the newest
                rows += [figure('auroc', v - 0.03, we - 28 * day, we, group_name='sex', group_value='F', ci_low=v - 0.1, ci_high=v + 0.05, n=100 + w)]
                rows += [figure('oe', 1 + 0.01 * w, we - 28 * day, we, ci_low=0.9, ci_high=1.2, n=200 + w),
                         figure('psi_score', 0.05 + 0.01 * (w % 5), we - 28 * day, we, n=200 + w, test='ks', statistic=0.1, p=0.2),
                         figure('scoring_volume', 7.0 + w % 3, we - 28 * day, we, n=200 + w, per='day'),
                         *[figure('label_state_share', x, we - 28 * day, we, group_name='label_state', group_value=s, n=200 + w)
                           for s, x in (('labelled', 0.7), ('awaiting', 0.2), ('cancelled', 0.05), ('censored', 0.05))]]
            # what the run estimated from scores alone: each window's, the latest window's awaiting packets', and whether to trust it
            rows += [figure('cbpe_auroc', 0.78 - 0.001 * w - shift, as_of - 7 * w * day - 28 * day, as_of - 7 * w * day, ci_low=0.7, ci_high=0.85, n=200 + w)
                     for w in range(60)]
            rows += [figure('cbpe_auroc', 0.77 - shift, as_of - 28 * day, as_of, group_name='label_state', group_value='awaiting',
                            ci_low=0.70, ci_high=0.84, n=12),
                     figure('cbpe_reliable', 1.0, as_of - 28 * day, as_of, n=150, reason='')]
            rows += [figure('auroc', None, as_of - 28 * day, as_of, n=3, reason='one class') if k == 1 else
                     figure('auroc', 0.7, as_of - 28 * day, as_of, group_name='ward', group_value=EVIL, ci_low=0.6, ci_high=0.8, n=50),
                     figure('psi', 0.3, as_of - 28 * day, as_of, group_name='feature', group_value=f'lab:{EVIL}', n=200, test='ks', statistic=0.3,
                            p=0.001, drifted=True),
                     figure('gate', 120.0, None, as_of, group_name='gate', group_value='labelled', figure=f'120 labelled ({EVIL})',
                            threshold='at least 100', passed=True)]
            at = now - (8 if run.startswith('old') else 1) * day   # rows as monitoring.store_results writes them (its import is heavy: kept out of the fast test)
            with eng.begin() as c: c.execute(monitoring_results.insert(), [dict(r, run_id=run, deployment=dep, computed_at=at, as_of=as_of) for r in rows])
    for s in ('silent', 'live'): set_status(eng, DEPS[0], s, model_id=1, actor='tester')
    set_status(eng, DEPS[1], 'silent', model_id=1, actor='tester')
    return ws, eng


def _expected_overview(eng, now) -> dict:
    "deployment -> (packets in the last 7 days, all packets, latest AUROC [CI], open alerts), straight from the store's tables."
    from cde_workbench.store import alerts, inferences, monitoring_results
    i, m, a = inferences.c, monitoring_results.c, alerts.c
    out = {}
    with eng.connect() as c:
        for dep in (*DEPS, EVIL):
            n = lambda *w: c.execute(sa.select(sa.func.count()).where(i.deployment == dep, i.prediction_time <= now, *w)).scalar()
            run = c.execute(sa.select(m.run_id).where(m.deployment == dep).order_by(m.computed_at.desc(), m.id.desc()).limit(1)).scalar()
            au = c.execute(sa.select(m.value, m.ci_low, m.ci_high).where(m.deployment == dep, m.run_id == run, m.metric == 'auroc', m.group_name == 'all',
                                                                         m.value.is_not(None)).order_by(m.window_end.desc()).limit(1)).first()
            n_open = c.execute(sa.select(sa.func.count()).where(a.deployment == dep, a.status == 'open')).scalar()
            out[dep] = (f'{n(i.prediction_time >= now - timedelta(days=7)):,}', f'{n():,}', f'{au[0]:.2f} [{au[1]:.2f}, {au[2]:.2f}]', str(n_open))
    return out


def _overview_on_page(text: str) -> dict:
    "deployment -> (7 days, all, AUROC, alerts) from the page's HTML (the cell ids the page gives)."
    cell = lambda c: dict(re.findall(rf'id="{c}-(\d+)"[^>]*>(.*?)</td>', text))
    dep, v7, v, au, al = (cell(c) for c in ('deployment', 'volume7', 'volume', 'auroc', 'alerts'))
    return {html.unescape(dep[i]): (v7[i], v[i], au[i], al[i]) for i in dep}


def test_the_overview_and_health_pages_show_the_stores_numbers_and_escape_data(tmp_path):
    from cde_workbench.overview import health_data, health_html, overview_html, overview_rows
    from cde_workbench.store import dispose_engines
    now = datetime.now(timezone.utc).replace(microsecond=0)
    ws, eng = _store(tmp_path, now)
    try:
        rows = overview_rows(eng, ws.deployments, now)
        page = overview_html(rows, now)
        assert '<img' not in page and html.escape(EVIL) in page
        exp = _expected_overview(eng, now)
        assert _overview_on_page(page) == exp
        assert exp[DEPS[0]] == ('16', '40', '0.80 [0.75, 0.84]', '2') and exp[DEPS[1]][2] == '0.79 [0.74, 0.83]'   # k_abnormal's newest window has no AUROC
        assert rows.select('deployment', 'state', 'mode').rows() == [(EVIL, 'unregistered', '—'), (DEPS[0], 'live', 'threshold'), (DEPS[1], 'silent', 'silent')]
        d = health_data(eng, DEPS[0], days=90)
        h = health_html(d)
        assert '<img' not in h and h.count(html.escape(EVIL)) >= 5   # the ward, the feature, the gate, the alert's metric, the error
        from cde_workbench.store import monitoring_results
        m = monitoring_results.c
        mine = (m.deployment == DEPS[0], m.run_id == 'm0', m.metric == 'auroc', m.group_name == 'all')
        with eng.connect() as c:
            v, lo, hi = c.execute(sa.select(m.value, m.ci_low, m.ci_high).where(*mine).order_by(m.window_end.desc()).limit(1)).first()
            n90 = c.execute(sa.select(sa.func.count()).where(*mine, m.window_end >= now - timedelta(days=91))).scalar()
        assert re.search(r'id="latest-auroc">(.*?)</td>', h)[1] == f'{v:.2f} [{lo:.2f}, {hi:.2f}]'
        assert d['figures'].filter(metric='auroc', group_name='all').height == n90 == 13
        assert 'id="alerts-open">2</span>' in h and 'window ends in the 90 days' in h and '28-day rolling windows' in h
        # the estimate from scores alone, for the latest window and for its packets awaiting labels, and the verdict on it
        with eng.connect() as c:
            est = {gv: c.execute(sa.select(m.value, m.ci_low, m.ci_high).where(m.deployment == DEPS[0], m.run_id == 'm0', m.metric == 'cbpe_auroc',
                                                                              m.group_value == gv).order_by(m.window_end.desc()).limit(1)).first()
                   for gv in ('all', 'awaiting')}
        for cell, gv in (('cbpe_auroc', 'all'), ('cbpe_awaiting', 'awaiting')):
            v, lo, hi = est[gv]
            assert re.search(rf'id="latest-{cell}">(.*?)</td>', h)[1] == f'{v:.2f} [{lo:.2f}, {hi:.2f}]'
        assert 'id="latest-cbpe_reliable">yes</td>' in h and '>estimate (CBPE)</text>' in h
        from cde_workbench.overview import subgroups
        assert subgroups(d) == [('sex', 'F'), ('ward', EVIL)] and 'everyone and sex F' in health_html(d, ('sex', 'F'))
        assert d['run_id'] == 'm0' and [r.run_id for r in d['runs']][:2] == ['m0', 'f0']
    finally: dispose_engines()


def test_data_science_opens_overview_and_health_in_a_browser_a_clinician_is_refused(tmp_path):
    import http.client
    from cde_workbench.store import dispose_engines
    now = datetime.now(timezone.utc).replace(microsecond=0)
    ws, eng = _store(tmp_path, now)
    expected = _expected_overview(eng, now)
    from cde_workbench.store import monitoring_results
    m = monitoring_results.c
    with eng.connect() as c:
        latest = {dep: c.execute(sa.select(m.value, m.ci_low, m.ci_high).where(m.deployment == dep, m.run_id.in_(('m0', 'm1')), m.metric == 'psi_score')
                                 .order_by(m.window_end.desc()).limit(1)).first() for dep in DEPS}
    dispose_engines()
    env = {**{k: v for k, v in os.environ.items() if k != 'CDE_DATABASE_URL'}, 'CDE_VAR': str(ws.var), 'CDE_DEPLOYMENTS': str(ws.deployments)}
    from cde_workbench.access import add_user, users_file
    nurse = add_user(users_file(ws), 'nurse_' + os.urandom(4).hex(), 'clinician')
    # one server for the dashboards folder, as `cde dashboard` serves it: each page at its own address
    with voila_server(env, tmp_path, timeout=90, notebook=ROOT / 'dashboards') as (port, token, _):
        for page_name in ('overview.ipynb', 'health.ipynb'):
            c = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
            c.request('GET', f'/voila/render/{page_name}', headers={'Authorization': f'token {nurse}'})
            r = c.getresponse(); body = r.read().decode(); c.close()
            assert r.status == 403 and 'hgb_abnormal' not in body, (page_name, r.status)
        with chromium_page() as (page, dialogs):
            page.goto(f'http://127.0.0.1:{port}/voila/render/overview.ipynb?token={token}', timeout=90_000)
            page.wait_for_selector('.cde-overview', state='attached', timeout=120_000)
            page.wait_for_timeout(500)   # let any injected handler fire
            shown = {page.locator(f'#deployment-{i}').inner_text(): tuple(page.locator(f'#{c}-{i}').inner_text() for c in ('volume7', 'volume', 'auroc', 'alerts'))
                     for i in range(page.locator('[id^="deployment-"]').count())}
            screenshot(page, 'overview')
            assert not dialogs and page.locator('img[src="x"]').count() == 0
            # packets counted up to the page's own clock: a minute later, the same counts (none is newer than `now`)
            assert shown == expected
            page.goto(f'http://127.0.0.1:{port}/voila/render/health.ipynb', timeout=90_000)   # the session cookie carries the login
            page.wait_for_selector('#health-asof', state='attached', timeout=120_000)
            first = page.locator('.cde-health2 h2').inner_text()
            assert first == EVIL                                        # the first deployment with figures: the hostile name sorts first, as text
            page.locator('select').first.select_option(label=DEPS[1])
            page.wait_for_selector(f'.cde-health2 h2:text-is("{DEPS[1]}")', timeout=30_000)
            v, lo, hi = latest[DEPS[1]]
            assert page.locator('#latest-psi_score').inner_text() == f'{v:.3f}'
            assert page.locator('#latest-auroc').inner_text() == '—'    # its newest window has no AUROC
            assert page.locator('#alerts-open').inner_text() == '0'
            n180 = page.locator('.cde-chart').first.locator('circle').count()
            page.locator('select').nth(1).select_option(label='last 365 days')
            page.wait_for_selector('text=window ends in the 365 days', timeout=30_000)
            # window ends weekly: 52 realised AUROCs in a year (its newest window has none), 53 estimated from scores alone
            assert page.locator('.cde-chart').first.locator('circle').count() == 52 + 53 > n180 == 25 + 26
            page.locator('select').first.select_option(label=DEPS[0])
            page.wait_for_selector(f'.cde-health2 h2:text-is("{DEPS[0]}")', timeout=30_000)
            assert page.locator('#alerts-open').inner_text() == expected[DEPS[0]][3] == '2'
            auroc_points = page.locator('.cde-chart').first.locator('circle').count()
            subgroup = page.locator('select').nth(2)
            assert subgroup.evaluate('s => s.options[s.selectedIndex].text') == 'everyone'   # shown, not an empty box
            subgroup.select_option(label='sex: F')   # a subgroup beside everyone
            page.wait_for_selector('text=everyone and sex F', timeout=30_000)
            # window ends weekly, 53 of them in 365 days: everyone's realised and estimated AUROC, then F's too
            assert (auroc_points, page.locator('.cde-chart').first.locator('circle').count()) == (53 + 53, 53 + 53 + 53)
            assert page.locator('#latest-cbpe_awaiting').inner_text() == '0.77 [0.70, 0.84]'
            page.wait_for_timeout(500)
            screenshot(page, 'health')
            assert not dialogs and page.locator('img[src="x"]').count() == 0
