"""HL7 batch files (FHS/BHS … BTS/FTS): split into their messages, each stored and processed on its own, counts checked
against BTS-1/FTS-1, all or nothing; from `cde ingest file` and over MLLP (answered by a response batch)."""
import asyncio

import pytest
import sqlalchemy as sa

from conftest import SHARED, cde, in_ci, one_line_error  # noqa: E402
from cde_workbench.hl7 import parse_batch
from cde_workbench.mllp import END, MLLPReceiver, frame, send_messages
from cde_workbench.store import dispose_engines, get_engine


def msg(cid, mode=''):
    m15 = f'|||{mode}|NE' if mode else ''
    return (f'MSH|^~\\&|LAB|HOSP|CDE|WARD|20240101120000+0000||ADT^A01^ADT_A01|{cid}|P|2.5{m15}\rEVN|A01|20240101120000+0000\r'
            f'PID|1||M{cid}||Doe^Jo||19600101|F\rPV1|1|I|MED1||||||||||||||||E{cid}')


def batch(cids, count=None, bid='B1', mode=''):
    "One BHS … BTS batch of messages; BTS-1 is `count` (default: right)."
    return '\r'.join([f'BHS|^~\\&|LAB|HOSP|CDE|WARD|20240101120000+0000||||{bid}', *(msg(c, mode) for c in cids),
                      f'BTS|{len(cids) if count is None else count}'])


def hl7_file(batches, count=None):
    return '\r'.join(['FHS|^~\\&|LAB|HOSP|CDE|WARD|20240101120000+0000||||F1', *batches, f'FTS|{len(batches) if count is None else count}'])


def counts(db, *tables):
    eng = sa.create_engine(f'sqlite:///{db}/cde.sqlite')
    try:
        with eng.connect() as c: return [c.execute(sa.text(f'select count(*) from {t}')).scalar() for t in tables]
    finally: eng.dispose()


# ---- cde ingest file

def test_a_batch_file_is_split_stored_and_processed_and_plain_files_still_work(tmp_path):
    env = {'CDE_VAR': str(tmp_path / 'var')}
    f = tmp_path / 'adt.hl7'   # segments on their own lines, as batch files are usually written
    f.write_text(hl7_file([batch(['a1', 'a2', 'a3']), batch(['a4', 'a5'], bid='B2')]).replace('\r', '\r\n'), newline='')
    r = cde('ingest', 'file', str(f), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == ('5 messages in 2 batches, counts match; 5 stored, 0 duplicate, 0 conflict, 0 dead letter; '
                                '5 processed, 0 processing errors'), r.stdout
    assert counts(tmp_path / 'var', 'ids_messages', 'encounters', 'ids_dead_letters') == [5, 5, 0]
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'var'}/cde.sqlite")
    with eng.connect() as c:   # each message stored on its own, as it stands in the batch, in order
        raws = c.execute(sa.text('select raw from ids_messages order by seq')).scalars().all()
    eng.dispose()
    assert [bytes(x) for x in raws] == [msg(c).encode() for c in ('a1', 'a2', 'a3', 'a4', 'a5')]
    r = cde('ingest', 'file', str(f), env=env)   # the same file again: nothing new
    assert r.returncode == 0 and '5 duplicate' in r.stdout and '0 stored' in r.stdout, r.stdout + r.stderr
    plain = tmp_path / 'plain.hl7'   # one message per line, as before
    plain.write_text(msg('p1') + '\n' + msg('p2') + '\n', newline='')
    r = cde('ingest', 'file', str(plain), env=env)
    assert r.returncode == 0 and r.stdout.startswith('2 stored,'), r.stdout + r.stderr
    assert counts(tmp_path / 'var', 'ids_messages', 'encounters') == [7, 7]


