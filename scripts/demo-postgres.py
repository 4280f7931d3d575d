"""`make demo-postgres`: `cde demo`, unchanged, against a throwaway PostgreSQL on 127.0.0.1.

A brand-new server (tests/pgserver.py: initdb in a temporary folder, as the `postgres` OS user when run as root,
listening on 127.0.0.1 only) holds the store; `cde demo` runs against it through `CDE_DATABASE_URL`, its `var/` and
reports in `var/demo-postgres/` so the embedded demo's files are left alone. The server is stopped and its files deleted
when the demo ends, fails, or this script gets SIGTERM or Ctrl-C (the demo is stopped first: its own handler ends its
kernels and workers). Prints the wall time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
from pgserver import PostgresNotAvailable, throwaway_postgres  # noqa: E402


class Stopped(Exception):
    "SIGTERM or SIGINT arrived."


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    cde = str(Path(sys.executable).with_name('cde'))
    home = ROOT / 'var' / 'demo-postgres'
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    child = None
    try:
        with throwaway_postgres('cde_demo') as url:
            print(f'demo-postgres: throwaway PostgreSQL at {url}', flush=True)
            env = {**os.environ, 'CDE_DATABASE_URL': url, 'CDE_VAR': str(home / 'var'), 'CDE_REPORTS': str(home / 'reports'),
                   'CDE_DEPLOYMENTS': str(ROOT / 'deployments')}
            try:
                child = subprocess.Popen([cde, 'demo', *argv], env=env, cwd=ROOT, start_new_session=True)
                code = child.wait()
            except Stopped as e:
                print(f'demo-postgres: {e}: stopping the demo, then the server', file=sys.stderr, flush=True)
                if child is not None and child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                    try: child.wait(120)
                    except subprocess.TimeoutExpired:
                        os.killpg(child.pid, signal.SIGKILL); child.wait()
                code = 130
    except PostgresNotAvailable as e:
        print(f'demo-postgres: {e}', file=sys.stderr); return 2
    except Stopped as e:
        print(f'demo-postgres: {e} while the server started: stopped', file=sys.stderr); code = 130
    print(f'demo-postgres: {"finished" if code == 0 else f"ended with exit code {code}"} in {time.perf_counter() - t0:.0f} s wall time; server stopped', flush=True)
    return code


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
