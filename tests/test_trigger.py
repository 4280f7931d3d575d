"""The order trigger and write-back with real servers on 127.0.0.1: orders fed through the MLLP receiver are scored within
seconds by the worker, never twice with the weekly catch-up run; live scores go out as ORU^R01 to the workbench's own MLLP
receiver, with retries when the destination is down or answers AE."""
import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from cde_workbench.deploy import set_status
from cde_workbench.deployment import WritebackSpec, load_deployment
from cde_workbench.events import process_pending, processed_up_to
from cde_workbench.hl7 import parse_message
from cde_workbench.mllp import MLLPReceiver, ReplayClock, send_messages
from cde_workbench.registry import get_model
from cde_workbench.schedule import run_ledger
from cde_workbench.serve import score_pending
from cde_workbench.store import (dispose_engines, get_engine, ids_messages, inferences, lab_order_events, models, outbound_messages,
                                 processor_state, runs, score_queue)
from cde_workbench.synth import HospitalConfig, generate, hl7_feed
from cde_workbench.trigger import TRIGGER_CURSOR, TriggerWorker, enqueue_new_orders, score_queued
from cde_workbench.writeback import queue_writebacks, send_due, write_back

from conftest import CDE, ROOT, cde, deliver_feed, env_deployment, env_engine, env_key, free_port, one_line_error


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
def stores(tmp_path, store_url):
    "Two stores: the workbench's on each backend (with one silent and two live packets of hgb_abnormal) and the receiving end's."
    ours, theirs = get_engine(store_url), get_engine(f'sqlite:///{tmp_path}/theirs.sqlite')
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
    assert (s.sent, s.retried) == (0, 1) and 'refused' in s.errors[0]   # the destination is down: the second row waits for the next pass
    assert send_due(ours, [dep]).retried == 1   # the next pass: the second row's first attempt
    assert send_due(ours, [dep]).retried == 0   # both within their wait: nothing sent
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


# ----------------------------------------------------------------------------------------------------------------------
# the order trigger on the small trained store

CUT = datetime(2024, 2, 5, tzinfo=timezone.utc)


def small_feed():
    return hl7_feed(generate(HospitalConfig(n_patients=200, seed=5)))


def is_cbc_order(m):
    p = parse_message(m)
    return p.message_type.startswith('ORM') and p.field('OBR', 4) == 'CBC' and p.field('ORC', 1) in ('NW', '')