def test_a_batch_file_replayed_is_stamped_with_its_messages_own_times(tmp_path):
    f = tmp_path / 'replay.hl7'
    f.write_text(batch(['r1', 'r2']).replace('|20240101120000+0000||ADT^A01^ADT_A01|r2|', '|20240101130000+0000||ADT^A01^ADT_A01|r2|'), newline='')
    r = cde('ingest', 'file', str(f), '--replay', env={'CDE_VAR': str(tmp_path / 'var')})
    assert r.returncode == 0 and r.stdout.startswith('2 messages in 1 batch, counts match; 2 stored'), r.stdout + r.stderr
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'var'}/cde.sqlite")
    with eng.connect() as c: times = c.execute(sa.text('select received_time from ids_messages order by seq')).scalars().all()
    eng.dispose()
    assert [str(t)[:19] for t in times] == ['2024-01-01 12:00:30', '2024-01-01 13:00:30'], times   # MSH-7 + 30 s


@pytest.mark.parametrize('content,needles', [
    (hl7_file([batch(['c1', 'c2', 'c3'], count=4)]), ["BTS-1 says '4' messages but the batch begun at segment 2 holds 3"]),
    (hl7_file([batch(['c1', 'c2']), batch(['c3'], bid='B2')], count=3), ["FTS-1 says '3' batches but the file holds 2"]),
    (batch(['c1', 'c2', 'c3']).replace('|c2|', '||'), ['message 2', 'MSH-10 (message control id) is missing']),
    (batch(['c1', 'c2']).replace('\rBTS|2', ''), ['has no BTS trailer']),
])
def test_a_wrong_count_or_a_broken_message_refuses_the_whole_file(tmp_path, content, needles):
    env = {'CDE_VAR': str(tmp_path / 'var')}
    (tmp_path / 'first.hl7').write_text(msg('x0') + '\n', newline='')
    assert cde('ingest', 'file', str(tmp_path / 'first.hl7'), env=env).returncode == 0
    f = tmp_path / 'bad-batch.hl7'
    f.write_text(content, newline='')
    one_line_error(cde('ingest', 'file', str(f), env=env), str(f), *needles)
    assert counts(tmp_path / 'var', 'ids_messages', 'ids_receipts', 'ids_dead_letters', 'encounters') == [1, 1, 0, 1]   # nothing of it


def test_a_public_batch_file(tmp_path):
    "python-hl7's sample file (FHS, two batches, three messages) through `cde ingest file`."
    src = SHARED / 'hl7v2' / 'messages' / '007_pythonhl7_ADT_A04_ADT_A01.hl7'
    if not src.exists():
        if in_ci(): pytest.fail(f'{src} missing; CI is set')
        pytest.skip(f'{src} missing')
    r = cde('ingest', 'file', str(src), env={'CDE_VAR': str(tmp_path / 'var')})
    assert r.returncode == 0 and r.stdout.startswith('3 messages in 2 batches, counts match; '), r.stdout + r.stderr
    assert counts(tmp_path / 'var', 'ids_receipts') == [3]


# ---- over MLLP

@pytest.fixture
def engine(tmp_path):
    eng = get_engine(f'sqlite:///{tmp_path}/mllp.sqlite')
    yield eng
    dispose_engines()


@pytest.fixture
def both(store_url):
    "The store on SQLite and on PostgreSQL (one statement per group commit there)."
    eng = get_engine(store_url)
    yield eng
    dispose_engines()


def run(coro_fn, engine, **kw):
    async def main():
        rx = MLLPReceiver(engine, port=0, **kw)
        port = await rx.start()
        try: return await asyncio.wait_for(coro_fn(port, rx), 60)
        finally: await rx.close()
    return asyncio.run(main())


async def exchange(port, payloads):
    "Send frames on one connection; the response batch to each, parsed."
    r, w = await asyncio.open_connection('127.0.0.1', port)
    try:
        for p in payloads: w.write(frame(p))
        await w.drain()
        return [parse_batch((await asyncio.wait_for(r.readuntil(END), 10))[1:-2]) for _ in payloads]
    finally: w.close()


def table(engine, name):
    with engine.connect() as c: return c.execute(sa.text(f'select count(*) from {name}')).scalar()


