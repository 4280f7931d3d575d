"""The reviewer's documents opened in Chromium: `cde evaluate`'s HTML report on simulated predictions, and a
trained deployment's model card rendered the way `cde report` renders it (papermill, then nbconvert)."""
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa
from scipy.special import expit
from conftest import env_deployment, env_engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = '/usr/bin/chromium'
ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking']
PLOTS = ('roc-plot', 'pr-plot', 'calibration-plot', 'decision-plot')
EXTERNAL = re.compile(r'''(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//''', re.I)


@pytest.fixture(scope='module')
def browser():
    from playwright.sync_api import sync_playwright
    assert Path(CHROMIUM).exists(), 'Chromium missing: make test installs it'
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try: yield b
        finally: b.close()


def open_page(browser, path: Path):
    "Open a local file; every request the page makes is recorded (a self-contained page makes none but its own)."
    page = browser.new_page(viewport={'width': 1200, 'height': 900})
    requests = []
    page.on('request', lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state('load')
    return page, requests


def assert_self_contained(doc: str, requests: list[str]):
    assert not EXTERNAL.search(doc), EXTERNAL.search(doc).group(0)
    assert all(u.startswith(('file:', 'data:')) for u in requests), [u for u in requests if not u.startswith(('file:', 'data:'))]


def assert_plots_visible(page, ids=PLOTS):
    for pid in ids:
        el = page.locator(f'#{pid}')
        assert el.count() == 1 and el.is_visible(), pid
        box = el.bounding_box()
        assert box and box['width'] > 200 and box['height'] > 150, (pid, box)
        assert page.evaluate('id => document.getElementById(id).naturalWidth', pid) > 0, f'{pid} did not decode'


def assert_metrics_match(page, result):
    rows = page.locator('#metrics-table tbody tr')
    assert rows.count() == len(result['metrics'])
    for i in range(rows.count()):
        row = rows.nth(i)
        m = result['metrics'][row.get_attribute('data-metric')]
        est, ci = row.locator('td.estimate').inner_text(), row.locator('td.ci').inner_text()
        if m['estimate'] is None:
            assert est.startswith('—') and 'undefined' in est and ci == '—'
        else:
            assert float(est) == pytest.approx(m['estimate'], abs=5e-4) and est == f"{m['estimate']:.3f}"
            assert ci == f"[{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def simulated(n=900, seed=11):
    "Predictions with a known signal; one sex category and one age band too small to report."
    rng = np.random.default_rng(seed)
    y = rng.binomial(1, 0.25, n)
    s = expit(-1.5 + 1.8 * y + rng.normal(0, 1, n))
    groups = {'sex': rng.choice(['F', 'M', 'X'], n, p=[.49, .49, .02]),
              'age_band': rng.choice(['18-39', '40-59', '60-74', '75+'], n, p=[.3, .35, .33, .02])}
    return y, s, groups


def test_evaluation_report_in_chromium(tmp_path, browser):
    from cde_workbench.evaluate import evaluate_predictions
    from cde_workbench.report import evaluation_report_html
    y, s, groups = simulated()
    result = evaluate_predictions(y, s, threshold=0.4, groups=groups, n_boot=300, seed=1, min_group_size=25)
    doc = evaluation_report_html(result, y, s, 'Simulated predictions', {'file': 'preds.csv', 'label': 'y'})
    path = tmp_path / 'evaluation.html'; path.write_text(doc)
    page, requests = open_page(browser, path)
    try:
        assert page.title() == 'Simulated predictions'
        assert_plots_visible(page)
        assert_metrics_match(page, result)
        assert page.inner_text('#n') == str(len(y)) and page.inner_text('#prevalence') == f'{y.mean():.3f}'
        assert 'Threshold 0.4: a score at or above the threshold counts positive' in page.inner_text('p.threshold')
        assert page.locator('#subgroups').is_visible()
        for col, table in result['subgroups'].items():
            for value, g in table.items():
                row = page.locator(f'#subgroup-{col.replace("_", "-")} tr[data-group="{value}"]')
                text = row.inner_text()
                if g.get('suppressed'):
                    assert 'suppressed (n < 25)' in text and 'fewer than 25 cases' in text
                    assert row.locator('td').first.inner_text() == '< 25'   # the small count itself is not shown
                else:
                    assert row.locator('td.n').inner_text() == str(g['n'])
                    a = g['metrics']['auroc']
                    assert row.locator('td[data-metric="auroc"]').inner_text() == f"{a['estimate']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]"
        assert page.locator('tr.suppressed').count() == sum(g.get('suppressed', False) for t in result['subgroups'].values() for g in t.values()) == 2
        assert_self_contained(doc, requests)
    finally: page.close()


def test_undefined_metrics_say_why(tmp_path, browser):
    from cde_workbench.evaluate import evaluate_predictions
    from cde_workbench.report import evaluation_report_html
    y, s, _ = simulated(300, seed=2)
    result = evaluate_predictions(y, s, threshold=0.999, n_boot=100)   # nothing flagged: PPV undefined
    assert result['metrics']['ppv']['estimate'] is None
    path = tmp_path / 'undefined.html'; path.write_text(evaluation_report_html(result, y, s, 'No positives flagged'))
    page, _ = open_page(browser, path)
    try:
        assert 'undefined: no case scored at or above the threshold' in page.inner_text('#metric-ppv')
        assert_metrics_match(page, result)
        assert_plots_visible(page)
    finally: page.close()


# ----------------------------------------------------------------------------------------------------------------------
# The model card: a small synthetic hospital, a small forest, the report notebook run by papermill.

@pytest.fixture(scope='module')
def card(small_trained_store, tmp_path_factory):
    "The report of the small trained store (conftest: 200 patients, a small forest), rendered on a copy of it."
    from cde_workbench.config import Workspace
    from cde_workbench.registry import get_model
    from cde_workbench.report import render_report
    from cde_workbench.store import dispose_engines
    store = small_trained_store.copy(tmp_path_factory.mktemp('card') / 'store')
    with pytest.MonkeyPatch.context() as mp:
        store.apply(mp)
        try:
            engine = env_engine()
            dep = env_deployment()
            with engine.connect() as c: rec = get_model(c, dep.name)
            path = render_report(Workspace.from_env(), dep)
            yield {'engine': engine, 'dep': dep, 'rec': rec, 'path': path, 'doc': path.read_text()}
        finally: dispose_engines()


def test_model_card_in_chromium(card, browser):
    from cde_workbench.evaluate import evaluate_predictions
    from cde_workbench.features import AGE_BANDS
    from cde_workbench.registry import load_bundle, test_predictions
    from cde_workbench.store import patients
    from cde_workbench.tasks import lab_abnormal_points
    rec, dep, doc = card['rec'], card['dep'], card['doc']
    assert 'show_report(' not in doc   # inputs hidden
    page, requests = open_page(browser, card['path'])
    try:
        for sec in ('intended-use', 'data', 'cohort', 'features', 'model', 'performance', 'calibration', 'net-benefit',
                    'subgroups', 'limitations', 'silent-trial', 'run-trail'):
            assert page.locator(f'#{sec}').is_visible(), sec
        assert_plots_visible(page, PLOTS + ('retro-pro-plot',))
        # lineage exactly as registered
        assert page.inner_text('#model-sha256') == rec.sha256 and page.inner_text('#feature-set-hash') == rec.feature_set_hash
        assert page.inner_text('#data-fingerprint') == rec.data_fingerprint and page.inner_text('#model-version') == f'{rec.name} v{rec.version}'
        assert int(page.inner_text('#vocabulary-size')) == len(load_bundle(rec)['featurizer'].feature_names_)
        for part in ('train', 'validation', 'test'): assert int(page.inner_text(f'#n-{part}')) == rec.metrics['n'][part]
        # cohort counts from the store
        with card['engine'].connect() as c:
            pts = lab_abnormal_points(c, 'HGB')
            pat = pl.DataFrame(c.execute(sa.select(patients.c.patient_key, patients.c.sex, patients.c.birth_year)).all(),
                               schema=['patient_key', 'sex', 'birth_year'], orient='row')
        assert int(page.inner_text('#n-unlabelled')) == pts['label'].null_count()
        assert int(page.inner_text('#n-included')) == pts['label'].is_not_null().sum()
        # performance: the same evaluation of the saved test predictions, with the deployment's settings
        pred = test_predictions(rec)
        y, s = pred['label'].to_numpy().astype(int), pred['score'].to_numpy()
        ev = dep.evaluation
        assert ev.unit == 'patient'   # deployments resample patients, and the card says so
        from cde_workbench.registry import display_threshold
        thr = display_threshold(dep, rec)   # the deployment's threshold as set (rule from the lineage, or hand-set with its reason)
        assert float(page.inner_text('#threshold')) == float(f'{thr.value:g}') and page.inner_text('#threshold-source') == thr.source
        result = evaluate_predictions(y, s, threshold=thr.value, n_boot=ev.bootstrap, seed=ev.seed, level=ev.ci,
                                      clusters=pred['patient_key'].to_numpy())
        assert_metrics_match(page, result)
        n_patients = pred['patient_key'].n_unique()
        assert f'resamples of patients ({n_patients:,} patients)' in page.inner_text('#methods')
        assert page.inner_text('#n') == str(len(y))
        # subgroups: sex counts and age bands recomputed from the patients table
        j = pred.join(pat, on='patient_key', how='left')
        for sex, n in j.group_by('sex').len().iter_rows():
            row = page.locator(f'#subgroup-sex tr[data-group="{sex}"]')
            assert row.count() == 1
            if row.get_attribute('class') != 'suppressed': assert int(row.locator('td.n').inner_text()) == n
        age = (j['prediction_time'].dt.year() - j['birth_year']).to_numpy()
        for lo, hi, name in AGE_BANDS:
            n = int(((age >= lo) & (age < hi)).sum())
            row = page.locator(f'#subgroup-age-band tr[data-group="{name}"]')
            assert row.count() == (1 if n else 0), name
            if n and row.get_attribute('class') != 'suppressed': assert int(row.locator('td.n').inner_text()) == n
        assert page.locator('#subgroup-race-ethnicity').is_visible()
        lim = page.inner_text('#limitations')
        assert 'synthetic' in lim and 'temporal only' in lim and 'silent' in lim
        assert page.locator('#auroc-retro').inner_text() == f"{rec.metrics['test_auroc']['estimate']:.2f} [{rec.metrics['test_auroc']['low']:.2f}, {rec.metrics['test_auroc']['high']:.2f}]"
        assert page.inner_text('#auroc-pro') == '—'   # no silent trial has run
        from cde_workbench.table2 import table2_row, table2_rows_html
        with card['engine'].connect() as c: row = table2_row(c, dep)
        assert row.retrospective_auroc.estimate == rec.metrics['test_auroc']['estimate'] and row.prospective_auroc is None
        assert f'id="auroc-retro-hgb-abnormal">{page.inner_text("#auroc-retro")}<' in table2_rows_html([row])
        assert 'report' in page.inner_text('#run-trail')
        assert_self_contained(doc, requests)
    finally: page.close()


def test_cohort_section_counts_the_tasks_points_after_its_exclusions(card):
    "The cohort section counts what the task trains on (a new-user report said 26,600 included orders where the task had 17,624 points)."
    from dataclasses import replace
    from cde_workbench.model_card import _cohort_facts, cohort_html
    from cde_workbench.tasks import lab_abnormal_points, task_points
    dep = replace(card['dep'], task=replace(card['dep'].task, exclude_if_resulted_within_hours=24))
    with card['engine'].connect() as c:
        facts = _cohort_facts(c, dep)
        pts, every = task_points(c, dep.task), lab_abnormal_points(c, 'HGB')
    html = cohort_html(dep, facts)
    assert 0 < pts.height < every.height and facts['n_orders'] == pts.height
    assert f'<span id="n-included">{pts["label"].is_not_null().sum()}</span>' in html
    assert f'<span id="n-excluded">{every.height - pts.height}</span> orders with a HGB result in the previous 24 h' in html
