"""The public HL7 v2 test messages (../shared/data/hl7v2) through the immutable data store and the MLLP receiver:
well-formed single messages are stored and processed, every malformed one becomes a dead-letter row with its
reason and an AR acknowledgement, and nothing crashes."""
import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from cde_workbench.events import process_pending
from cde_workbench.ids import store_messages
from cde_workbench.mllp import MLLPReceiver, send_messages
from cde_workbench.pseudonyms import site_key
from cde_workbench.store import dispose_engines, get_engine

from conftest import SHARED, needs_shared, env_key  # noqa: E402

DATA = SHARED / 'hl7v2'
# malformed in the manifest for what they say, not how they are written: stored and acknowledged AA, then held with this reason
HELD = {'018': 'no assigning authority'}
needs_shared(DATA / 'MANIFEST.json', 'shared HL7 v2 test messages')


def manifest():
    return json.loads((DATA / 'MANIFEST.json').read_text())


@pytest.fixture
def engine(tmp_path, monkeypatch):
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    eng = get_engine(f'sqlite:///{tmp_path}/shared.sqlite')
    yield eng
    dispose_engines()


def test_store_and_process_the_shared_messages(engine):
    entries = manifest()
    raws = [(DATA / 'messages' / e['file']).read_bytes() for e in entries]
    out = store_messages(engine, [(r, datetime.now(timezone.utc), e['file']) for r, e in zip(raws, entries)])
    for e, o in zip(entries, out):
        if e['file'][:3] in HELD: assert o.status in ('stored', 'conflict'), (e['file'], o.reason)   # readable: stored (017 has its control id)
        elif e['malformed']: assert o.status == 'dead_letter' and o.reason, (e['file'], o)
        elif e['kind'] == 'message': assert o.status in ('stored', 'duplicate', 'conflict'), (e['file'], o.reason)
        else: assert o.status == 'dead_letter' and 'batch' in o.reason.lower(), (e['file'], o.reason)   # batches are split upstream
    with engine.connect() as c:
        assert c.execute(sa.text('select count(*) from ids_dead_letters')).scalar() == sum(o.status == 'dead_letter' for o in out)
        assert c.execute(sa.text("select count(*) from ids_dead_letters where reason = ''")).scalar() == 0
    s = process_pending(engine, key=env_key())   # types the processor does not handle are recorded, never a crash
    with engine.connect() as c:
        assert c.execute(sa.text('select count(*) from processing_errors')).scalar() == s.errors
        for e, o in zip(entries, out):
            if e['file'][:3] in HELD:
                reason = c.execute(sa.text('select reason from processing_errors where seq = :s'), {'s': o.seq}).scalar()
                assert HELD[e['file'][:3]] in reason, (e['file'], reason)


def test_the_shared_messages_over_mllp(engine):
    entries = manifest()
    raws = [(DATA / 'messages' / e['file']).read_bytes() for e in entries]
    async def go():
        rx = MLLPReceiver(engine, port=0)
        port = await rx.start()
        try: return await send_messages(raws, port=port, window=8, timeout=20)
        finally: await rx.close()
    res = asyncio.run(go())
    assert len(res.acks) == len(raws)
    for i, e in enumerate(entries):
        if e['file'][:3] in HELD: assert res.acks[i] == 'AA', (e['file'], res.acks[i])
        elif e['malformed']: assert res.acks[i] in ('AR', 'CR'), (e['file'], res.acks[i])


def _m(cid, extra=''):
    return f'MSH|^~\\&|LAB|HOSP|CDE|CDE|20240101000000+0000||ORU^R01|{cid}|P|2.5\rPID|1||M1{extra}'.encode()


def test_store_outcomes_are_the_same_on_sqlite_and_postgresql(store_url, tmp_path, monkeypatch):
    "Group commits with new messages, resends (within a batch and later), conflicts (with the store and within a batch) and"
    "garbage: the same outcomes and the same rows on both databases (PostgreSQL takes its one-statement path)."
    eng = get_engine(store_url)
    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    first = store_messages(eng, [(_m('A'), t, 'c1'), (_m('A'), t, 'c2'), (_m('A', '|x'), t, 'c1'), (b'\x00garbage', t, 'c3'),
                                 (_m('B'), t, 'c1'), (_m('B', '|y'), t, 'c2'), (_m('B', '|y'), t, 'c3'), (_m('B', '|z'), t, 'c1')])
    assert [o.status for o in first] == ['stored', 'duplicate', 'conflict', 'dead_letter', 'stored', 'conflict', 'duplicate', 'conflict']
    s = [o.seq for o in first]
    assert s[0] == s[1] and s[5] == s[6] and len({s[0], s[2], s[4], s[5], s[7]}) == 5 and s[3] is None
    assert first[2].reason and 'MSH' in first[3].reason and first[0].message.control_id == 'A'
    again = store_messages(eng, [(_m('A'), t, 'c4'), (_m('A', '|x'), t, 'c4'), (_m('A', '|w'), t, 'c4'), (_m('A', '|w'), t, 'c5'), (_m('C'), t, 'c4')])
    assert [o.status for o in again] == ['duplicate', 'duplicate', 'conflict', 'duplicate', 'stored']
    assert again[0].seq == s[0] and again[1].seq == s[2] and again[2].seq == again[3].seq and again[4].seq > again[2].seq
    assert store_messages(eng, [(b'MSH|^~\\&|x', t, 'c6')])[0].status == 'dead_letter'   # a batch of nothing but garbage
    with eng.connect() as c:
        q = lambda sql: c.execute(sa.text(sql)).all()
        assert q('select control_id, conflict from ids_messages order by seq') == [('A', False), ('A', True), ('B', False), ('B', True), ('B', True),
                                                                                   ('A', True), ('C', False)]
        assert q('select m.control_id, count(*) from ids_receipts r join ids_messages m on m.seq = r.seq group by m.seq, m.control_id '
                 'order by m.seq') == [('A', 3), ('A', 2), ('B', 1), ('B', 2), ('B', 1), ('A', 2), ('C', 1)]
        assert q('select connection from ids_dead_letters order by id') == [('c3',), ('c6',)]
        assert q('select raw from ids_dead_letters order by id')[0][0] == b'\x00garbage'
        from cde_workbench.store import ids_receipts
        assert set(c.execute(sa.select(ids_receipts.c.received_time)).scalars()) == {t}   # aware UTC on both
    dispose_engines()
