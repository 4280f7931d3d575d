"""The walking skeleton end to end, as a user runs it: `cde demo` in its own process, then the store,
the report, a repeated scoring run, and the Voilà dashboard in Chromium."""
import json
import re
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from conftest import CHROMIUM, CHROMIUM_ARGS, chromium_page, screenshot, voila_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CDE = str(Path(sys.executable).parent / 'cde')


def q(engine, sql, **kw):
    with engine.connect() as c: return c.execute(sa.text(sql), kw).all()


def test_demo_says_where_the_report_and_dashboard_are(demo):
    out = demo['out']
    assert re.search(r'Report: .*reports/hgb_abnormal/report\.html', out) and 'make dashboard' in out
    assert re.search(r'retrospective: n=\d+, prevalence 0\.\d\d \[0\.\d\d, 0\.\d\d\], AUROC 0\.\d\d \[', out)
    assert re.search(r'prospective: n=\d+, prevalence 0\.\d\d \[0\.\d\d, 0\.\d\d\], AUROC 0\.\d\d \[', out)


def test_exactly_one_packet_per_scored_order(demo):
    eng = demo['engine']
    # packets of orders (the ward round after going live scores patient-view points, not orders: see the ward view's test)
    n, distinct = q(eng, "select count(*), count(distinct order_id) from inferences where deployment='hgb_abnormal' and \"trigger\" != 'hook'")[0]
    due = q(eng, "select count(*) from lab_orders where panel='CBC' and event_time >= '2024-01-01'")[0][0]
    # every such order has a packet, except orders whose cancellation was stored before their scoring run
    missed = q(eng, "select count(*) from lab_orders o where panel='CBC' and event_time >= '2024-01-01' and status != 'cancelled' "
                    "and not exists (select 1 from inferences i where i.order_id = o.order_id)")[0][0]
    assert n == distinct > 0 and missed == 0 and n <= due
    # every packet was scored at its order's time, with the model the deployment serves
    mism = q(eng, "select count(*) from inferences i join lab_orders o using (order_id) where i.prediction_time != o.event_time")[0][0]
    assert mism == 0
    assert q(eng, "select count(distinct model_id) from inferences where deployment='hgb_abnormal'")[0][0] == 1   # the ward round's too
    # labels: every packet whose hemoglobin result arrived has one (in one or more versions: corrected results add versions)
    labelled = q(eng, "select count(distinct inference_id) from inference_labels")[0][0]
    resulted = q(eng, "select count(distinct i.inference_id) from inferences i join lab_results r on r.order_id = i.order_id and r.component = 'HGB'")[0][0]
    assert labelled == resulted > 0


