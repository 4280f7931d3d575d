"""Shared fixtures: an isolated var/ and reports/ per test session, SQLite and a throwaway PostgreSQL store."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgserver import postgres_available, throwaway_postgres  # noqa: E402


SHARED = ROOT.parent / 'shared' / 'data'   # ../shared/data: public test data kept outside the repository


def in_ci() -> bool:
    "Whether the tests run under CI (env CI set and not empty/0/false), where a missing input is a failure, never a skip."
    return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')


def needs_shared(path: Path, what: str) -> None:
    """Call at module level: skip the module when `path` (under ../shared/data) is missing, or fail it when CI is set,
    so that CI cannot pass by silently skipping the tests on the public data."""
    if Path(path).exists(): return
    msg = f'{what} not found at {Path(path).resolve()} (../shared/data relative to the repository)'
    if in_ci(): pytest.fail(f'{msg}; CI is set, so this fails rather than skips', pytrace=False)
    pytest.skip(msg, allow_module_level=True)


@pytest.fixture(scope='session', autouse=True)
def isolated_var(tmp_path_factory):
    "Every test session writes under its own temporary var/ and reports/, never the checkout's."
    base = tmp_path_factory.mktemp('cde')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CDE_VAR', str(base / 'var')); mp.setenv('CDE_REPORTS', str(base / 'reports'))
        mp.delenv('CDE_DATABASE_URL', raising=False); mp.delenv('CDE_SITE_KEY_FILE', raising=False)
        yield base


@pytest.fixture(scope='session')
def pg_url():
    "A brand-new PostgreSQL server on 127.0.0.1 for the session (make test installs the binaries)."
    if not postgres_available():
        if os.environ.get('CDE_SKIP_POSTGRES') == '1' and not in_ci(): pytest.skip('PostgreSQL binaries not installed and CDE_SKIP_POSTGRES=1')
        pytest.fail('PostgreSQL server binaries are not installed: run `make test`, which installs them')
    with throwaway_postgres() as url:
        yield url


@pytest.fixture(params=['sqlite', 'postgresql'])
def store_url(request, tmp_path):
    "The store on each backend: a fresh SQLite file, or a fresh database on the session's PostgreSQL server."
    if request.param == 'sqlite':
        yield f'sqlite:///{tmp_path}/store.sqlite'
        return
    import sqlalchemy as sa
    base = request.getfixturevalue('pg_url')
    name = f'cde_{abs(hash(request.node.nodeid)) % 10**10}'
    admin = sa.create_engine(base, isolation_level='AUTOCOMMIT')
    with admin.connect() as c: c.execute(sa.text(f'CREATE DATABASE {name}'))
    yield base.rsplit('/', 1)[0] + f'/{name}'
    from cde_workbench.store import dispose_engines
    dispose_engines()
    with admin.connect() as c: c.execute(sa.text(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)'))
    admin.dispose()
