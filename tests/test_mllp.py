"""The MLLP receiver as a real server on 127.0.0.1: framing, concurrency, acknowledgement modes, store
failures, fuzzing, and SIGKILL at random moments with the sender resending what was not acknowledged."""
import asyncio
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from cde_workbench.events import process_pending, table_checksums
from cde_workbench.hl7 import parse_message
from cde_workbench.ids import store_messages
from cde_workbench.mllp import END, START, FrameReader, MLLPReceiver, frame, send_messages
from cde_workbench.pseudonyms import patient_key, site_key
from cde_workbench.store import dispose_engines, get_engine
from cde_workbench.synth import HospitalConfig, generate, hl7_feed

ROOT = Path(__file__).resolve().parent.parent
CDE = str(Path(sys.executable).parent / 'cde')


def msg(cid, extra='', mode=''):
    m15 = f'|||{mode}|NE' if mode else ''
    return f'MSH|^~\\&|LAB|HOSP|CDE|WARD|20240101120000+0000||ADT^A01^ADT_A01|{cid}|P|2.5{m15}\rEVN|A01|20240101120000+0000\rPID|1||M{cid}||Doe^Jo||19600101|F\rPV1|1|I|MED1||||||||||||||||E{cid}{extra}'


@pytest.fixture
def engine(tmp_path):
    eng = get_engine(f'sqlite:///{tmp_path}/mllp.sqlite')
    yield eng
    dispose_engines()


def run(coro_fn, engine, **kw):
    "Start a receiver on a free port, run `coro_fn(port, receiver)`, stop the receiver."
    async def main():
        rx = MLLPReceiver(engine, port=0, **kw)
        port = await rx.start()
        try: return await asyncio.wait_for(coro_fn(port, rx), 120)
        finally: await rx.close()
    return asyncio.run(main())


def count(engine, table):
    with engine.connect() as c: return c.execute(sa.text(f'select count(*) from {table}')).scalar()


def test_framing_survives_any_split_and_junk():
    rng = random.Random(5)
    for _ in range(200):
        msgs = [f'MSH|^~\\&|A|B|C|D|2024||ADT^A01|{i}|P|2.5\rPID|{"x" * rng.randint(0, 300)}'.encode() for i in range(rng.randint(1, 8))]
        stream = b''.join(rng.choice([b'', b'\r\n', b'junk']) + frame(m) for m in msgs)
        r, got, i = FrameReader(), [], 0
        while i < len(stream):
            n = rng.randint(1, 40); got += r.feed(stream[i:i + n]); i += n
        assert got == msgs


def test_concurrent_connections_every_message_once(engine, tmp_path, monkeypatch):
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    async def go(port, rx):
        batches = [[msg(f'{c}-{i}') for i in range(150)] for c in range(8)]
        res = await asyncio.gather(*(send_messages(b, port=port, window=rng) for b, rng in zip(batches, (1, 4, 16, 64, 1, 8, 32, 2))))
        return res, rx.stats
    res, stats = run(go, engine)
    assert all(r.acks == {i: 'AA' for i in range(150)} for r in res)
    assert count(engine, 'ids_messages') == 1200 and count(engine, 'ids_receipts') == 1200
    assert stats.commits < 1200   # commits were grouped across connections


def test_after_commit_keeps_the_clinical_tables_up_to_date_behind_the_store(engine):
    "The receiver only stores; the caller's `after_commit` (here the event processor, as `cde ingest mllp` wires it) derives."
    key = bytes(range(32))
    async def go(port, rx):
        res = await send_messages([msg(f'ac{i}') for i in range(20)], port=port, window=4)
        for _ in range(200):   # processing runs behind the ACKs: wait for it
            if count(engine, 'encounters') == 20: break
            await asyncio.sleep(0.05)
        return res
    res = run(go, engine, after_commit=functools.partial(process_pending, engine, 200, key=key), after_commit_every=0.01)
    assert res.acks == {i: 'AA' for i in range(20)}
    assert count(engine, 'encounters') == 20 and count(engine, 'ids_messages') == 20
    with engine.connect() as c:
        assert c.execute(sa.text('select last_seq from processor_state')).scalar() == 20
        assert c.execute(sa.text("select patient_key from patient_identity where mrn = 'Mac0'")).scalar() == patient_key('Mac0', key)
    assert run(lambda port, rx: send_messages([msg('x1')], port=port), engine).acks == {0: 'AA'}   # without it: stored, not derived
    assert count(engine, 'ids_messages') == 21 and count(engine, 'encounters') == 20


