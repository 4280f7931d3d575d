"""Registered analysis plans on SQLite and PostgreSQL: register, amend and read back with the audit chain intact; the database
refuses edits; an edit made with the triggers dropped is refused by `get_plan`; a refused or failed amendment writes nothing;
and `cde impact plan register|show|list|amend` through the command line."""
import hashlib
import io
import json
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import sqlalchemy as sa

from cde_workbench.impact import ImpactError
from cde_workbench.impact_plans import (PlanMismatchError, amend_plan, amendment_hash, check_run_parameters, get_plan, list_plans,
                                        load_plan, plan_hash, register_plan, store_deployment)
from cde_workbench.store import analysis_plans, audit_head, audit_log, dispose_engines, get_engine, plan_amendments, verify_audit_chain

PLAN = '''name = "nudge_trial"
design = "iv"
deployment = "noaf_risk"
population = "ICU stays within electrolyte range, randomised to a nudge"
outcome = "New-onset atrial fibrillation"
estimand = "ITT of the nudge and CACE of supplementation"
estimator = "OLS and two-stage least squares"
data = "trial.parquet"
description = "The electrolyte vignette"

[parameters]
outcome = "noaf"
treatment = "supplemented"
instrument = "arm"
covariates = ["age"]
'''


@pytest.fixture
def engine(store_url):
    eng = get_engine(store_url)
    yield eng
    dispose_engines()


@pytest.fixture
def plan(tmp_path):
    p = tmp_path / 'plan.toml'
    p.write_text(PLAN)
    return load_plan(p)


def counts(engine) -> tuple[int, int, int]:
    with engine.connect() as c:
        return tuple(c.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in (analysis_plans, plan_amendments, audit_log))


def drop_triggers(engine, table: str) -> None:
    "Lift a table's append-only triggers, as someone with the database owner's rights could."
    with engine.begin() as c:
        if engine.dialect.name == 'postgresql': c.exec_driver_sql(f'DROP TRIGGER {table}_append_only ON {table}')
        else: c.exec_driver_sql(f'DROP TRIGGER {table}_no_update'); c.exec_driver_sql(f'DROP TRIGGER {table}_no_delete')


def test_register_amend_and_read_back_with_the_audit_chain_intact(engine, plan):
    reg = register_plan(engine, plan, actor='Dr A')
    assert reg.sha256 == plan_hash(plan) and reg.registered_by == 'Dr A' and reg.registered_at.tzinfo is not None
    assert register_plan(engine, plan, actor='Dr B') == reg                      # the same content again: the stored plan
    a1 = amend_plan(engine, 'nudge_trial', {'cov': 'cluster:ward'}, 'randomised by ward round', actor='Dr B')
    a2 = amend_plan(engine, 'nudge_trial', {'covariates': None, 'level': 90}, 'age missing in a third', actor='Dr C')
    got = get_plan(engine, 'nudge_trial')
    assert got == a2 and got.plan == plan and got.sha256 == reg.sha256
    assert got.effective_parameters == {'outcome': 'noaf', 'treatment': 'supplemented', 'instrument': 'arm', 'cov': 'cluster:ward', 'level': 90.0}
    assert [(a['seq'], a['by'], a['reason']) for a in got.amendments] == [(1, 'Dr B', 'randomised by ward round'), (2, 'Dr C', 'age missing in a third')]
    assert got.amendments[0]['sha256'] == amendment_hash(reg.sha256, {'cov': 'cluster:ward'}, 'randomised by ward round')
    assert got.amendments[1]['sha256'] == amendment_hash(a1.effective_sha256, {'covariates': None, 'level': 90.0}, 'age missing in a third')
    assert [p.plan.name for p in list_plans(engine)] == ['nudge_trial']
    with engine.connect() as c:
        v = verify_audit_chain(c)
        rows = c.execute(sa.select(audit_log.c.action, audit_log.c.target, audit_log.c.detail).order_by(audit_log.c.id)).all()
    assert v.ok and v.rows == 3, v.problems
    assert [(r.action, r.target) for r in rows] == [('impact.plan.register', 'nudge_trial')] + [('impact.plan.amend', 'nudge_trial')] * 2
    assert [json.loads(r.detail)['sha256'] for r in rows] == [reg.sha256, a1.effective_sha256, a2.effective_sha256]
    check_run_parameters(got, dict(got.effective_parameters))
    with pytest.raises(PlanMismatchError, match=r"level = 95.0, the plan says 90.0; outcome is 'noaf' in the plan but not given.*cde impact plan amend nudge_trial"):
        check_run_parameters(got, {**{k: v for k, v in got.effective_parameters.items() if k != 'outcome'}, 'level': 95.0})


def test_other_content_under_a_registered_name_is_refused(engine, plan, tmp_path):
    register_plan(engine, plan, actor='Dr A')
    before = counts(engine)
    p = tmp_path / 'changed.toml'
    p.write_text(PLAN.replace('instrument = "arm"', 'instrument = "nudged"'))
    with pytest.raises(ImpactError, match=r"'nudge_trial' is already registered .* differs in parameters.instrument: a registered plan is not replaced"):
        register_plan(engine, load_plan(p), actor='Dr B')
    assert counts(engine) == before and get_plan(engine, 'nudge_trial').plan == plan


