"""Bad input on the command line: one line naming the problem, exit status 2, no traceback, nothing written."""

import pytest

from conftest import ROOT, cde, one_line_error  # noqa: E402


def test_unknown_deployment():
    one_line_error(cde('train', 'no_such_model'), "unknown deployment 'no_such_model'", 'hgb_abnormal')


def test_missing_files(tmp_path):
    one_line_error(cde('ingest', 'warehouse', str(tmp_path / 'nowhere')), 'nowhere', 'not a folder')
    one_line_error(cde('ingest', 'file', str(tmp_path / 'feed.hl7')), 'feed.hl7', 'does not exist')


def test_malformed_hl7_messages_go_to_dead_letters(tmp_path):
    db = tmp_path / 'var'
    good = 'MSH|^~\\&|A|B|C|D|20240101000000+0000||ADT^A01|1|P|2.5\rEVN|A01|20240101000000+0000\rPID|1||M1||X^Y||19500101|F\rPV1|1|I|W||||||||||||||||E1'
    (tmp_path / 'feed.hl7').write_text(good + '\n' + 'PID|no header\n', newline='')
    r = cde('ingest', 'file', str(tmp_path / 'feed.hl7'), env={'CDE_VAR': str(db)})
    assert r.returncode == 0 and '1 stored' in r.stdout and '1 dead letter' in r.stdout, r.stdout + r.stderr
    import sqlalchemy as sa
    eng = sa.create_engine(f'sqlite:///{db}/cde.sqlite')
    with eng.connect() as c:
        assert c.execute(sa.text('select count(*) from ids_messages')).scalar() == 1
        assert 'MSH' in c.execute(sa.text('select reason from ids_dead_letters')).scalar()
        assert c.execute(sa.text('select count(*) from encounters')).scalar() == 1


@pytest.mark.parametrize('toml,needle', [
    ('name = "bad"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n', "missing required section 'split'"),
    ('name = "bad"\n[task\n', 'not valid TOML'),
    ('name = "bad"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\ncolour = 1\n[split]\ntrain_years = [2019]\nvalidation_years = [2020]\ntest_years = [2021]\n[output]\nmode = "silent"\nthreshold_rule = "flag_rate"\ntarget = 0.2\n', "[task]: unknown key(s) 'colour' for a lab_abnormal task"),
    ('name = "bad"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n[split]\ntrain_years = [2019]\nvalidation_years = [2020]\ntest_years = [2021]\n[output]\nmode = "silent"\nthreshold = 0.3\n', "[output] a hand-set threshold needs threshold_reason"),
    ('name = "bad"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n[split]\ntrain_years = [2019]\nvalidation_years = [2020]\ntest_years = [2021]\n[output]\nmode = "silent"\nthreshold_rule = "youden"\ntarget = 0.5\n', "[output] threshold_rule 'youden' unknown"),
    ('name = "bad"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n[split]\ntrain_years = [2019]\nvalidation_years = [2020]\ntest_years = [2021]\n[output]\nmode = "silent"\nthreshold = 0.3\nthreshold_reason = "x"\n[checks]\npoint_in_time_sample = 0\n', "[checks] point_in_time_sample must be a whole number"),
])
def test_malformed_deployment_toml(tmp_path, toml, needle):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'deployment.toml').write_text(toml)
    one_line_error(cde('train', 'bad', env={'CDE_DEPLOYMENTS': str(tmp_path)}), 'deployment.toml', needle)


def test_bad_options():
    one_line_error(cde('synth', '--patients', '3'), '--patients')
    one_line_error(cde('score', 'hgb_abnormal', '--as-of', 'yesterday'), '--as-of', 'not an ISO-8601')
    one_line_error(cde('score', 'hgb_abnormal', '--as-of', '2024-01-01T00:00:00'), 'no time zone')
    one_line_error(cde('no-such-command'), 'No such command')


def test_help_explains_every_step():
    r = cde('--help')
    assert r.returncode == 0
    for step in ('synth', 'train', 'score', 'labels', 'report', 'dashboard', 'demo', 'ingest', 'deploy'): assert step in r.stdout


def test_ingest_a_feed_then_replay_it_into_an_empty_store(tmp_path):
    from cde_workbench.synth import HospitalConfig, generate, write_hl7_feed
    write_hl7_feed(generate(HospitalConfig(n_patients=40, seed=9, late_rate=0.05, duplicate_rate=0.05, merge_rate=0.2)), tmp_path / 'feed.hl7')
    env = {'CDE_VAR': str(tmp_path / 'var')}
    r = cde('ingest', 'file', str(tmp_path / 'feed.hl7'), '--replay', env=env)
    assert r.returncode == 0 and 'stored' in r.stdout and '0 processing errors' in r.stdout, r.stdout + r.stderr
    target = f"sqlite:///{tmp_path / 'rebuilt.sqlite'}"
    r = cde('ingest', 'replay', target, env=env)
    assert r.returncode == 0 and 'rebuilt tables equal the live ones' in r.stdout, r.stdout + r.stderr
    one_line_error(cde('ingest', 'replay', target, env=env), 'not empty')


@pytest.mark.slow
def test_a_threshold_rule_no_training_data_meets(tmp_path):
    "Training stops with one line naming the rule, before the refit and before anything is registered."
    import shutil
    env = {'CDE_VAR': str(tmp_path / 'var'), 'CDE_DEPLOYMENTS': str(tmp_path / 'deps')}
    assert cde('synth', '--out', str(tmp_path / 's'), '--patients', '150', env=env).returncode == 0
    assert cde('ingest', 'warehouse', str(tmp_path / 's' / 'warehouse'), env=env).returncode == 0
    shutil.copytree(ROOT / 'deployments' / '_pipelines', tmp_path / 'deps' / '_pipelines')
    (tmp_path / 'deps' / 'tiny').mkdir()
    (tmp_path / 'deps' / 'tiny' / 'deployment.toml').write_text(
        'name = "tiny"\n[task]\nkind = "lab_abnormal"\ncomponent = "HGB"\n[split]\ntrain_years = [2019, 2020, 2021]\nvalidation_years = [2022]\n'
        'test_years = [2023]\n[model]\ncandidates = ["logistic_regression"]\n[output]\nmode = "silent"\nthreshold_rule = "flag_rate"\ntarget = 0.0001\n')
    one_line_error(cde('train', 'tiny', env=env), 'tiny: [output] threshold_rule: no threshold meets flag_rate ≤ 0.0001 on the')
    assert 'no registered model' in cde('models', 'show', 'tiny', env=env).stderr