def test_ack_echoes_control_id_and_swaps_sender_and_receiver(engine):
    async def go(port, rx):
        r, w = await asyncio.open_connection('127.0.0.1', port)
        w.write(frame(msg('XYZ-1'))); await w.drain()
        data = await asyncio.wait_for(r.readuntil(END), 10); w.close()
        return data
    data = run(go, engine)
    assert data.startswith(START)
    ack = parse_message(data[1:-2])
    assert ack.message_type == 'ACK^A01' and ack.field('MSA', 1) == 'AA' and ack.field('MSA', 2) == 'XYZ-1'
    assert [ack.field('MSH', n) for n in (3, 4, 5, 6)] == ['CDE', 'WARD', 'LAB', 'HOSP']


def test_duplicates_conflicts_and_garbage(engine):
    async def go(port, rx):
        return await send_messages([msg('D1'), msg('D1'), msg('D1', extra='\rNTE|1||changed'), b'\x00\x01not hl7'], port=port, window=4)
    r = run(go, engine)
    assert r.acks == {0: 'AA', 1: 'AA', 2: 'AA', 3: 'AR'} and 'MSH' in r.texts[3]
    assert count(engine, 'ids_messages') == 2 and count(engine, 'ids_receipts') == 3 and count(engine, 'ids_dead_letters') == 1
    with engine.connect() as c: assert c.execute(sa.text('select conflict from ids_messages order by seq')).scalars().all() == [0, 1]


def test_enhanced_mode_sends_accept_acks_as_msh15_asks(engine):
    async def go(port, rx):
        r, w = await asyncio.open_connection('127.0.0.1', port)
        for m in (msg('E1', mode='NE'), msg('E2', mode='ER'), msg('E3', mode='SU'), msg('E4', mode='AL')):
            w.write(frame(m))
        await w.drain()
        acks = []
        while len(acks) < 2:
            acks.append(parse_message((await asyncio.wait_for(r.readuntil(END), 10))[1:-2]))
        with pytest.raises(asyncio.TimeoutError): await asyncio.wait_for(r.readuntil(END), 0.5)   # nothing more comes
        w.close()
        return [(a.field('MSA', 1), a.field('MSA', 2)) for a in acks]
    assert run(go, engine) == [('CA', 'E3'), ('CA', 'E4')]
    assert count(engine, 'ids_messages') == 4   # all stored, whatever was acknowledged


def test_a_store_failure_is_answered_ae_and_the_resend_is_stored_once(engine):
    with engine.begin() as c:
        c.execute(sa.text("CREATE TRIGGER full BEFORE INSERT ON ids_receipts BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"))
    async def go(port, rx):
        first = await send_messages([msg('F1'), msg('F2', mode='AL')], port=port, window=2)
        with engine.begin() as c: c.execute(sa.text('DROP TRIGGER full'))
        again = await send_messages([msg('F1'), msg('F2', mode='AL')], port=port, window=2)
        return first, again
    first, again = run(go, engine)
    assert first.acks == {0: 'AE', 1: 'CE'} and 'disk is full' in first.texts[0]
    assert again.acks == {0: 'AA', 1: 'CA'} and count(engine, 'ids_messages') == 2