def test_the_database_refuses_edits_and_deletes(engine, plan):
    register_plan(engine, plan, actor='Dr A')
    amend_plan(engine, 'nudge_trial', {'level': 90}, 'why', actor='Dr A')
    for stmt in ("UPDATE analysis_plans SET sha256 = 'x'", 'DELETE FROM analysis_plans',
                 "UPDATE plan_amendments SET reason = 'x'", 'DELETE FROM plan_amendments'):
        with pytest.raises(sa.exc.DatabaseError, match='append-only'):
            with engine.begin() as c: c.exec_driver_sql(stmt)
    assert counts(engine) == (1, 1, 2)


def test_a_plan_altered_behind_the_triggers_is_refused(engine, plan):
    register_plan(engine, plan, actor='Dr A')
    amend_plan(engine, 'nudge_trial', {'level': 90}, 'first', actor='Dr A')
    amend_plan(engine, 'nudge_trial', {'level': 80}, 'second', actor='Dr A')
    drop_triggers(engine, 'analysis_plans'); drop_triggers(engine, 'plan_amendments')
    with engine.begin() as c: original = c.execute(sa.select(analysis_plans.c.content)).scalar()
    forged = original.replace('"instrument":"arm"', '"instrument":"nudged"')
    assert forged != original
    with engine.begin() as c: c.execute(analysis_plans.update().values(content=forged))
    with pytest.raises(ImpactError, match="plan 'nudge_trial': its content does not match its registered hash"): get_plan(engine, 'nudge_trial')
    with engine.begin() as c: c.execute(analysis_plans.update().values(sha256=hashlib.sha256(forged.encode()).hexdigest()))
    with pytest.raises(ImpactError, match='not the one the audit log recorded at registration'): get_plan(engine, 'nudge_trial')
    with pytest.raises(ImpactError, match='nudge_trial'): list_plans(engine)
    with engine.begin() as c: c.execute(analysis_plans.update().values(content=original, sha256=plan_hash(plan)))
    assert get_plan(engine, 'nudge_trial').effective_parameters['level'] == 80.0           # restored, it reads again
    with engine.begin() as c: c.execute(plan_amendments.update().where(plan_amendments.c.seq == 1).values(changes='{"level":95.0}'))
    with pytest.raises(ImpactError, match='amendment 1 does not match its hash'): get_plan(engine, 'nudge_trial')
    with engine.begin() as c: c.execute(plan_amendments.update().where(plan_amendments.c.seq == 1).values(changes='{"level":90.0}'))
    with engine.begin() as c: c.execute(plan_amendments.delete().where(plan_amendments.c.seq == 2))
    with pytest.raises(ImpactError, match='audit log records amendments that are not in the store'): get_plan(engine, 'nudge_trial')


def test_a_refused_or_failed_amendment_writes_nothing(engine, plan):
    register_plan(engine, plan, actor='Dr A')
    before = counts(engine)
    for changes, reason, msg in [({'cutoff': 0.5}, 'why', "unknown parameter 'cutoff' for design 'iv'"),
                                 ({'covariates': 'age'}, 'why', 'covariates must be a list of column names'),
                                 ({'treatment': None}, 'why', "missing required parameter 'treatment'"),
                                 ({'covariates': ['age']}, 'why', 'changes nothing'),
                                 ({'level': 90}, '', 'needs a reason')]:
        with pytest.raises(ImpactError, match=msg): amend_plan(engine, 'nudge_trial', changes, reason, actor='Dr A')
    assert counts(engine) == before
    # a failure after the amendment row is written (here: the audit chain's end is missing) rolls the row back with it
    with engine.begin() as c: head = c.execute(sa.select(audit_head)).one(); c.execute(audit_head.delete())
    with pytest.raises(sa.exc.NoResultFound): amend_plan(engine, 'nudge_trial', {'level': 90}, 'why', actor='Dr A')
    with engine.begin() as c: c.execute(audit_head.insert().values(id=head.id, last_id=head.last_id, last_hash=head.last_hash))
    assert counts(engine) == before and get_plan(engine, 'nudge_trial').amendments == []
    with engine.connect() as c: assert verify_audit_chain(c).ok


def run_cde(monkeypatch, url: str, *args: str) -> tuple[int, str, str]:
    "`cde args` through `main()` (as the installed command runs it) against the store at `url`: exit status, stdout, stderr."
    from cde_workbench.cli import main
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv('CDE_DATABASE_URL', url)
    monkeypatch.setattr(sys, 'argv', ['cde', *args])
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as e: main()
    return e.value.code, out.getvalue(), err.getvalue()


