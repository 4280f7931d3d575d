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
from cde_workbench.store import dispose_engines, get_engine

DATA = Path(__file__).resolve().parent.parent / '..' / 'shared' / 'data' / 'hl7v2'
pytestmark = pytest.mark.skipif(not (DATA / 'MANIFEST.json').exists(), reason=f'shared HL7 v2 test messages not found at {DATA.resolve()}')


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
        if e['malformed']: assert o.status == 'dead_letter' and o.reason, (e['file'], o)
        elif e['kind'] == 'message': assert o.status in ('stored', 'duplicate', 'conflict'), (e['file'], o.reason)
        else: assert o.status == 'dead_letter' and 'batch' in o.reason.lower(), (e['file'], o.reason)   # batches are split upstream
    with engine.connect() as c:
        assert c.execute(sa.text('select count(*) from ids_dead_letters')).scalar() == sum(o.status == 'dead_letter' for o in out)
        assert c.execute(sa.text("select count(*) from ids_dead_letters where reason = ''")).scalar() == 0
    s = process_pending(engine)   # types the processor does not handle are recorded, never a crash
    with engine.connect() as c:
        assert c.execute(sa.text('select count(*) from processing_errors')).scalar() == s.errors


def test_the_shared_messages_over_mllp(engine):
    entries = manifest()
    raws = [(DATA / 'messages' / e['file']).read_bytes() for e in entries]
    async def go():
        rx = MLLPReceiver(engine, port=0, process=False)
        port = await rx.start()
        try: return await send_messages(raws, port=port, window=8, timeout=20)
        finally: await rx.close()
    res = asyncio.run(go())
    assert len(res.acks) == len(raws)
    for i, e in enumerate(entries):
        if e['malformed']: assert res.acks[i] in ('AR', 'CR'), (e['file'], res.acks[i])
