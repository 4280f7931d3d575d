"""`make demo-postgres` (scripts/demo-postgres.py): SIGTERM or Ctrl-C while the demo runs stops the demo, then the
throwaway PostgreSQL server; nothing is left listening. (The whole demo on PostgreSQL is `make demo-postgres` itself.)"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgserver import postgres_available

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_demo_and_server(sig, tmp_path):
    if not postgres_available(): pytest.skip('PostgreSQL server binaries not installed')
    log = tmp_path / 'out.log'
    with open(log, 'w') as f:
        p = subprocess.Popen([sys.executable, str(ROOT / 'scripts' / 'demo-postgres.py'), '--patients', '300'], stdout=f, stderr=subprocess.STDOUT,
                             cwd=ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while '1/7' not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        port = int(re.search(r'127\.0\.0\.1:(\d+)/', log.read_text())[1])
        p.send_signal(sig)
        assert p.wait(180) == 130, log.read_text()
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert 'server stopped' in log.read_text()
    with socket.socket() as s:
        assert s.connect_ex(('127.0.0.1', port)) != 0, 'the throwaway PostgreSQL is still listening'