def test_scoring_again_adds_nothing(demo):
    eng = demo['engine']
    before = q(eng, 'select count(*) from inferences')[0][0]
    r = subprocess.run([CDE, 'score', 'hgb_abnormal', '--as-of', '2024-04-05T00:00:00+00:00'], capture_output=True, text=True,
                       env=demo['env'], timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert q(eng, 'select count(*) from inferences')[0][0] == before
    assert q(eng, "select status from runs where kind='score' order by started_at desc limit 1")[0][0] == 'succeeded'


def test_report_shows_table2_without_identifiers(demo):
    html = (demo['base'] / 'reports' / 'hgb_abnormal' / 'report.html').read_text()
    for cell in ('prev-retro', 'prev-pro', 'auroc-retro', 'auroc-pro'):
        assert re.search(rf'id="{cell}">0\.\d\d \[0\.\d\d, 0\.\d\d\]<', html), cell
    assert 'data:image/png;base64' in html and 'show_report(' not in html   # plots in, code hidden
    assert re.search(r'id="n-labelled">\d+ \(\d+\.\d%\)</span> labelled', html) and 'id="label-status-table"' in html
    mrns = [r[0] for r in q(demo['engine'], 'select mrn from patient_identity limit 50')]
    names = [r[0] for r in q(demo['engine'], 'select distinct family_name from patient_identity')]
    assert mrns and not any(m in html for m in mrns) and not any(f'>{n}<' in html for n in names)


def test_dashboard_in_chromium_shows_the_store_count(demo):
    from playwright.sync_api import sync_playwright
    assert Path(CHROMIUM).exists(), 'Chromium missing: make test installs it'
    with voila_server(demo['env'], demo['base']) as (port, token, status):
        assert status in (302, 403)    # no token, no dashboard
        packets = q(demo['engine'], "select count(*) from inferences where deployment='hgb_abnormal'")[0][0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f'http://127.0.0.1:{port}/?token={token}', timeout=60_000)
                cell = page.wait_for_selector('#packets-hgb_abnormal', state='visible', timeout=90_000)
                assert int(cell.inner_text()) == packets
                status = q(demo['engine'], "select status from deployments where name='hgb_abnormal'")[0][0]   # live if its gates passed
                assert status in ('silent', 'live') and page.inner_text('#status-hgb_abnormal') == status
                screenshot(page, 'demo-monitor')
            finally: browser.close()


def test_demo_trains_and_evaluates_all_twelve_deployr_tasks(demo):
    from cde_workbench.demo import CLOCK_DEPLOYMENT, DEPLOYR_DEPLOYMENTS
    eng = demo['engine']
    html = (demo['base'] / 'reports' / 'hgb_abnormal' / 'report.html').read_text()
    for name in DEPLOYR_DEPLOYMENTS:   # the retrospective rows of DEPLOYR's Table 2, one per lab task
        slug = name.replace('_', '-')
        assert re.search(rf'id="auroc-retro-{slug}">0\.\d\d \[0\.\d\d, 0\.\d\d\]<', html), name
        assert re.search(rf'id="prev-retro-{slug}">0\.\d\d \[0\.\d\d, 0\.\d\d\]<', html), name
    assert q(eng, "select count(distinct name) from models")[0][0] == 13   # and the ICU transfer model
    champions = q(eng, "select name, model_id from model_aliases where alias = 'champion'")
    assert sorted(n for n, _ in champions) == sorted([*DEPLOYR_DEPLOYMENTS, CLOCK_DEPLOYMENT])
    ok = q(eng, "select kind, count(*) from runs where kind in ('train', 'evaluate') and status = 'succeeded' group by kind")
    assert dict(ok) == {'train': 13, 'evaluate': 12}   # the reviewer's evaluation covers the lab tasks
    # every model's candidates were compared on validation, and the chosen kind is one of them
    import json
    from cde_workbench.deployment import load_deployment
    for (name, metrics, params) in q(eng, 'select name, metrics, params from models'):
        m, p = json.loads(metrics), json.loads(params)
        kinds = {v['kind'] for v in m['validation']}   # the deployment's candidates (all three kinds, unless its [model] narrows them)
        assert kinds == set(load_deployment(ROOT / 'deployments' / name).model.candidates) and p['model']['kind'] in kinds, name
    assert len(load_deployment(ROOT / 'deployments' / 'hgb_abnormal').model.candidates) == 3


def test_demo_runs_the_icu_model_once_on_its_clock(demo):
    "One scheduled score run of icu_transfer_24h at a cron time of the silent trial: its wards' inpatients, one packet each."
    eng = demo['engine']
    (run_id, sched, by, status), = q(eng, "select run_id, scheduled_for, started_by, status from runs where deployment = 'icu_transfer_24h' and kind = 'score'")
    assert (by, status) == ('schedule', 'succeeded') and sched[11:16] in ('00:00', '06:00', '12:00', '18:00')
    n, points, triggers = q(eng, "select count(*), count(distinct order_id), group_concat(distinct trigger) from inferences where run_id = :r", r=run_id)[0]
    assert n == points > 0 and triggers == 'schedule'
    assert re.search(rf'icu_transfer_24h on its clock: {n} inpatients scored at ', demo['out'])


def test_demo_leaves_both_impact_reports(demo):
    "Both registered analyses ran by their notebooks (kept beside the deployment's runs), with a report and the estimate beside the truth."
    out, base = demo['out'], demo['base']
    for plan, dep, kind in (('hgb_display_rdd', 'hgb_abnormal', 'impact_rdd'), ('electrolyte_nudge', 'icu_transfer_24h', 'impact_rct')):
        m = re.search(rf'Impact report \({plan}\): (\S+/report\.html)', out)
        assert m, (plan, out[-2000:])
        report = Path(m.group(1))
        assert (base / 'reports' / dep / report.parent.name / f'{kind}.ipynb').exists()
        page = report.read_text()
        assert 'id="plan-sha256"' in page and 'id="headline"' in page and 'data:image/png;base64' in page
    assert re.search(r'hgb_display_rdd \(sha256 \w+…\): effect of showing the score -?\d+\.\d{3} \(95% robust CI -?\d+\.\d{3} to -?\d+\.\d{3}\); simulated truth', out)
    assert re.search(r'electrolyte_nudge \(sha256 \w+…\): ITT -?\d+\.\d{3} \(95% CI .*\), truth -?\d+\.\d{3}; CACE', out)
    assert q(demo['engine'], "select count(*) from audit_log where action = 'impact.run'")[0][0] == 3


def test_demo_runs_a_plan_registered_on_its_own_log(demo):
    "hgb_label_selection: registered before the silent trial logged anything, run at the end on hgb_abnormal's log as known at the last label run."
    out, eng = demo['out'], demo['engine']
    m = re.search(r'Impact report \(hgb_label_selection\): (\S+/report\.html)', out)
    assert m, out[-2000:]
    result = json.loads((Path(m.group(1)).parent / 'result.json').read_text())
    assert (result['design'], result['run']['source'], result['run']['deployment']) == ('label_selection', 'store', 'hgb_abnormal')
    (registered,), = q(eng, "select registered_at from analysis_plans where name = 'hgb_label_selection'")
    (first,), = q(eng, "select min(started_at) from runs where deployment = 'hgb_abnormal' and kind = 'score'")
    assert str(registered) < str(first)   # the plan came before the silent trial's first scoring run, let alone a label
    assert result['run']['n_packets'] > 0 and result['n_observed'] > 0
    assert re.search(r'hgb_label_selection \(sha256 \w+…\), hgb_abnormal\'s log as known at .*: \d+ packets, \d+ labelled; AUROC weighted', out)



def test_the_demo_leaves_the_ward_view_with_its_patients(demo):
    """The ward view, at the wall clock as the dashboard opens it, lists each ward's current inpatients (the hospital's open
    stays), names the feed's last message, and shows scores only if a deployment went live through its gates: then the ward
    round scored every current inpatient and the page's scores are the store's. On this demo's data the calibration gate
    refuses hgb_abnormal (README, Going live): no ward round, no scores, and the page says no deployment is live."""
    from cde_workbench.config import as_utc, utcnow
    from cde_workbench.demo import DEMO_OPEN_STAYS
    from cde_workbench.store import adt_events
    from cde_workbench.ward import live_deployments, ward_names, ward_patients, ward_view_html
    eng = demo['engine']
    status = q(eng, "select status from deployments where name='hgb_abnormal'")[0][0]
    deps = live_deployments(eng, ROOT / 'deployments')
    assert [d.name for d in deps] == (['hgb_abnormal'] if status == 'live' else []), status
    with eng.connect() as c: at = as_utc(c.execute(sa.select(sa.func.max(adt_events.c.stored_time))).scalar())
    now = utcnow()
    wards = ward_names(eng, now)
    assert wards == ward_names(eng, at)   # nothing admitted or discharged after the feed's last message
    shown, pages = {}, []
    for w in wards:
        df = ward_patients(eng, w, now, deps)
        shown |= dict(zip(df['patient_key'], df['hgb_abnormal:score'] if deps else [None] * df.height))
        pages.append(ward_view_html(eng, w, now, deps, 'e2e test'))
        assert f'ADT feed has been silent since {at:%Y-%m-%d %H:%M} UTC' in pages[-1]
    assert len(shown) >= DEMO_OPEN_STAYS   # the open stays at least (a garbled discharge message may leave another stay open)
    hook = dict(q(eng, "select patient_key, score from inferences where \"trigger\" = 'hook'"))
    if status == 'live':
        m = re.search(r'ward round: (\d+) current inpatients on (\d+) wards scored live at (\S+) ', demo['out'])
        assert m and (int(m.group(1)), int(m.group(2)), m.group(3)) == (len(shown), len(wards), f'{at:%Y-%m-%dT%H:%M}'), demo['out'][-2000:]
        assert shown == hook and q(eng, "select distinct output_mode from inferences where \"trigger\" = 'hook'") == [('threshold',)]
    else:
        assert re.search(r'hgb_abnormal stays silent: refused by ', demo['out'])
        m = re.search(r'ward view: (\d+) current inpatients on (\d+) wards when the feed stops \((\S+)\), listed without scores', demo['out'])
        assert m and (int(m.group(1)), int(m.group(2)), m.group(3)) == (len(shown), len(wards), f'{at:%Y-%m-%dT%H:%M}'), demo['out'][-2000:]
        assert hook == {} and all('No deployment is live' in p for p in pages)


def test_every_dashboard_page_shows_the_demos_store(demo):
    """After the demo, `cde dashboard`'s folder in Chromium with a data-science token: the overview's row, hgb_abnormal's
    health (its open alerts, the hemoglobin drift's among them; its latest figures) and the ward view's current patients
    are the store's, each page screenshotted (var/test-artefacts/screenshots/demo-*.png)."""
    from cde_workbench.config import Workspace, utcnow
    from cde_workbench.overview import health_data, health_html
    from cde_workbench.ward import live_deployments, ward_names, ward_patients
    eng = demo['engine']
    ws = Workspace.from_env(demo['env'])
    packets = q(eng, "select count(*) from inferences where deployment='hgb_abnormal'")[0][0]
    status = q(eng, "select status from deployments where name='hgb_abnormal'")[0][0]
    n_open = q(eng, "select count(*) from alerts where deployment='hgb_abnormal' and status='open'")[0][0]
    expected = health_html(health_data(eng, 'hgb_abnormal'))
    latest = {m: re.search(rf'id="latest-{m}">(.*?)</td>', expected)[1] for m in ('auroc', 'oe', 'psi_score')}
    assert n_open >= 1 and re.fullmatch(r'0\.\d\d \[0\.\d\d, [01]\.\d\d\]', latest['auroc']), (n_open, latest)
    with voila_server(demo['env'], demo['base'], timeout=90, notebook=ROOT / 'dashboards') as (port, token, _):
        with chromium_page() as (page, dialogs):
            page.goto(f'http://127.0.0.1:{port}/voila/render/overview.ipynb?token={token}', timeout=90_000)
            page.wait_for_selector('.cde-overview', state='attached', timeout=120_000)
            row = {page.locator(f'#deployment-{i}').inner_text(): i for i in range(page.locator('[id^="deployment-"]').count())}['hgb_abnormal']
            assert [page.locator(f'#{c}-{row}').inner_text() for c in ('state', 'volume', 'alerts')] == [status, f'{packets:,}', str(n_open)]
            screenshot(page, 'demo-overview')
            page.goto(f'http://127.0.0.1:{port}/voila/render/health.ipynb', timeout=90_000)   # the session cookie carries the login
            page.wait_for_selector('#health-asof', state='attached', timeout=120_000)
            if page.locator('.cde-health2 h2').inner_text() != 'hgb_abnormal':
                page.locator('select').first.select_option(label='hgb_abnormal')
                page.wait_for_selector('.cde-health2 h2:text-is("hgb_abnormal")', timeout=30_000)
            assert {m: page.locator(f'#latest-{m}').inner_text() for m in latest} == latest
            assert page.locator('#alerts-open').inner_text() == str(n_open)
            assert 'result_shift' in page.locator('[id^="alert-"]').all_inner_texts()   # the hemoglobin drift's alert
            screenshot(page, 'demo-health')
            page.goto(f'http://127.0.0.1:{port}/voila/render/ward.ipynb', timeout=90_000)
            page.wait_for_selector('.cde-ward', state='attached', timeout=120_000)
            now = utcnow()
            ward = page.locator('.cde-ward h2').inner_text().removeprefix('Ward ')
            deps = live_deployments(eng, ws.deployments)
            assert ward in ward_names(eng, now)
            want = ward_patients(eng, ward, now, deps)
            assert page.locator('[id^="patient-"]').all_inner_texts() == want['patient_key'].to_list() != []   # the demo leaves open stays
            if deps:   # hgb_abnormal went live (it does at 3,000 patients): each current patient's live score
                assert [page.locator(f'#score-hgb_abnormal-{i}').inner_text() for i in range(want.height)] == [
                    '—' if s is None else f'{s:.2f}' for s in want['hgb_abnormal:score']]
            else:
                assert 'No deployment is live' in page.locator('.cde-ward').inner_text()
            screenshot(page, 'demo-ward')
            assert not dialogs