def test_the_command_line(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'cde.sqlite'}"
    f = tmp_path / 'plan.toml'
    f.write_text(PLAN)
    code, out, _ = run_cde(monkeypatch, url, 'impact', 'plan', 'register', str(f), '--actor', 'Dr A')
    assert code == 0 and out.strip() == f'nudge_trial  sha256 {plan_hash(load_plan(f))}'
    code, out, _ = run_cde(monkeypatch, url, 'impact', 'plan', 'amend', 'nudge_trial', '--set', 'cov=cluster:ward', '--set', 'level=90',
                           '--set', 'categorical=["ward"]', '--reason', 'randomised by ward round')
    assert code == 0 and out.startswith('nudge_trial: amendment 1  sha256 ')
    code, out, _ = run_cde(monkeypatch, url, 'impact', 'plan', 'show', 'nudge_trial', '--json')
    shown = json.loads(out)
    assert code == 0 and shown['plan']['population'] == 'ICU stays within electrolyte range, randomised to a nudge'
    assert shown['effective_parameters'] == {'outcome': 'noaf', 'treatment': 'supplemented', 'instrument': 'arm', 'covariates': ['age'],
                                             'cov': 'cluster:ward', 'level': 90.0, 'categorical': ['ward']}
    assert [(a['seq'], a['reason']) for a in shown['amendments']] == [(1, 'randomised by ward round')]
    code, out, _ = run_cde(monkeypatch, url, 'impact', 'plan', 'show', 'nudge_trial')
    assert code == 0 and f"sha256 {shown['sha256']}" in out and 'reason: randomised by ward round' in out and 'level = 90.0' in out
    code, out, _ = run_cde(monkeypatch, url, 'impact', 'plan', 'list')
    assert code == 0 and out.splitlines()[1].split()[:3] == ['nudge_trial', 'iv', '1']
    # bad input: one line on stderr, exit status 2, nothing written
    f.write_text(PLAN.replace('estimand = "ITT of the nudge and CACE of supplementation"\n', ''))
    code, _, err = run_cde(monkeypatch, url, 'impact', 'plan', 'register', str(f))
    assert code == 2 and err.strip() == f"cde: error: {f}: missing required field 'estimand' (a plan states name, design, population, outcome, estimand, estimator, data and [parameters])"
    f.write_text(PLAN.replace('"age"', '"age", "sex"'))
    code, _, err = run_cde(monkeypatch, url, 'impact', 'plan', 'register', str(f))
    assert code == 2 and 'differs in parameters.covariates' in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cde(monkeypatch, url, 'impact', 'plan', 'amend', 'nudge_trial', '--set', 'level=high', '--reason', 'x')
    assert code == 2 and "level must be a number, got 'high'" in err
    code, _, err = run_cde(monkeypatch, url, 'impact', 'plan', 'show', 'other')
    assert code == 2 and "no registered plan 'other' (registered: nudge_trial)" in err
    assert counts(get_engine(url)) == (1, 1, 2)
    dispose_engines()


def test_a_store_plan_registers_and_reads_back(engine, tmp_path):
    "A plan on a deployment's own logged data (data = \"store:<deployment>\") is stored and read back as it was; a bad name is one line naming the file and the key."
    f = tmp_path / 'store_plan.toml'
    f.write_text(PLAN.replace('"trial.parquet"', '"store:noaf_risk"'))
    reg = register_plan(engine, load_plan(f), actor='Dr A')
    back = get_plan(engine, 'nudge_trial')
    assert back.sha256 == reg.sha256 == plan_hash(load_plan(f)) and store_deployment(back.plan) == 'noaf_risk'
    for bad, msg in [('store:../noaf', "data 'store:../noaf': the deployment after 'store:' '../noaf' must be a plain identifier"),
                     ('store:noaf risk', "data 'store:noaf risk': the deployment after 'store:' 'noaf risk' must be a plain identifier"),
                     ('store:other', "data reads deployment 'other''s store but the plan's deployment is 'noaf_risk'"),
                     ('trial.xlsx', "data 'trial.xlsx' must be a .csv or .parquet file, or store:<deployment>")]:
        f.write_text(PLAN.replace('"trial.parquet"', f'"{bad}"'))
        with pytest.raises(ImpactError, match='^' + re.escape(f'{f}: {msg}')) as e: load_plan(f)
        assert '\n' not in str(e.value)
    assert counts(engine) == (1, 0, 1)


def test_the_command_line_refuses_a_bad_store_name(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'cde.sqlite'}"
    f = tmp_path / 'plan.toml'
    f.write_text(PLAN.replace('"trial.parquet"', '"store:../noaf_risk"'))
    code, out, err = run_cde(monkeypatch, url, 'impact', 'plan', 'register', str(f))
    assert code == 2 and out == '' and err.strip() == (f"cde: error: {f}: data 'store:../noaf_risk': the deployment after 'store:' '../noaf_risk' "
                                                      "must be a plain identifier (ASCII letters, digits and _, not starting with a digit, at most 64 characters)")
    f.write_text(PLAN.replace('"trial.parquet"', '"store:noaf_risk"'))
    code, out, _ = run_cde(monkeypatch, url, 'impact', 'plan', 'register', str(f), '--actor', 'Dr A')
    assert code == 0 and out.strip() == f'nudge_trial  sha256 {plan_hash(load_plan(f))}'
    dispose_engines()