def test_a_file_over_mllp_is_answered_by_a_response_batch_with_one_ack_per_message(both):
    engine = both
    f = hl7_file([batch(['m1', 'm2']), batch(['m3', 'm4', 'm5'], bid='B2')])
    async def go(port, rx): return await exchange(port, [f, f]), rx.stats
    (first, again), stats = run(go, engine)
    for resp in (first, again):   # the resend: duplicates, acknowledged again, stored once
        assert [s[0] for s in resp.segments] == ['FHS', 'BHS', 'BTS', 'FTS']
        assert (resp.field('FHS', 12), resp.field('BHS', 12), resp.field('BTS', 1), resp.field('FTS', 1)) == ('F1', 'B1', '5', '1')
        assert [(m.field('MSA', 1), m.field('MSA', 2)) for m in resp.messages] == [('AA', f'm{i}') for i in range(1, 6)]
        assert [m.field('MSH', n) for n in (3, 4, 5, 6) for m in resp.messages[:1]] == ['CDE', 'WARD', 'LAB', 'HOSP']
    assert stats.batches == 2 and stats.acks == {'AA': 10}
    assert (table(engine, 'ids_messages'), table(engine, 'ids_receipts'), table(engine, 'ids_dead_letters')) == (5, 10, 0)


def test_enhanced_mode_messages_in_a_batch_get_the_commit_acks_they_ask_for(engine):
    res = run(lambda port, rx: send_messages([batch(['e1', 'e2'], mode='AL'), batch(['e3', 'e4'], mode='ER', bid='B2'), msg('e5')],
                                             port=port, window=3), engine)
    assert res.acks == {0: 'CA CA', 1: '', 2: 'AA'}   # ER: errors only; an empty response batch says all were stored
    assert table(engine, 'ids_messages') == 5


def test_a_wrong_count_over_mllp_is_one_reject_and_one_dead_letter(both):
    engine = both
    bad = batch(['w1', 'w2', 'w3'], count=2, bid='BAD7')
    enhanced = batch(['w4'], count=5, mode='AL')
    res = run(lambda port, rx: exchange(port, [bad, enhanced, batch(['w5'])]), engine)
    assert [(m.field('MSA', 1), m.field('MSA', 2)) for m in res[0].messages] == [('AR', 'BAD7')]
    why = "BTS-1 says '2' messages but the batch begun at segment 1 holds 3"
    assert res[0].messages[0].field('MSA', 3) == why and res[0].field('BTS', 2) == why and res[0].field('BTS', 1) == '1'
    assert [m.field('MSA', 1) for m in res[1].messages] == ['CR'] and [m.field('MSA', 1) for m in res[2].messages] == ['AA']
    assert table(engine, 'ids_messages') == 1   # only the good batch's message
    with engine.connect() as c:
        dead = c.execute(sa.text('select reason, raw from ids_dead_letters order by id')).all()
    assert [d.reason for d in dead] == [why, "BTS-1 says '5' messages but the batch begun at segment 1 holds 1"]
    assert bytes(dead[0].raw) == bad.encode()   # the whole batch, as received


def test_a_batch_is_stored_whole_or_not_at_all(engine):
    "The store fails on the third message of a batch: none of its messages is stored, all are answered AE; the resend stores all."
    with engine.begin() as c:
        c.execute(sa.text("CREATE TRIGGER third BEFORE INSERT ON ids_messages WHEN NEW.control_id = 'h3' "
                          "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"))
    b = batch(['h1', 'h2', 'h3', 'h4'])
    async def go(port, rx):
        first = await exchange(port, [b])
        with engine.begin() as c: c.execute(sa.text('DROP TRIGGER third'))
        return first[0], (await exchange(port, [b]))[0], rx.stats
    first, again, stats = run(go, engine)
    assert [m.field('MSA', 1) for m in first.messages] == ['AE'] * 4 and 'disk is full' in first.messages[0].field('MSA', 3)
    assert [m.field('MSA', 1) for m in again.messages] == ['AA'] * 4 and stats.store_failures == 1
    with engine.connect() as c:
        assert c.execute(sa.text('select control_id from ids_messages order by seq')).scalars().all() == ['h1', 'h2', 'h3', 'h4']