def wait_for(cond, timeout, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond(): return True
        time.sleep(every)
    return cond()


def queue_rows(engine):
    with engine.connect() as c: return c.execute(sa.select(score_queue).order_by(score_queue.c.id)).all()


def caught_up(engine):
    "Every stored message processed, every order event read by the trigger, and nothing queued left to score."
    with engine.connect() as c:
        stored, processed = c.execute(sa.select(sa.func.max(ids_messages.c.seq))).scalar(), processed_up_to(c)
        last_order = c.execute(sa.select(sa.func.max(lab_order_events.c.id))).scalar()
        cursor = c.execute(sa.select(processor_state.c.last_seq).where(processor_state.c.name == TRIGGER_CURSOR)).scalar()
    q = queue_rows(engine)
    return stored is not None and stored == processed and cursor == last_order and q and all(r.status in ('scored', 'skipped', 'failed') for r in q)


def packets(engine):
    with engine.connect() as c: return c.execute(sa.select(inferences).order_by(inferences.c.inference_id)).all()


def silent(engine, dep):
    with engine.connect() as c: rec = get_model(c, dep.name)
    set_status(engine, dep.name, 'silent', rec.model_id, 'test: silent trial')
    return rec


def test_orders_fed_over_mllp_are_scored_within_seconds_and_the_catch_up_run_scores_none_again(small_store):
    engine, dep, key = env_engine(), env_deployment(), env_key()
    silent(engine, dep)
    feed = small_feed()
    first = [m for t, m in feed if t < CUT]
    later = next(m for t, m in feed if t >= CUT + timedelta(days=1) and is_cbc_order(m))
    worker = TriggerWorker(engine, [dep], poll=0.5)
    def after():   # as `cde ingest mllp` wires it: the processor, then the worker woken to enqueue and score
        process_pending(engine, 200, key=key); worker.wake()
    with worker, receiver(engine, clock=ReplayClock(), after_commit=after, after_commit_every=0.05) as (port, rx):
        res = asyncio.run(send_messages(first, port=port, window=32, timeout=60))
        assert set(res.acks.values()) <= {'AA'} and len(res.acks) == len(first)
        assert wait_for(lambda: caught_up(engine), 120), queue_rows(engine)[:3]
        n_first = len(packets(engine))
        # one new CBC order: its packet is there within seconds of its ACK
        oid = parse_message(later).field('ORC', 2) or parse_message(later).field('OBR', 2)
        t0 = time.monotonic()
        assert asyncio.run(send_messages([later], port=port)).acks == {0: 'AA'}
        assert wait_for(lambda: any(p.order_id == oid for p in packets(engine)), 10), f'order {oid} not scored within 10 s'
        latency = time.monotonic() - t0
    assert latency < 5, latency
    q, ps = queue_rows(engine), packets(engine)
    assert worker.last_error is None and not [r for r in q if r.status == 'failed'], [(r.order_id, r.error) for r in q if r.status == 'failed'][:3]
    assert n_first >= 5 and len(ps) == n_first + 1
    assert {p.trigger for p in ps} == {'order'} and all(p.output_mode == 'silent' and p.shown is False for p in ps)
    scored = {r.order_id: r.inference_id for r in q if r.status == 'scored'}
    assert scored == {p.order_id: p.inference_id for p in ps}
    assert all(r.error in ('excluded by the task', 'order cancelled') for r in q if r.status == 'skipped')
    # each packet is its order's, scored as of the order time
    with engine.connect() as c:
        e = lab_order_events.c
        times = dict(c.execute(sa.select(e.order_id, e.event_time).where(e.control == 'NW')).all())
    assert all(p.prediction_time == times[p.order_id] for p in ps)
    # the weekly catch-up run afterwards: nothing left to score
    with engine.connect() as c: as_of = c.execute(sa.select(sa.func.max(ids_messages.c.received_time))).scalar()
    as_of = as_of.replace(tzinfo=timezone.utc) if isinstance(as_of, datetime) else datetime.fromisoformat(as_of).replace(tzinfo=timezone.utc)
    with run_ledger(engine, dep.name, 'score', {'as_of': as_of.isoformat()}) as run_id:
        s = score_pending(engine, dep, as_of + timedelta(seconds=1), run_id)
    assert (s.candidates, s.scored) == (0, 0)
    assert len(packets(engine)) == len(ps)
    with engine.connect() as c:   # the worker's run is closed
        assert c.execute(sa.text("select status from runs where kind = 'trigger'")).scalars().all() == ['succeeded']


def test_orders_the_catch_up_run_scored_first_are_not_scored_again_by_the_worker(small_store):
    engine, dep = env_engine(), env_deployment()
    silent(engine, dep)
    deliver_feed(engine, until=CUT)
    with run_ledger(engine, dep.name, 'score', {}) as run_id: s = score_pending(engine, dep, CUT, run_id)
    assert s.scored >= 5
    before = packets(engine)
    assert enqueue_new_orders(engine, [dep]).queued >= s.scored
    t = score_queued(engine, [dep])
    assert t.scored == 0 and t.skipped['already scored'] == s.scored and t.failed == 0
    assert packets(engine) == before
    q = {r.order_id: r for r in queue_rows(engine)}
    assert all(q[p.order_id].status == 'skipped' and q[p.order_id].inference_id == p.inference_id for p in before)


def test_live_scores_from_the_order_trigger_are_written_back(small_store, tmp_path):
    engine, key = env_engine(), env_key()
    theirs = get_engine(f'sqlite:///{tmp_path}/ehr.sqlite')
    with receiver(theirs) as (port, rx):
        dep = replace(env_deployment(), writeback=WritebackSpec(port=port, retries=3, retry_seconds=0.2))
        rec = silent(engine, dep)
        set_status(engine, dep.name, 'live', rec.model_id, 'test: live')
        deliver_feed(engine, until=CUT)
        w = TriggerWorker(engine, [dep], also=lambda: write_back(engine, [dep]))
        s = w.run_once(); w.stop()
    ps = packets(engine)
    assert s.scored == len(ps) >= 5 and {p.output_mode for p in ps} == {'threshold'}
    sent = ledger(engine)
    assert len(sent) == len(ps) and {(r.status, r.ack_code) for r in sent} == {('sent', 'AA')}
    with theirs.connect() as c: raw = c.execute(sa.text('select raw from ids_messages order by seq')).scalars().all()
    assert len(raw) == len(ps)
    got = {(m := parse_message(r)).field('ORC', 2): (float(m.field('OBX', 5)), m.field('OBX', 8), m.field('PID', 3, 5)) for r in raw}
    assert got == {p.order_id: (round(p.score, 6), 'A' if p.decision else 'N', 'MR') for p in ps}


# ----------------------------------------------------------------------------------------------------------------------
# the command line: `cde trigger run` and `cde ingest mllp` with the worker

def test_cde_trigger_run_once_scores_the_queue_and_refuses_a_workspace_without_order_deployments(small_store, tmp_path):
    engine, dep = env_engine(), env_deployment()
    silent(engine, dep)
    deliver_feed(engine, until=CUT)
    r = cde('trigger', 'run', '--once')
    assert r.returncode == 0, r.stderr
    n = len(packets(engine))
    assert n >= 5 and r.stdout.startswith(f'{len(queue_rows(engine))} queued, {n} scored')
    r = cde('trigger', 'run', '--once')
    assert r.returncode == 0 and r.stdout.startswith('0 queued, 0 scored') and len(packets(engine)) == n
    (tmp_path / 'empty').mkdir()
    one_line_error(cde('trigger', 'run', '--once', env={'CDE_DEPLOYMENTS': str(tmp_path / 'empty')}), 'kind = "order"', 'nothing to do')
    one_line_error(cde('trigger', 'run', '--poll', '0'), '--poll')


def test_cde_ingest_mllp_runs_the_order_trigger_behind_the_processor(small_store):
    engine, dep = env_engine(), env_deployment()
    silent(engine, dep)
    first = [m for t, m in small_feed() if t < CUT]
    port = free_port()
    proc = subprocess.Popen([*CDE, 'ingest', 'mllp', '--port', str(port), '--replay-clock'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert wait_for(lambda: proc.poll() is None and _listening(port), 60), proc.stderr.read() if proc.poll() is not None else 'not listening'
        res = asyncio.run(send_messages(first, port=port, window=32, timeout=60))
        assert set(res.acks.values()) == {'AA'}
        assert wait_for(lambda: caught_up(engine), 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        try: err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); err = proc.communicate()[1]
    assert 'order trigger for hgb_abnormal' in err, err
    assert proc.returncode == 0, err
    assert {p.trigger for p in packets(engine)} == {'order'}
    with engine.connect() as c:
        assert c.execute(sa.text("select status from runs where kind = 'trigger'")).scalars().all() == ['succeeded']


def _listening(port):
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=0.5): return True
    except OSError: return False


@pytest.mark.slow
def test_the_demos_silent_trial_scores_through_the_order_trigger_and_the_catch_up_runs_find_nothing(small_store):
    "The demo's silent trial on the small store: the feed over `cde ingest mllp`, the order trigger after each week, score.ipynb as catch-up."
    from cde_workbench.config import Workspace
    from cde_workbench.demo import _silent_trial
    from cde_workbench.synth import write_hl7_feed
    engine, dep, key = env_engine(), env_deployment(), env_key()
    silent(engine, dep)
    cfg = HospitalConfig(n_patients=200, seed=5)
    write_hl7_feed(generate(cfg), small_store.base / 'feed.hl7')
    out = _silent_trial(Workspace.from_env(), dep, engine, cfg, small_store.base / 'feed.hl7', key, print, False)
    ot = out['order_trigger']
    assert ot['scored'] == ot['packets'] >= 20 and ot['failed'] == 0 and ot['queued'] == ot['scored'] + ot['skipped']
    assert out['catch_up_scored'] == 0
    ps = packets(engine)
    assert len(ps) == ot['packets'] and len({p.order_id for p in ps}) == len(ps)


# ----------------------------------------------------------------------------------------------------------------------
# the queue on both backends: ids committed out of order (PostgreSQL), two workers claiming at once

def test_the_queue_on_both_backends_catches_ids_committed_late_and_never_hands_a_row_to_two_workers(store_url):
    from cde_workbench.trigger import claim
    engine = get_engine(store_url)
    dep = load_deployment(ROOT / 'deployments' / 'hgb_abnormal')
    with engine.begin() as c:
        mid = c.execute(models.insert().values(name='hgb_abnormal', version=1, sha256='0', path='-', feature_set_hash='f', data_fingerprint='d',
                                               code_version='c', params='{}', metrics='{}', created_at=T0)).inserted_primary_key[0]
    set_status(engine, dep.name, 'silent', mid)
    order = lambda conn, oid: conn.execute(lab_order_events.insert().values(seq=None, order_id=oid, control='NW', patient_key='P', encounter_id='E',
                                                                            panel='CBC', event_time=T0, stored_time=T0, source='hl7'))
    if engine.dialect.name == 'postgresql':   # a long transaction takes an id, a later one commits first
        with engine.connect() as slow:
            tx = slow.begin()
            order(slow, 'LATE')
            with engine.begin() as c: order(c, 'EARLY')
            assert enqueue_new_orders(engine, [dep]).queued == 1   # EARLY; the cursor is past LATE's id, not yet committed
            tx.commit()
        assert enqueue_new_orders(engine, [dep]).queued == 1       # LATE, from the window behind the cursor
        assert {r.order_id for r in queue_rows(engine)} == {'EARLY', 'LATE'}
    with engine.begin() as c:
        for i in range(60): order(c, f'O{i}')
    assert enqueue_new_orders(engine, [dep], batch=7).queued == 60   # several transactions, each with the cursor
    assert enqueue_new_orders(engine, [dep]).queued == 0
    got, barrier = [], threading.Barrier(3)
    def worker():
        barrier.wait()
        for _ in range(5): got.append([r['id'] for r in claim(engine, [dep.name], limit=30)])
    ts = [threading.Thread(target=worker) for _ in range(3)]
    for t in ts: t.start()
    for t in ts: t.join(60)
    ids = [i for g in got for i in g]
    assert len(ids) == len(set(ids)) == len(queue_rows(engine))   # every row claimed once, by one worker
    assert {(r.status, r.attempts) for r in queue_rows(engine)} == {('claimed', 1)}


def test_cde_ingest_mllp_still_receives_when_a_deployment_does_not_load(tmp_path):
    "A broken deployment.toml turns the order trigger off with a warning; the feed is still stored and acknowledged."
    (tmp_path / 'deps' / 'bad').mkdir(parents=True)
    (tmp_path / 'deps' / 'bad' / 'deployment.toml').write_text('name = "bad"\n[task]\nkind = "nonsense"\n')
    env = {**os.environ, 'CDE_VAR': str(tmp_path / 'var'), 'CDE_DEPLOYMENTS': str(tmp_path / 'deps'), 'CDE_SITE_KEY_FILE': str(tmp_path / 'site.key')}
    env.pop('CDE_DATABASE_URL', None)
    port = free_port()
    proc = subprocess.Popen([*CDE, 'ingest', 'mllp', '--port', str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert wait_for(lambda: proc.poll() is None and _listening(port), 60)
        msg = 'MSH|^~\\&|LAB|HOSP|CDE|WARD|20240101120000+0000||ADT^A01^ADT_A01|X1|P|2.5\rEVN|A01|20240101120000+0000\rPID|1||M1||Doe^Jo||19600101|F\rPV1|1|I|MED1'
        assert asyncio.run(send_messages([msg], port=port)).acks == {0: 'AA'}
    finally:
        proc.send_signal(signal.SIGTERM)
        try: err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); err = proc.communicate()[1]
    assert proc.returncode == 0 and 'the order trigger is off' in err and "missing required section 'split'" in err, err
