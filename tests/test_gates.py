"""Going live through the gates, rollback and `cde audit verify`, by the command line against small hand-built stores: a registered
model with silent packets and their labels. Each gate failing alone refuses (exit 1) naming its figure; all passing goes live with the
reviewer recorded; rollback restores the model served before; an edit or deletion of an audit row, made with the store's triggers
dropped, is found on SQLite and PostgreSQL."""
import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from scipy.special import expit

from cde_workbench.deploy import deployment_history_frame, deployment_state, set_status
from cde_workbench.registry import register_model, set_alias
from cde_workbench.store import audit_log, dispose_engines, get_engine, inference_labels, inferences, runs

ROOT = Path(__file__).resolve().parent.parent
CDE = str(Path(sys.executable).parent / 'cde')
NAME = 'hgb_gates'
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
VOCAB = ['dx:A', 'dx:B', 'age:60-69', 'lab:HGB:q1', 'lab:HGB:q2', 'num:K:last', 'num:K:hours_since', 'num:K:missing']
REVIEWER = 'Dr A. Reviewer (test)'


def run_cde(env: dict, *args: str, process: bool = False) -> subprocess.CompletedProcess:
    "Run `cde args` with `env`'s CDE_* variables: `main()` in this process (as the installed command runs it), or the `cde` program itself."
    if process: return subprocess.run([CDE, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    from cde_workbench.cli import main
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        for k, v in env.items():
            if k.startswith('CDE_'): mp.setenv(k, v)
        mp.setattr(sys, 'argv', ['cde', *args])
        try: main(); code = 0
        except SystemExit as e: code = e.code
    return subprocess.CompletedProcess(['cde', *args], code, out.getvalue(), err.getvalue())


class Store:
    "A store with a deployment folder for NAME (gates: 200 labelled, AUROC bound 0.70, slope 0.7-1.3, 25% and 10 points) and the CLI's environment."
    def __init__(self, url: str, base: Path, gates: str = ''):
        self.url, self.base, self.engine = url, base, get_engine(url)
        deps = base / 'deployments'
        (deps / NAME).mkdir(parents=True)
        toml = (ROOT / 'deployments' / 'hgb_abnormal' / 'deployment.toml').read_text().replace('name = "hgb_abnormal"', f'name = "{NAME}"')
        toml = toml.replace('bootstrap = 1000', 'bootstrap = 200')
        for line in gates.splitlines():   # override a [gates] setting
            key = line.split('=')[0].strip()
            toml = '\n'.join(line if l.startswith(key + ' ') else l for l in toml.splitlines())
        assert 'bootstrap = 200' in toml and all(l in toml for l in gates.splitlines())
        (deps / NAME / 'deployment.toml').write_text(toml)
        self.env = {**os.environ, 'CDE_DATABASE_URL': url, 'CDE_DEPLOYMENTS': str(deps), 'CDE_VAR': str(base / 'var'),
                    'CDE_REPORTS': str(base / 'reports'), 'CDE_SITE_KEY_FILE': str(base / 'site.key')}
        self.trials = 0

    def model(self, n: int = 300, over: float = 1.0, n_features: int = 20, no_lab: float = 0.2, seed: int = 0, labelled: bool = True) -> int:
        """Register a model version (its test years: 20 non-zero features per row, 20% of rows without a lab feature) and `n` silent
        packets of it, three per patient, each labelled from its true risk; `over` > 1 makes its scores overconfident. Returns its id."""
        rec = register_model(self.engine, NAME, {'feature_names': VOCAB, 'component': 'HGB'}, {},
                             {'data_pipe': {'rows': 600, 'mean_n_features': 20.0, 'no_lab_share': 0.2}}, 'f', 'd', var=self.base / 'var')
        rng = np.random.default_rng(seed)
        z = rng.normal(-0.5, 1.5, n)
        y, s = (rng.random(n) < expit(z)).astype(int), expit(over * z)
        self.trials += 1
        rid, k0 = f'labels-{self.trials}', 1000 * self.trials
        with self.engine.begin() as c:
            c.execute(runs.insert().values(run_id=rid, deployment=NAME, kind='labels', status='succeeded', started_at=T0,
                                           parameters=json.dumps({'as_of': (T0 + timedelta(days=90)).isoformat()})))
            for k in range(n):
                t = T0 + timedelta(hours=k)
                feats = {'0': 1.0, '2': 1.0, '7': 1.0} if k < round(no_lab * n) else {'0': 1.0, '2': 1.0, '3': 2.0, '5': 11.9, '6': 20.0}
                iid = c.execute(inferences.insert().values(
                    deployment=NAME, model_id=rec.model_id, order_id=f'O{k0 + k}', patient_key=f'P{(k0 + k) // 3}', prediction_time=t,
                    score=float(s[k]), threshold=0.3, output_mode='silent', n_features=n_features, run_id=rid, scored_at=t, trigger='order',
                    features=json.dumps(feats))).inserted_primary_key[0]
                if labelled:
                    c.execute(inference_labels.insert().values(inference_id=iid, version=1, label=int(y[k]), label_time=t + timedelta(hours=2),
                                                               stored_time=t + timedelta(hours=2), run_id=rid, extracted_at=t))
        return rec.model_id

    def cde(self, *args: str, process: bool = False) -> subprocess.CompletedProcess: return run_cde(self.env, *args, process=process)

    def state(self):
        with self.engine.connect() as c: return deployment_state(c, NAME)


def _live(store: Store, *extra: str) -> subprocess.CompletedProcess:
    return store.cde('deploy', NAME, 'live', *extra)


def _gate_lines(out: str) -> dict:
    "Gate -> (pass or FAIL, the rest of its printed line)."
    rows = [l.split(None, 2) for l in out.splitlines() if l.startswith(('pass ', 'FAIL '))]
    return {r[1]: (r[0], r[2]) for r in rows}


@pytest.fixture
def sqlite_store(tmp_path):
    yield lambda gates='': Store(f'sqlite:///{tmp_path}/store.sqlite', tmp_path, gates)
    dispose_engines()


FAILING_ALONE = {   # gate -> (a [gates] override, how the model's silent trial differs, what the refusal must say)
    'labelled': ('min_labelled = 400', {}, 'labelled: 300 labelled silent packets (of 300 scored silently) (needs at least 400)'),
    'auroc': ('auroc_lower = 0.95', {}, 'auroc: AUROC 0.'),
    'calibration': ('', {'over': 2.0}, 'calibration: slope 0.'),
    'sparsity': ('', {'n_features': 12}, "sparsity: 12.0 non-zero features per packet (-40% against the test years' 20.0) (needs change within ±25%)"),
    'missingness': ('', {'no_lab': 0.5}, "missingness: 50.0% of packets without a lab feature (+30.0 points against the test years' 20.0%) (needs change within ±10 points)"),
    'reviewer': ('', {}, 'reviewer: no reviewer given (needs a named reviewer and a reason)'),
}


@pytest.mark.parametrize('gate', list(FAILING_ALONE))
def test_each_gate_failing_alone_refuses_with_its_figure(sqlite_store, gate):
    override, trial, says = FAILING_ALONE[gate]
    store = sqlite_store(override)
    mid = store.model(**trial)
    set_status(store.engine, NAME, 'silent', mid, 'silent trial')
    r = _live(store, '--reason', 'the silent trial is over', *(() if gate == 'reviewer' else ('--reviewer', REVIEWER)))
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = _gate_lines(r.stdout)
    assert list(lines) == ['labelled', 'auroc', 'calibration', 'sparsity', 'missingness', 'reviewer'], r.stdout
    assert [g for g, (v, _) in lines.items() if v == 'FAIL'] == [gate], r.stdout
    refused = [l for l in r.stderr.splitlines() if l.startswith('cde: refused: ')]
    assert len(refused) == 1 and refused[0].startswith(f'cde: refused: {says}'), r.stderr
    assert store.state().status == 'silent' and store.state().model_id == mid   # nothing changed
    with store.engine.connect() as c:
        last = c.execute(sa.select(audit_log.c.action, audit_log.c.detail).order_by(audit_log.c.id.desc()).limit(1)).one()
        assert deployment_history_frame(c, NAME)['status'].to_list() == ['silent']
    assert last.action == 'deployment.live_refused' and json.loads(last.detail)['failing'] == [gate]   # the attempt is on record


def test_a_reason_is_required_and_live_needs_a_silent_trial_first(sqlite_store):
    store = sqlite_store()
    mid = store.model()
    r = _live(store, '--reviewer', REVIEWER, '--reason', 'go')
    assert r.returncode == 2 and r.stderr.startswith("cde: error: deployment 'hgb_gates' cannot go from unregistered to live"), r.stderr
    set_status(store.engine, NAME, 'silent', mid, 'silent trial')
    r = _live(store, '--reviewer', REVIEWER)                       # a reviewer but no reason
    assert r.returncode == 1 and _gate_lines(r.stdout)['reviewer'][0] == 'FAIL' and 'no reason given' in r.stderr, r.stderr
    r = _live(store, '--reviewer', 'x' * 65, '--reason', 'go')      # a name the store cannot keep whole
    assert r.returncode == 1 and 'reviewer name of 65 characters' in r.stderr, r.stderr
    assert store.state().status == 'silent'


def test_unlabelled_packets_do_not_count(sqlite_store):
    store = sqlite_store()
    mid = store.model(labelled=False)
    set_status(store.engine, NAME, 'silent', mid, 'silent trial')
    r = _live(store, '--reviewer', REVIEWER, '--reason', 'go')
    assert r.returncode == 1
    lines = _gate_lines(r.stdout)
    assert [g for g, (v, _) in lines.items() if v == 'FAIL'] == ['labelled', 'auroc', 'calibration'], r.stdout
    assert lines['auroc'][1].startswith('undefined (no labelled silent packet)'), r.stdout
    assert lines['sparsity'][0] == lines['missingness'][0] == 'pass'   # the data-pipe checks need no labels


def test_all_gates_pass_goes_live_and_rollback_restores_the_previous_model(store_url, tmp_path):
    store = Store(store_url, tmp_path)
    try:
        v1 = store.model()
        r = store.cde('deploy', NAME, 'silent', '--model', '1', '--reason', 'silent trial of v1')
        assert r.returncode == 0, r.stderr
        r = store.cde('deploy', NAME, 'live', '--reviewer', REVIEWER, '--reason', 'silent trial of v1 reviewed', process=True)   # the program itself
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert {v for v, _ in _gate_lines(r.stdout).values()} == {'pass'} and len(_gate_lines(r.stdout)) == 6, r.stdout
        assert f'{NAME}: live on {NAME} v1 (model id {v1}), signed off by {REVIEWER}' in r.stdout
        # a new version: back to a silent trial of its own, then through the gates again
        r = store.cde('deploy', NAME, 'silent', '--model', '2', '--reason', 'silent trial of v2')
        assert r.returncode == 2 and 'no registered model' in r.stderr, r.stderr
        v2 = store.model(seed=1)
        assert store.cde('deploy', NAME, 'silent', '--model', '2', '--reason', 'silent trial of v2').returncode == 0
        r = _live(store, '--reviewer', REVIEWER, '--reason', 'silent trial of v2 reviewed')
        assert r.returncode == 0 and f'live on {NAME} v2' in r.stdout, (r.stdout, r.stderr)
        # a model change of a live deployment is gated too: v3's silent packets (scored in its own trial) are overconfident
        v3 = store.model(seed=2, over=2.0)
        r = _live(store, '--model', '3', '--reviewer', REVIEWER, '--reason', 'v3')
        assert r.returncode == 1 and 'cde: refused: calibration: slope 0.' in r.stderr and store.state().model_id == v2
        r = store.cde('deploy', NAME, 'rollback', '--reason', 'v2 alerts too often', '--reviewer', 'Dr B. Oncall')
        assert r.returncode == 0, r.stderr
        assert f'{NAME}: live, rolled back to {NAME} v1 (model id {v1})' in r.stdout
        assert (store.state().status, store.state().model_id) == ('live', v1)
        with store.engine.connect() as c:
            h = deployment_history_frame(c, NAME)
            acts = c.execute(sa.select(audit_log.c.action, audit_log.c.actor).where(audit_log.c.target == NAME).order_by(audit_log.c.id)).all()
        assert h.select('status', 'model_id').rows() == [('silent', v1), ('live', v1), ('silent', v2), ('live', v2), ('live', v1)]
        assert h['actor'].to_list()[1::2] == [REVIEWER, REVIEWER] and h['actor'][-1] == 'Dr B. Oncall'
        assert [json.loads(g)['model_id'] if g else None for g in h['gates']] == [None, v1, None, v2, None]   # the gates each passed
        assert json.loads(h['gates'][3])['passed'] is True and h['reason'].to_list()[-1] == 'v2 alerts too often'
        assert [a for a, _ in acts] == ['deployment.status'] * 4 + ['deployment.live_refused', 'deployment.rollback']
        assert [w for a, w in acts if a == 'deployment.status'][1::2] == [REVIEWER, REVIEWER]
        assert v3 not in h['model_id'].to_list()
        r = store.cde('deploy', NAME, 'rollback')
        assert r.returncode == 2 and 'needs --reason' in r.stderr
        r = store.cde('audit', 'verify')
        assert r.returncode == 0 and 'hash chain intact' in r.stdout, (r.stdout, r.stderr)
    finally:
        dispose_engines()


def _drop_triggers(engine):
    with engine.begin() as c:
        if engine.dialect.name == 'postgresql': c.execute(sa.text('DROP TRIGGER audit_log_append_only ON audit_log'))
        else:
            c.execute(sa.text('DROP TRIGGER audit_log_no_update')); c.execute(sa.text('DROP TRIGGER audit_log_no_delete'))


def test_audit_verify_finds_an_edit_and_a_deletion(store_url, tmp_path):
    store = Store(store_url, tmp_path)
    try:
        store.model(n=3)
        set_status(store.engine, NAME, 'silent', 1, 'silent trial')
        set_alias(store.engine, NAME, 'champion', 1, 'reviewed')   # alias moves are audited and chained too
        set_status(store.engine, NAME, 'paused', reason='a pause')
        with store.engine.connect() as c:
            rows = c.execute(sa.select(audit_log.c.id, audit_log.c.action, audit_log.c.detail).order_by(audit_log.c.id)).all()
        assert [r.action for r in rows] == ['model.register', 'deployment.status', 'model.alias', 'deployment.status']
        r = store.cde('audit', 'verify')
        assert (r.returncode, r.stdout.strip()) == (0, 'audit log: 4 rows checked, hash chain intact'), (r.stdout, r.stderr)
        with pytest.raises(sa.exc.DatabaseError):   # the triggers refuse an edit
            with store.engine.begin() as c: c.execute(sa.text('UPDATE audit_log SET actor = :a WHERE id = :i'), {'a': 'x', 'i': rows[2].id})
        with store.engine.begin() as c:   # a row appended by hand, not through audit(): outside the chain
            c.execute(audit_log.insert().values(at=T0, actor='intruder', action='deployment.status', target=NAME, detail='{"to": "live"}'))
        r = store.cde('audit', 'verify')
        assert r.returncode == 1 and 'row 5 (deployment.status hgb_gates): its contents do not match its hash (edited)' in r.stdout, r.stdout
        assert 'the chain ends at row 5, but its recorded end is row 4' in r.stdout, r.stdout
        _drop_triggers(store.engine)
        with store.engine.begin() as c: c.execute(sa.text('DELETE FROM audit_log WHERE id = 5'))
        assert store.cde('audit', 'verify').returncode == 0
        alias = rows[2]
        with store.engine.begin() as c:
            c.execute(sa.text('UPDATE audit_log SET detail = :d WHERE id = :i'), {'d': alias.detail.replace('reviewed', 'rubber-stamped'), 'i': alias.id})
        r = store.cde('audit', 'verify', process=True)   # the program itself
        assert r.returncode == 1, r.stdout
        assert r.stdout.splitlines() == ['audit log: 4 rows checked, 1 problem:',
                                         f'  row {alias.id} (model.alias {NAME}@champion): its contents do not match its hash (edited)'], r.stdout
        with store.engine.begin() as c:   # put back as it was: intact again (the check is on the contents)
            c.execute(sa.text('UPDATE audit_log SET detail = :d WHERE id = :i'), {'d': alias.detail, 'i': alias.id})
        assert store.cde('audit', 'verify').returncode == 0
        with store.engine.begin() as c: c.execute(sa.text('DELETE FROM audit_log WHERE id = :i'), {'i': rows[1].id})
        r = store.cde('audit', 'verify')
        assert r.returncode == 1 and f'row {rows[2].id}: its prev_hash does not match the row before it (a row was removed or inserted)' in r.stdout, r.stdout
        assert r.stdout.startswith('audit log: 3 rows checked, 1 problem:'), r.stdout
        with store.engine.begin() as c: c.execute(sa.text('DELETE FROM audit_log WHERE id = :i'), {'i': rows[3].id})   # the newest row
        r = store.cde('audit', 'verify')
        assert r.returncode == 1 and 'rows were removed from the end' in r.stdout, r.stdout
        r = store.cde('audit', 'show', '--limit', '1')
        assert r.returncode == 0 and 'model.alias' in r.stdout and len(r.stdout.splitlines()) == 1, r.stdout
    finally:
        dispose_engines()


def test_the_gates_of_a_trained_model_after_its_silent_trial(silent_store, monkeypatch):
    "On the small trained store: the figures come from the model's recorded test-year figures and its real silent packets and labels."
    from cde_workbench.gates import evaluate_gates
    from cde_workbench.labels import extract_labels
    from cde_workbench.monitor import label_status
    from cde_workbench.registry import test_predictions
    from cde_workbench.schedule import run_ledger
    from cde_workbench.serve import score_pending
    from cde_workbench.serve import score_point, serving_model
    from cde_workbench.tasks import task_points
    engine, dep, rec = silent_store
    scored_to, labelled_to = datetime(2024, 4, 1, tzinfo=timezone.utc), datetime(2024, 3, 15, tzinfo=timezone.utc)
    with engine.connect() as c: pts = task_points(c, dep.task, start=datetime(2024, 1, 1, tzinfo=timezone.utc), as_of=scored_to)
    with run_ledger(engine, dep.name, 'trigger', {}) as run_id:   # the first orders by the live path, the rest by the catch-up run
        model = serving_model(engine, dep)
        for r in pts.head(40).iter_rows(named=True):
            score_point(engine, dep, patient_key=r['patient_key'], when=r['prediction_time'], order_id=r['order_id'], trigger='order', run_id=run_id, model=model)
    for kind, fn, when in (('score', score_pending, scored_to), ('labels', extract_labels, labelled_to)):
        with run_ledger(engine, dep.name, kind, {'as_of': when.isoformat()}) as run_id: fn(engine, dep, when, run_id)
    dp, t = rec.metrics['data_pipe'], test_predictions(rec)
    assert dp['rows'] == t.height and dp['mean_n_features'] == pytest.approx(t['n_features'].mean()) and 0 <= dp['no_lab_share'] < 1
    with engine.connect() as c:
        rep = evaluate_gates(c, dep, rec.model_id, REVIEWER, 'silent trial reviewed')
        st = label_status(c, dep)
        i = inferences.c
        nf = c.execute(sa.select(sa.func.avg(i.n_features)).where(i.deployment == dep.name, i.prediction_time <= rep.as_of)).scalar()
        feats = [json.loads(f) for (f,) in c.execute(sa.select(i.features).where(i.deployment == dep.name, i.prediction_time <= rep.as_of,
                                                                                 i.features.is_not(None)))]
    g = {x.name: x for x in rep.gates}
    assert g['labelled'].value == (st['label_state'] == 'labelled').sum() > 0
    assert g['sparsity'].value == pytest.approx(abs(float(nf) - dp['mean_n_features']) / dp['mean_n_features'])
    assert len(feats) == st.height and all(f for f in feats)   # both paths (live and catch-up) store each packet's features by name
    no_lab = np.mean([not any(k.startswith('lab:') or (k.startswith('num:') and not k.endswith(':missing')) for k in f) for f in feats])
    assert g['missingness'].value == pytest.approx(abs(no_lab - dp['no_lab_share']))
    assert g["missingness"].note == f"{len(feats)} of {st.height} silent packets record their features", g["missingness"].note
    assert g['reviewer'].passed
    # the command line says the same and acts on it
    r = run_cde(dict(os.environ), 'deploy', dep.name, 'live', '--reviewer', REVIEWER, '--reason', 'silent trial reviewed')
    assert r.returncode == (0 if rep.passed else 1) and r.stdout.splitlines()[1:7] == [x.line() for x in rep.gates], r.stdout
    with engine.connect() as c: assert deployment_state(c, dep.name).status == ('live' if rep.passed else 'silent')


def test_the_demo_takes_its_deployment_through_the_gates_and_its_audit_chain_verifies(demo):
    from cde_workbench.demo import DEMO_REVIEWER
    from cde_workbench.gates import GATE_NAMES
    out = demo['out']
    assert f'going live: hgb_abnormal through its gates, signed off by {DEMO_REVIEWER}' in out, out[-3000:]
    gates = re.findall(r'^    (pass|FAIL)  (\w+) ', out, re.M)
    assert [g for _, g in gates] == list(GATE_NAMES), out[-3000:]
    with demo['engine'].connect() as c:
        status = c.execute(sa.text("select status from deployments where name = 'hgb_abnormal'")).scalar()
        last = c.execute(sa.text("select status, actor from deployment_history where name = 'hgb_abnormal' order by id desc limit 1")).one()
    if all(v == 'pass' for v, _ in gates):
        assert re.search(r'hgb_abnormal: live on hgb_abnormal v\d+', out) and status == 'live' and tuple(last) == ('live', DEMO_REVIEWER)
    else:
        refused = re.search(r'hgb_abnormal stays silent: refused by (.*)', out).group(1)
        assert status == 'silent' and all(f'{g} (' in refused for v, g in gates if v == 'FAIL'), refused
    assert re.search(r'audit log: \d+ rows checked, hash chain intact', out), out[-3000:]
    r = subprocess.run([CDE, 'audit', 'verify'], capture_output=True, text=True, env=demo['env'], timeout=120, cwd=ROOT)
    assert r.returncode == 0 and 'hash chain intact' in r.stdout, (r.stdout, r.stderr)
