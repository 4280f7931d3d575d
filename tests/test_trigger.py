"""The order trigger and write-back with real servers on 127.0.0.1: orders fed through the MLLP receiver are scored within
seconds by the worker, never twice with the weekly catch-up run; live scores go out as ORU^R01 to the workbench's own MLLP
receiver, with retries when the destination is down or answers AE."""
import asyncio
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from cde_workbench.deployment import WritebackSpec, load_deployment
from cde_workbench.hl7 import parse_message
from cde_workbench.mllp import MLLPReceiver
from cde_workbench.store import dispose_engines, get_engine, inferences, models, outbound_messages, runs
from cde_workbench.writeback import queue_writebacks, send_due

from conftest import ROOT, free_port


@contextmanager
def receiver(engine, port=0, **kw):
    "The workbench's MLLP receiver on 127.0.0.1 in a background event loop: yields (port, receiver)."
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True); t.start()
    rx = MLLPReceiver(engine, port=port, **kw)
    try:
        bound = asyncio.run_coroutine_threadsafe(rx.start(), loop).result(10)
        yield bound, rx
    finally:
        asyncio.run_coroutine_threadsafe(rx.close(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop); t.join(10); loop.close()


T0 = datetime(2024, 3, 4, 9, 30, tzinfo=timezone.utc)


@pytest.fixture
def stores(tmp_path):
    "Two stores: the workbench's (with one silent and two live packets of hgb_abnormal) and the receiving end's."
    ours, theirs = get_engine(f'sqlite:///{tmp_path}/ours.sqlite'), get_engine(f'sqlite:///{tmp_path}/theirs.sqlite')
    with ours.begin() as c:
        mid = c.execute(models.insert().values(name='hgb_abnormal', version=2, sha256='cd' * 32, path='-', feature_set_hash='f', data_fingerprint='d',
                                               code_version='c', params='{}', metrics='{}', created_at=T0)).inserted_primary_key[0]
        c.execute(runs.insert().values(run_id='r1', deployment='hgb_abnormal', kind='score', status='ok', started_at=T0, parameters='{}'))
        for n, (mode, score) in enumerate((('silent', 0.9), ('threshold', 0.75), ('threshold', 0.125))):
            c.execute(inferences.insert().values(deployment='hgb_abnormal', model_id=mid, order_id=f'O{n}', patient_key=f'K{n}', prediction_time=T0,
                                                 score=score, threshold=0.5, output_mode=mode, n_features=3, run_id='r1', scored_at=T0,
                                                 decision=score >= 0.5, shown=mode != 'silent' and score >= 0.5, trigger='order', model_sha256='cd' * 32))
    yield ours, theirs
    dispose_engines()


def wb_dep(port, **kw):
    return replace(load_deployment(ROOT / 'deployments' / 'hgb_abnormal'), writeback=WritebackSpec(port=port, **kw))


def ledger(engine):
    with engine.connect() as c: return c.execute(sa.select(outbound_messages).order_by(outbound_messages.c.id)).all()


def test_writeback_reaches_the_workbench_receiver_and_is_stored_there(stores):
    ours, theirs = stores
    with receiver(theirs) as (port, rx):
        dep = wb_dep(port, receiving_application='EHR_RESULTS', receiving_facility='MAIN')
        assert queue_writebacks(ours, [dep]) == 2   # the live packets only
        s = send_due(ours, [dep])
        assert (s.sent, s.retried, s.failed) == (2, 0, 0), s.errors
        assert send_due(ours, [dep]).sent == 0 and queue_writebacks(ours, [dep]) == 0   # sent once
    rows = ledger(ours)
    assert [(r.status, r.attempts, r.ack_code, r.last_error) for r in rows] == [('sent', 1, 'AA', None)] * 2
    with theirs.connect() as c: stored = c.execute(sa.text('select message_type, control_id, sending_app, raw from ids_messages order by seq')).all()
    assert [(m, cid, app) for m, cid, app, _ in stored] == [('ORU^R01', r.control_id, 'CDE_WORKBENCH') for r in rows]
    m = parse_message(stored[0].raw)
    obx = m.all('OBX')[0]
    assert (m.field('MSH', 5), m.field('MSH', 6), m.field('PID', 3), m.field('ORC', 2)) == ('EHR_RESULTS', 'MAIN', 'K1', 'O1')
    assert (float(m.field(obx, 5)), m.field(obx, 2), m.field(obx, 3), m.field(obx, 8), m.field(obx, 17)) == (0.75, 'NM', 'hgb_abnormal', 'A', 'hgb_abnormal-v2')
    assert m.field(m.all('OBX')[1], 5) == 'positive, shown' and 'version 2' in m.field('NTE', 3)
    assert float(parse_message(stored[1].raw).field('OBX', 5)) == 0.125


def test_writeback_retries_while_the_destination_is_down_then_delivers(stores):
    ours, theirs = stores
    port = free_port()
    dep = wb_dep(port, retries=4, retry_seconds=0.2, timeout_seconds=2)
    queue_writebacks(ours, [dep])
    s = send_due(ours, [dep])
    assert (s.sent, s.retried) == (0, 2) and 'refused' in s.errors[0]
    assert send_due(ours, [dep]).retried == 0   # within the wait: nothing sent
    with receiver(theirs, port=port):
        deadline = time.monotonic() + 10
        while any(r.status == 'pending' for r in ledger(ours)) and time.monotonic() < deadline:
            send_due(ours, [dep]); time.sleep(0.05)
    assert [(r.status, r.attempts, r.ack_code) for r in ledger(ours)] == [('sent', 2, 'AA')] * 2
    assert all('refused' in r.last_error for r in ledger(ours))   # what went wrong before it went through
    with theirs.connect() as c: assert c.execute(sa.text('select count(*) from ids_messages')).scalar() == 2


def test_writeback_negative_ack_is_a_failure_retried_then_failed(stores):
    "A receiver whose store fails answers AE ('not stored, please resend'): retried with a doubling wait, then failed, the AE kept."
    ours, theirs = stores
    with theirs.begin() as c: c.execute(sa.text('drop table ids_receipts'))   # the receiving end's store is broken
    with receiver(theirs) as (port, rx):
        dep = wb_dep(port, retries=3, retry_seconds=0.1, timeout_seconds=5)
        queue_writebacks(ours, [dep])
        t0, deadline = time.monotonic(), time.monotonic() + 20
        while any(r.status == 'pending' for r in ledger(ours)) and time.monotonic() < deadline:
            send_due(ours, [dep]); time.sleep(0.02)
        took = time.monotonic() - t0
    rows = ledger(ours)
    assert [(r.status, r.attempts, r.ack_code) for r in rows] == [('failed', 3, 'AE')] * 2
    assert all(r.last_error.startswith('AE: not stored, please resend') and r.sent_at is None for r in rows)
    assert took >= 0.1 + 0.2   # waited 0.1 s, then 0.2 s
    assert rx.stats.acks.get('AE') == 6
