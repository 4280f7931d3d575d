"""Replay rebuild: the derived tables rebuilt from the immutable data store into an empty SQLite store.

Target (issue 3): >= 20,000 messages/s end to end (parse -> derived tables), printed with the ratio to
python-hl7's parse-only rate on the same messages, measured in the same run.
"""
from __future__ import annotations

import tempfile
import time
from datetime import timedelta
from pathlib import Path


def bench_replay(n_messages: int = 200_000) -> dict:
    import hl7
    from cde_workbench.ids import store_messages
    from cde_workbench.pseudonyms import site_key
    from cde_workbench.rebuild import replay
    from cde_workbench.store import dispose_engines, get_engine
    from cde_workbench.synth import HospitalConfig, generate, hl7_feed
    with tempfile.TemporaryDirectory() as d:
        key = site_key(Path(d) / 'site.key')
        patients = max(300, int(n_messages / 8.4))   # about 8.4 messages per patient over 21 months
        feed = hl7_feed(generate(HospitalConfig(n_patients=patients, start='2022-01-01', cutover='2022-07-01', end='2024-04-01')))[:n_messages]
        src = get_engine(f'sqlite:///{d}/src.sqlite')
        for i in range(0, len(feed), 20_000):
            store_messages(src, [(m, t + timedelta(seconds=30), 'bench') for t, m in feed[i:i + 20_000]])
        dst = get_engine(f'sqlite:///{d}/dst.sqlite')
        t0 = time.perf_counter(); s = replay(src, dst, batch=20_000, key=key); t_replay = time.perf_counter() - t0
        assert s.messages == len(feed) and s.errors == 0
        sample = [m for _, m in feed[:20_000]]
        t0 = time.perf_counter()
        for m in sample: hl7.parse(m)
        t_py = time.perf_counter() - t0
        dispose_engines()
    rate, base = len(feed) / t_replay, len(sample) / t_py
    return {'replay_rebuild_msgs_per_s': {'value': round(rate), 'unit': 'msg/s', 'baseline': round(base), 'ratio': round(rate / base, 2),
                                          'note': f'{len(feed):,} messages, SQLite, parse -> facts -> current state; baseline: python-hl7 parse only; target >= 20,000'}}


if __name__ == '__main__':
    print(bench_replay())
