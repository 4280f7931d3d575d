"""MLLP live ingest: 4 concurrent senders against a real `cde ingest mllp --no-process` process.

Target (the issue): >= 2,000 messages/s with p99 ACK latency <= 50 ms with 4 concurrent senders
(about 100x a large hospital's average rate).

Set-up, all in this run and bounded (about 15 s on SQLite, about 12 s more when PostgreSQL's server
binaries are installed; `python benchmarks/mllp.py --no-postgres` skips it):
- messages: the synthetic hospital's prospective HL7 feed (`hl7_feed(generate(...))`, ORU/ADT,
  about 420 bytes each), sharded over 4 senders by patient (MRN), as an integration engine shards
  its outbound queues, so each patient's messages stay in order on one connection;
- each sender on its own TCP connection to 127.0.0.1, each with its own in-flight window:
  window 1 (send, wait for the ACK, send the next: what most integration engines do) and
  window 32 (pipelined; engines that pipeline keep a few dozen in flight). Both are reported;
- the receiver is a real `cde ingest mllp --no-process` subprocess with its own temporary CDE_VAR
  (SQLite, WAL, synchronous=FULL: every ACK is after an fsync'd commit), a fresh store per run;
- each run sends for a fixed time (`seconds`), then stops sending and waits for the ACKs in flight;
  every message must be answered AA, or the benchmark fails;
- latency: from writing the frame to reading its whole ACK frame, per message; p99 over the run.
  The senders run in this process on one asyncio loop, with its startup objects frozen out of the
  garbage collector (else its own full collections, 50 ms each, show up as ACK latency).

Baseline (same run, same machine, same messages): `store_messages` called with one message per
transaction (no group commit, no network) on a fresh store: the rate a receiver that commits each
message on its own could reach at best, and the p99 of that single commit. That is the design's
effect being measured: group commit across connections (the ratio for throughput), and what
queueing behind the group commit plus the network round trip cost in latency (for latency the
ratio is baseline / value, so below 1 means the ACK takes longer than a bare single commit).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

from cde_workbench.demo import mllp_receiver

import numpy as np

SENDERS = 4
WINDOWS = (1, 32)


def _feed(n_patients: int) -> list[bytes]:
    from cde_workbench.synth import HospitalConfig, generate, hl7_feed
    return [m.encode() for _, m in hl7_feed(generate(HospitalConfig(n_patients=n_patients)))]


def _shard(msgs: list[bytes], k: int) -> list[list[bytes]]:
    "Split by patient (PID-3), keeping each patient's messages in order on one sender."
    out = [[] for _ in range(k)]
    for m in msgs:
        i = m.find(b'\rPID|')
        mrn = m[i:m.find(b'\r', i + 1)].split(b'|')[3].split(b'^')[0] if i >= 0 else b''
        out[zlib.crc32(mrn) % k].append(m)
    return out


async def _sender(port: int, msgs: list[bytes], window: int, stop_at: float, ack_timeout: float = 10.0):
    "Send on one connection, up to `window` in flight, until `stop_at` (or the messages run out); wait for the rest."
    from cde_workbench.mllp import FrameReader, frame
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    frames, lat, codes = FrameReader(), [], {}
    sent_at: list[float] = []
    nxt = got = 0
    try:
        while got < nxt or (nxt < len(msgs) and time.perf_counter() < stop_at):
            while nxt < len(msgs) and nxt - got < window and time.perf_counter() < stop_at:
                writer.write(frame(msgs[nxt])); sent_at.append(time.perf_counter()); nxt += 1
            await writer.drain()
            data = await asyncio.wait_for(reader.read(1 << 16), ack_timeout)
            if not data: raise ConnectionError('receiver closed the connection')
            for f in frames.feed(data):
                t = time.perf_counter()
                i = f.find(b'\rMSA|')
                code = f[i + 5:i + 7].decode() if i >= 0 else '?'
                codes[code] = codes.get(code, 0) + 1
                lat.append(t - sent_at[got]); got += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception): await writer.wait_closed()
    return lat, codes


def _load(port: int, shards: list[list[bytes]], window: int, seconds: float) -> dict:
    async def main():
        t0 = time.perf_counter()
        res = await asyncio.wait_for(asyncio.gather(*(_sender(port, s, window, t0 + seconds) for s in shards)), seconds + 60)
        return res, time.perf_counter() - t0
    gc.collect(); gc.freeze()   # the load generator's own full collections (50 ms over the feed and libraries) are not the receiver's latency
    try: res, wall = asyncio.run(main())
    finally: gc.unfreeze()
    lat = np.concatenate([np.asarray(l) for l, _ in res]) * 1000
    codes: dict = {}
    for _, c in res:
        for k, v in c.items(): codes[k] = codes.get(k, 0) + v
    if set(codes) != {'AA'}: raise RuntimeError(f'not every message was accepted: {codes}')
    return dict(n=len(lat), wall=wall, rate=len(lat) / wall, p50=float(np.percentile(lat, 50)), p99=float(np.percentile(lat, 99)))


def _one_per_transaction(url: str, msgs: list[bytes], max_n: int = 3000, seconds: float = 3.0) -> dict:
    "The baseline: store_messages with one message per transaction, bounded in count and time."
    from cde_workbench.ids import store_messages
    from cde_workbench.store import get_engine
    eng = get_engine(url)
    lat = []
    t0 = time.perf_counter()
    for m in msgs[:max_n]:
        t = time.perf_counter()
        assert store_messages(eng, [(m, datetime.now(timezone.utc), 'bench')])[0].status == 'stored'
        lat.append(time.perf_counter() - t)
        if t - t0 > seconds: break
    wall = time.perf_counter() - t0
    lat = np.asarray(lat) * 1000
    return dict(n=len(lat), rate=len(lat) / wall, p99=float(np.percentile(lat, 99)))


def _figures(db: str, runs: dict, base: dict, note: str) -> dict:
    out = {}
    for w, r in runs.items():
        tag = f'mllp_{db}_4senders_window{w}'
        common = f"{db}, {SENDERS} senders x window {w} ({SENDERS * w} in flight), {r['n']:,} msgs in {r['wall']:.1f} s; {note}"
        out[f'{tag}_msgs_per_s'] = {'value': round(r['rate']), 'unit': 'msg/s', 'baseline': round(base['rate']),
                                    'ratio': round(r['rate'] / base['rate'], 2),
                                    'note': f"{common}; baseline: store_messages one message per transaction; target >= 2,000"}
        out[f'{tag}_p99_ack_ms'] = {'value': round(r['p99'], 2), 'unit': 'ms', 'baseline': round(base['p99'], 2),
                                    'ratio': round(base['p99'] / r['p99'], 2),
                                    'note': f"{common}; p50 {r['p50']:.2f} ms; send to ACK; baseline: p99 of one single-message commit; target <= 50"}
    return out


def _bench_db(db: str, url: str | None, msgs: list[bytes], shards, seconds: float, d: str, note: str) -> dict:
    from cde_workbench.store import dispose_engines
    runs = {}
    for w in WINDOWS:
        var = Path(d) / f'{db}-w{w}'
        var.mkdir()
        env = {**os.environ, 'CDE_VAR': str(var), 'CDE_SITE_KEY_FILE': str(Path(d) / 'site.key'),
               'CDE_DATABASE_URL': url or f'sqlite:///{var}/cde.sqlite'}
        if url:   # a fresh database per run: PostgreSQL's throwaway server, emptied
            _reset_pg(url)
        with mllp_receiver(env=env) as port:
            runs[w] = _load(port, shards, w, seconds)
    if url: _reset_pg(url)
    base = _one_per_transaction(url or f"sqlite:///{Path(d) / f'{db}-base.sqlite'}", msgs)
    dispose_engines()
    return _figures(db, runs, base, note)


def _reset_pg(url: str):
    import sqlalchemy as sa
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.execute(sa.text('drop schema public cascade')); c.execute(sa.text('create schema public'))
    eng.dispose()


def bench_mllp(n_patients: int = 8000, seconds: float = 4.0, postgres: bool = True) -> dict:
    msgs = _feed(n_patients)
    shards = _shard(msgs, SENDERS)
    figs = {}
    with tempfile.TemporaryDirectory() as d:
        figs.update(_bench_db('sqlite', None, msgs, shards, seconds, d, 'WAL, synchronous=FULL'))
        if postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.pgserver import postgres_available, throwaway_postgres
            if postgres_available():
                # durable: an ACK means the commit reached the disk, as on a production server
                with throwaway_postgres(durable=True) as url:
                    figs.update(_bench_db('postgres', url, msgs, shards, seconds, d,
                                          'throwaway server with fsync and synchronous_commit on'))
    return figs


if __name__ == '__main__':
    t = time.perf_counter()
    for k, v in bench_mllp(postgres='--no-postgres' not in sys.argv).items():
        print(f"{k:44s} {v['value']:>9} {v['unit']:5s} baseline {v['baseline']:>8} ratio {v['ratio']:>6}  [{v['note']}]")
    print(f'{time.perf_counter() - t:.1f} s')