def test_fuzzed_frames_never_stop_the_receiver(engine):
    rng = random.Random(11)
    good = msg('G1').encode()
    async def go(port, rx):
        deadline = time.monotonic() + 15
        for _ in range(60):   # bounded in count and time
            if time.monotonic() > deadline: break
            r, w = await asyncio.open_connection('127.0.0.1', port)
            blob = bytearray(good)
            for _ in range(rng.randint(1, 20)):
                op = rng.random()
                i = rng.randrange(len(blob))
                if op < 0.4: blob[i] = rng.randrange(256)
                elif op < 0.7: del blob[i:i + rng.randint(1, 30)]
                else: blob[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 10)))
            w.write(rng.choice([b'', START, b'\x1c\r', os.urandom(5)]) + frame(bytes(blob)) + rng.choice([b'', START, os.urandom(3)]))
            await w.drain(); w.close()
        res = await send_messages([good], port=port)
        return res
    assert run(go, engine).acks == {0: 'AA'}


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


# a system test: `make soak` (CDE_SOAK=1) runs it at full size; with CDE_SOAK unset (a run by hand) it is shorter, with the same faults
SOAK = os.environ.get('CDE_SOAK') == '1'
N_MESSAGES, N_KILLS, N_PATIENTS = (20_000, 5, 3800) if SOAK else (5_000, 3, 1000)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path, monkeypatch):
    "20,000 messages (5,000 in make test); the receiver is SIGKILLed five times (three) and restarted; the sender resends whatever was not acknowledged."
    feed = [m for _, m in hl7_feed(generate(HospitalConfig(n_patients=N_PATIENTS, start='2022-01-01', cutover='2023-10-01', end='2024-04-01')))]
    feed = feed[:N_MESSAGES]
    assert len(feed) == N_MESSAGES
    env = {**os.environ, 'CDE_VAR': str(tmp_path / 'var'), 'CDE_SITE_KEY_FILE': str(tmp_path / 'site.key')}
    env.pop('CDE_DATABASE_URL', None)
    port = _free_port()
    def start():
        p = subprocess.Popen([CDE, 'ingest', 'mllp', '--port', str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(('127.0.0.1', port), timeout=0.5): return p
            except OSError: time.sleep(0.1)
            assert p.poll() is None, p.stdout.read().decode()[-2000:]
        raise AssertionError('receiver did not start')
    rng = random.Random(2024)
    acked = [False] * len(feed)
    kills, proc = 0, start()
    t_end = time.monotonic() + 600
    kill_at = sorted(rng.sample(range(N_MESSAGES // 20, N_MESSAGES - N_MESSAGES // 20), N_KILLS))
    async def sender():
        nonlocal kills, proc
        while not all(acked) and time.monotonic() < t_end:
            todo = [i for i, a in enumerate(acked) if not a]
            try:
                reader, writer = await asyncio.open_connection('127.0.0.1', port)
            except OSError:
                await asyncio.sleep(0.2); continue
            frames, inflight, pos = FrameReader(), [], 0
            try:
                while pos < len(todo) or inflight:
                    while pos < len(todo) and len(inflight) < 32:
                        writer.write(frame(feed[todo[pos]])); inflight.append(todo[pos]); pos += 1
                    await writer.drain()
                    if kills < N_KILLS and sum(acked) >= kill_at[kills]:
                        proc.send_signal(signal.SIGKILL); proc.wait(); kills += 1
                        proc = start()
                        raise ConnectionError('killed')
                    data = await asyncio.wait_for(reader.read(1 << 16), 20)
                    if not data: raise ConnectionError('closed')
                    for f in frames.feed(data):
                        i = inflight.pop(0)
                        assert parse_message(f).field('MSA', 1) == 'AA'
                        acked[i] = True
            except (ConnectionError, OSError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()
    try:
        asyncio.run(sender())
    finally:
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()
    assert kills == N_KILLS and all(acked)
    key = site_key(Path(env['CDE_SITE_KEY_FILE']))   # the receiver's key: finish its processing with it
    live = get_engine(f"sqlite:///{tmp_path / 'var' / 'cde.sqlite'}")
    process_pending(live, key=key)
    with live.connect() as c:
        assert c.execute(sa.text('select count(*), count(distinct sha256) from ids_messages')).one() == (N_MESSAGES, N_MESSAGES)
        assert c.execute(sa.text('select count(*) from ids_receipts')).scalar() >= N_MESSAGES
    calm = get_engine(f"sqlite:///{tmp_path / 'calm.sqlite'}")
    try:
        store_messages(calm, [(m, datetime.now(timezone.utc), 'calm') for m in feed])
        process_pending(calm, key=key)
        ignore = ('id', 'at', 'seq', 'stored_time')
        assert table_checksums(live, ignore=ignore) == table_checksums(calm, ignore=ignore)
    finally:
        dispose_engines()


# ---- limits at the door: connections, bytes buffered, idle and slow connections (bounded in count and time, 127.0.0.1)

async def closed_within(reader, seconds):
    "True when the server closes the connection within `seconds` (EOF or reset), reading and discarding what comes."
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16): pass
        return True
    except ConnectionError: return True
    except TimeoutError: return False


def test_a_connection_over_the_cap_is_closed_at_once_and_counted(engine):
    async def go(port, rx):
        conns = [await asyncio.open_connection('127.0.0.1', port) for _ in range(3)]
        for i, (r, w) in enumerate(conns):   # each is served: the cap counts them
            w.write(frame(msg(f'cap{i}'))); await w.drain()
            assert parse_message((await asyncio.wait_for(r.readuntil(END), 10))[1:-2]).field('MSA', 1) == 'AA'
        r4, w4 = await asyncio.open_connection('127.0.0.1', port)
        w4.write(frame(msg('cap-over')))
        refused = await closed_within(r4, 5)
        conns[0][1].close(); await conns[0][1].wait_closed()
        for _ in range(100):   # the server notices the close
            if len(rx._conns) < 3: break
            await asyncio.sleep(0.02)
        after = await send_messages([msg('cap-after')], port=port)
        for _, w in conns[1:]: w.close()
        w4.close()
        return refused, after, rx.stats
    refused, after, stats = run(go, engine, max_connections=3)
    assert refused and stats.refused_connections == 1 and after.acks == {0: 'AA'}
    with engine.connect() as c:   # nothing from the refused connection
        assert c.execute(sa.text("select count(*) from ids_messages where control_id = 'cap-over'")).scalar() == 0
    assert count(engine, 'ids_messages') == 4


def test_fifty_unfinished_frames_hold_bounded_memory_and_are_closed(engine):
    "Fifty connections each send 200 KB of a frame and stop: the total held stays under the cap, and every one is closed."
    cap = 4 << 20
    async def go(port, rx):
        conns = []
        for i in range(50):
            r, w = await asyncio.open_connection('127.0.0.1', port)
            w.write(START + msg(f'u{i}').encode() + b'x' * 200_000)
            conns.append((r, w))
        t0 = time.monotonic()
        closed = await asyncio.gather(*(closed_within(r, 10) for r, _ in conns))
        took = time.monotonic() - t0
        for _, w in conns: w.close()
        after = await send_messages([msg('u-after')], port=port)
        return closed, took, after, rx
    closed, took, after, rx = run(go, engine, max_buffered=cap, frame_timeout=1.0, idle_timeout=30)
    assert all(closed) and took < 8, took
    s = rx.stats
    assert s.dropped_connections > 0 and s.dropped_connections + s.slow_closed == 50, s
    assert 0 < s.peak_buffered <= cap and rx._buffered == 0, s
    assert after.acks == {0: 'AA'} and count(engine, 'ids_messages') == 1 and count(engine, 'ids_dead_letters') == 0


def test_the_connection_that_would_go_over_the_buffer_cap_is_dropped_and_nothing_of_it_stored(engine):
    big = msg('big', extra='\rNTE|1||' + 'y' * 160_000)
    async def go(port, rx):
        ra, wa = await asyncio.open_connection('127.0.0.1', port)
        wa.write(START + b'z' * 150_000); await wa.drain()   # holds 150 KB of an unfinished frame
        for _ in range(100):
            if rx.stats.peak_buffered >= 150_000: break
            await asyncio.sleep(0.02)
        rb, wb = await asyncio.open_connection('127.0.0.1', port)
        wb.write(frame(big)); await wb.drain()   # a frame within max_frame, but 150 KB + 160 KB > the 300 KB cap
        dropped = await closed_within(rb, 5)
        wa.close(); await wa.wait_closed()
        for _ in range(100):
            if rx._buffered == 0: break
            await asyncio.sleep(0.02)
        again = await send_messages([big], port=port)   # with room, the same message is stored
        return dropped, again, rx.stats
    dropped, again, stats = run(go, engine, max_frame=200_000, max_buffered=300_000)
    assert dropped and stats.dropped_connections == 1 and again.acks == {0: 'AA'}
    assert count(engine, 'ids_messages') == 1 and count(engine, 'ids_receipts') == 1   # stored once: from the resend


def test_idle_and_slow_loris_connections_are_closed(engine):
    async def go(port, rx):
        # idle: a message, its ACK, then nothing
        r1, w1 = await asyncio.open_connection('127.0.0.1', port)
        w1.write(frame(msg('i1'))); await w1.drain()
        await asyncio.wait_for(r1.readuntil(END), 10)
        idle_closed = await closed_within(r1, 3)
        # busy: a message every 0.2 s for 1.2 s is never idle for 0.5 s
        busy = await send_messages([msg('b1')], port=port)
        r2, w2 = await asyncio.open_connection('127.0.0.1', port)
        for i in range(6):
            w2.write(frame(msg(f'busy{i}'))); await w2.drain()
            await asyncio.wait_for(r2.readuntil(END), 10)
            await asyncio.sleep(0.2)
        w2.close()
        # slow loris: a frame trickling in a byte every 0.1 s, never finished
        r3, w3 = await asyncio.open_connection('127.0.0.1', port)
        w3.write(START + b'MSH|'); t0 = time.monotonic()
        loris_closed = False
        while time.monotonic() - t0 < 5:
            try: w3.write(b'x'); await w3.drain()
            except ConnectionError: loris_closed = True; break
            if r3.at_eof() or await closed_within(r3, 0.1): loris_closed = True; break
        took = time.monotonic() - t0
        w1.close(); w3.close()
        return idle_closed, busy, loris_closed, took, rx.stats
    idle_closed, busy, loris_closed, took, stats = run(go, engine, idle_timeout=0.5, frame_timeout=1.0)
    assert idle_closed and busy.acks == {0: 'AA'} and stats.idle_closed >= 1
    assert loris_closed and 0.9 < took < 3, took
    assert stats.slow_closed == 1 and count(engine, 'ids_messages') == 8 and count(engine, 'ids_dead_letters') == 0


def test_limits_are_cde_ingest_mllp_options(tmp_path):
    from conftest import cde, one_line_error
    env = {'CDE_VAR': str(tmp_path / 'var')}
    one_line_error(cde('ingest', 'mllp', '--max-connections', '0', env=env), '--max-connections')
    one_line_error(cde('ingest', 'mllp', '--max-buffered', '1000', '--port', '0', env=env), '--max-buffered')
    one_line_error(cde('ingest', 'mllp', '--max-buffered', str(1 << 20), '--port', '0', env=env), '--max-buffered 1048576 is too small', '--max-frame + 65536 = 1114112')
    r = cde('ingest', 'mllp', '--help')
    for opt in ('--max-connections', '--max-buffered', '--idle-timeout', '--frame-timeout'): assert opt in r.stdout, r.stdout
