"""The event processor: same final state for every arrival order, merges, cancels and corrections,
resumable processing, and replay into an empty store giving identical tables (SQLite and PostgreSQL)."""
import itertools
import math
import random
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from cde_workbench.events import DERIVED_TABLES, process_messages, process_pending, table_checksums
from cde_workbench.facts import Facts, encounter_rows, message_facts, newest, order_state, resolve_links
from cde_workbench.hl7 import format_ts, join_segments, msh, parse_message, segment
from cde_workbench.ids import store_messages
from cde_workbench.rebuild import replay
from cde_workbench.store import (adt_events, dispose_engines, encounters, get_engine, lab_order_events, lab_orders, location_visits,
                                 mrn_merges, patient_facts, patient_identity, patient_links, patients)
from cde_workbench.synth import HospitalConfig, generate, hl7_feed

T0 = datetime(2024, 3, 1, 8, tzinfo=timezone.utc)
KEY = bytes(32)


def at(hours): return T0 + timedelta(hours=hours)


def pid(mrn, family='Smith', given='Ann'):
    return segment('PID', 1, '', (mrn, '', '', 'HOSP', 'MR'), '', (family, given), '', '19500102', 'F', '', 'White')


def pv1(enc, ward=''):
    return segment('PV1', 1, 'I', (ward, '', ''), *[''] * 15, enc)


def adt(cid, event, hours, mrn='M1', enc='E1', ward='', extra=(), family='Smith'):
    return join_segments([msh('ADT', event, cid, at(hours)), segment('EVN', event, format_ts(at(hours))), pid(mrn, family), pv1(enc, ward), *extra])


def orm(cid, order, hours, control='NW', mrn='M1', enc='E1'):
    return join_segments([msh('ORM', 'O01', cid, at(hours)), pid(mrn), pv1(enc), segment('ORC', control, order, *[''] * 6, format_ts(at(hours))),
                          segment('OBR', 1, order, order, ('CBC', 'CBC', 'LOCAL'), '', '', format_ts(at(hours)))])


def oru(cid, order, hours, value, status, mrn='M1', enc='E1', drawn=1):
    obr = segment('OBR', 1, order, order, ('CBC', 'CBC', 'LOCAL'), '', '', format_ts(at(drawn)), *[''] * 14, format_ts(at(hours)))
    obx = segment('OBX', 1, 'NM', ('718-7', 'Hemoglobin', 'LN'), '', value, ('g/dL',), '12-15.5', 'N',
                  '', '', status, '', '', format_ts(at(drawn)))
    return join_segments([msh('ORU', 'R01', cid, at(hours)), pid(mrn), pv1(enc), segment('ORC', 'RE', order), obr, obx])


def merge(cid, hours, surviving, retired):
    return join_segments([msh('ADT', 'A40', cid, at(hours)), segment('EVN', 'A40', format_ts(at(hours))), pid(surviving),
                          segment('MRG', (retired, '', '', 'HOSP', 'MR'))])


SCENARIOS = {
    'encounter lifecycle': [adt('a1', 'A01', 0, ward='MED1'), adt('a2', 'A02', 5, ward='ICU'), adt('a3', 'A02', 30, ward='MED2'),
                            adt('a4', 'A03', 50), adt('a5', 'A13', 51), adt('a6', 'A12', 52, ward='ICU')],
    'merge before the retired record exists': [adt('b1', 'A01', 0, mrn='OLD', enc='E7', ward='MED1'), merge('b2', 1, 'NEW', 'OLD'),
                                               adt('b3', 'A01', 40, mrn='NEW', enc='E8', ward='SURG'), oru('b4', 'O7', 3, '10.1', 'F', mrn='OLD', enc='E7'),
                                               adt('b5', 'A08', 60, mrn='NEW', enc='E8', ward='SURG', family='Smythe')],
    'result corrected': [orm('c1', 'O1', 1, enc='E3'), oru('c2', 'O1', 2, '11.0', 'P', enc='E3'), oru('c3', 'O1', 3, '11.5', 'F', enc='E3'),
                         oru('c4', 'O1', 9, '12.5', 'C', enc='E3'), adt('c5', 'A01', 0, enc='E3', ward='MED1'), adt('c6', 'A03', 20, enc='E3')],
    'admission cancelled, order cancelled': [adt('d1', 'A01', 0, enc='E4', ward='MED1'), orm('d2', 'O2', 1, enc='E4'), orm('d3', 'O3', 2, enc='E4'),
                                             orm('d4', 'O3', 3, control='CA', enc='E4'), oru('d5', 'O2', 4, '13.0', 'F', enc='E4'),
                                             adt('d6', 'A11', 6, enc='E4'), adt('d7', 'A08', 5, enc='E4', ward='MED1', family='Jones')],
}
SKIP = {'id', 'seq', 'stored_time', 'at'}   # arrival-dependent by definition


def snapshot(conn):
    out = {}
    for t in DERIVED_TABLES:
        cols = [c for c in t.columns if c.name not in SKIP]
        out[t.name] = sorted(tuple(str(v) for v in r) for r in conn.execute(sa.select(*cols)))
    return out


@pytest.fixture
def sqlite_engine(tmp_path):
    eng = get_engine(f'sqlite:///{tmp_path}/events.sqlite')
    yield eng
    dispose_engines()


def memory_state(msgs, order):
    """The final state of the derived tables when `msgs` arrive in `order`, one message at a time, computed in memory:
    each message's facts by `message_facts` (stored as the store's unique constraints keep them), and the current state of
    patients, identities, merge links, stays, visits and orders by the same pure functions `refresh_state` applies."""
    facts = Facts()
    seen_adt = set()
    for arrival, i in enumerate(order):
        one = Facts()
        message_facts(parse_message(msgs[i]), arrival + 1, T0 + timedelta(days=arrival), one, KEY)
        for table, rows in one.rows.items():
            for r in rows:
                if table is adt_events:   # ON CONFLICT DO NOTHING: the first stored (stay, type, time) stays
                    k = (r['encounter_id'], r['event_type'], r['event_time'])
                    if k in seen_adt: continue
                    seen_adt.add(k)
                facts.add(table, **r)
    rows = {t: list(facts.rows.get(t, [])) for t in DERIVED_TABLES}
    by_mrn = defaultdict(list)
    for r in rows[patient_facts]: by_mrn[r['mrn']].append(r)
    for mrn, rs in by_mrn.items():
        n = newest(rs, ('family_name', 'given_name', 'birth_date', 'sex', 'race_ethnicity'))
        rows[patient_identity].append(dict(mrn=mrn, patient_key=n['patient_key'], family_name=n['family_name'],
                                           given_name=n['given_name'], birth_date=n['birth_date']))
        if n['birth_date'] is not None:
            rows[patients].append(dict(patient_key=n['patient_key'], birth_year=n['birth_date'].year, sex=n['sex'] or 'U',
                                       race_ethnicity=n['race_ethnicity'] or 'Unknown', source='hl7'))
    rows[patient_links] = [dict(patient_key=k, resolved_key=v) for k, v in resolve_links(rows[mrn_merges]).items()]
    by_enc, by_order = defaultdict(list), defaultdict(list)
    for r in rows[adt_events]: by_enc[r['encounter_id']].append(r)
    rows[encounters], rows[location_visits] = encounter_rows(by_enc, 'hl7')
    for r in rows[lab_order_events]: by_order[r['order_id']].append(r)
    rows[lab_orders] = [dict(order_id=o, source='hl7', **order_state(evs)) for o, evs in by_order.items()]
    out = {}
    for t in DERIVED_TABLES:
        cols = [c.name for c in t.columns if c.name not in SKIP]
        out[t.name] = sorted(tuple(str(_utc(r.get(c))) for c in cols) for r in rows[t])
    return out


def _utc(v):
    "A time as the store gives it back (UTC); anything else unchanged."
    return v.astimezone(timezone.utc) if isinstance(v, datetime) else v


@pytest.mark.parametrize('name', list(SCENARIOS))
def test_every_arrival_order_gives_the_same_state(name):
    "Every permutation of each scenario (720 for six messages) through the processor's pure functions, in memory."
    msgs = SCENARIOS[name]
    t_start = time.perf_counter()
    first = memory_state(msgs, range(len(msgs)))
    n = 0
    for order in itertools.permutations(range(len(msgs))):
        assert memory_state(msgs, order) == first, f'{name}: arrival order {order} changed the final state'
        n += 1
    assert n == math.factorial(len(msgs))
    print(f'{name}: {n} orderings in {time.perf_counter() - t_start:.1f} s')


def sample_orders(n, k, seed):
    "The arrival order, its reverse and `k` other seeded random orderings of `n` messages."
    rng = random.Random(seed)
    orders = [tuple(range(n)), tuple(reversed(range(n)))]
    while len(orders) < k + 2:
        o = tuple(rng.sample(range(n), n))
        if o not in orders: orders.append(o)
    return orders


@pytest.mark.parametrize('name', list(SCENARIOS))
def test_the_store_agrees_with_the_in_memory_state(sqlite_engine, name):
    """Sampled orderings through the real store, one message per `process_messages` call (incremental refresh, unique
    constraints): each ends in the state the in-memory rules give, so the exhaustive in-memory check speaks for the store."""
    msgs = SCENARIOS[name]
    expected = memory_state(msgs, range(len(msgs)))
    assert sum(map(len, expected.values())) > len(msgs)   # the comparison has content
    with sqlite_engine.connect() as conn:
        for order in sample_orders(len(msgs), 10, seed=len(name)):
            tx = conn.begin()
            for arrival, i in enumerate(order):   # one message at a time, as a live feed delivers them
                s = process_messages(conn, [(arrival + 1, msgs[i], T0 + timedelta(days=arrival))], KEY)
                assert s.errors == 0
            assert snapshot(conn) == expected, f'{name}: arrival order {order}'
            tx.rollback()


def test_scenarios_end_in_the_right_state(sqlite_engine):
    with sqlite_engine.begin() as conn:
        for k, (name, msgs) in enumerate(SCENARIOS.items()):
            process_messages(conn, [(100 * k + i, m, T0) for i, m in enumerate(reversed(msgs))], KEY)
        q = lambda sql: conn.execute(sa.text(sql)).all()
        assert q("select status, ward, discharge_time from encounters where encounter_id='E4'") == [('cancelled', None, None)]
        assert q("select count(*) from location_visits where encounter_id='E4'") == [(0,)]
        assert q("select status, ward from encounters where encounter_id='E1'") == [('admitted', 'ICU')]
        assert q("select status from lab_orders where order_id='O3'") == [('cancelled',)]
        assert q("select status from lab_orders where order_id='O2'") == [('resulted',)]
        assert [r[0] for r in q("select family_name from patient_identity where mrn='NEW'")] == ['Smythe']
        retired, surviving = (q(f"select patient_key from patient_identity where mrn='{m}'")[0][0] for m in ('OLD', 'NEW'))
        assert q('select patient_key, resolved_key from patient_links') == [(retired, surviving)]
        assert q("select count(*) from patient_identity where mrn='OLD'")[0][0] == 1   # nothing deleted
        assert sorted(q("select status, value from lab_results where order_id='O1'")) == [('C', 12.5), ('F', 11.5), ('P', 11.0)]


def test_the_lifecycle_scenario_in_detail(sqlite_engine):
    with sqlite_engine.begin() as conn:
        process_messages(conn, [(i, m, T0) for i, m in enumerate(SCENARIOS['encounter lifecycle'])], KEY)
        assert conn.execute(sa.text("select status, ward, discharge_time from encounters")).all() == [('admitted', 'ICU', None)]
        assert [r[0] for r in conn.execute(sa.text('select ward from location_visits order by visit'))] == ['MED1', 'ICU']


def test_labels_and_features_use_the_newest_result_known_at_the_time(sqlite_engine):
    from cde_workbench.features import load_feature_data
    from cde_workbench.tasks import lab_abnormal_points
    with sqlite_engine.begin() as conn:
        process_messages(conn, [(i + 1, m, at(h)) for i, (m, h) in enumerate(zip(SCENARIOS['result corrected'], (1, 2, 3, 9, 0, 20)))], KEY)
    with sqlite_engine.connect() as conn:
        label = lambda t: lab_abnormal_points(conn, 'HGB', as_of=t).filter(__import__('polars').col('order_id') == 'O1')['label'][0]
        assert label(at(2.5)) is None            # only the preliminary result: no label yet
        assert label(at(5)) == 1                 # final 11.5 is below 12
        assert label(at(10)) == 0                # corrected to 12.5
        ev = load_feature_data(conn).events.filter(kind='lab')
        assert sorted(ev['value'].to_list()) == [11.0, 11.5, 12.5] and ev['valid_until'].null_count() == 1


def test_processing_errors_are_recorded_and_the_rest_goes_on(sqlite_engine, tmp_path, monkeypatch):
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    store_messages(sqlite_engine, [(oru('e1', 'O9', 2, 'twelve', 'F'), T0, 't'), (adt('e2', 'A01', 0, enc='E9', ward='MED1'), T0, 't')])
    s = process_pending(sqlite_engine, key=KEY)
    assert (s.messages, s.errors) == (2, 1)
    with sqlite_engine.connect() as conn:
        reason = conn.execute(sa.text('select reason from processing_errors where seq=1')).scalar()
        assert "OBX-5 'twelve'" in reason and 'not a number' in reason
        assert conn.execute(sa.text("select count(*) from encounters where encounter_id='E9'")).scalar() == 1
    assert process_pending(sqlite_engine, key=KEY).messages == 0   # the cursor moved past both


def test_resumable_processing_and_replay_rebuild_identical_tables(store_url, tmp_path, monkeypatch):
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    live = get_engine(store_url)
    feed = hl7_feed(generate(HospitalConfig(n_patients=60, seed=4, start='2023-10-01')))
    extra = [m for msgs in SCENARIOS.values() for m in msgs]
    items = [(m, t, 'live') for t, m in feed] + [(m, T0, 'live') for m in extra]
    for i in range(0, len(items), 97):   # arrives in pieces, processed after each piece, in small batches
        store_messages(live, items[i:i + 97])
        process_pending(live, batch=40, key=KEY)
    target = get_engine(f'sqlite:///{tmp_path}/replayed.sqlite')
    s = replay(live, target, key=KEY)
    assert s.messages == len(items)
    a, b = table_checksums(live), table_checksums(target)
    assert a == b and int(a['lab_results'].split(':')[0]) > 100
    with pytest.raises(Exception, match='not empty'):
        replay(live, target, key=KEY)


def tricky():
    "Messages the one-pass rebuild must hand to the full parser, or that the processor refuses."
    a01 = adt('t1', 'A01', 3, mrn='M9', enc='E9', ward='MED1')
    short_obx = oru('t7', 'O8', 6, '9.5', 'F', mrn='M9', enc='E9').rsplit('|', 9)[0]   # OBX without OBX-8 onwards
    return [
        adt('t0', 'A01', 2, mrn='M8', enc='E8', ward='MED1', family='O|Brien'),                        # an escape sequence
        a01.replace('|M9^^^HOSP^MR|', '|M9^^^HOSP^MR~X9^^^OTHER^MR|'),                                   # a repetition
        oru('t2', 'O9', 4, 'twelve', 'F', mrn='M9', enc='E9'),                                           # a processing error
        join_segments([msh('ADT', 'A04', 't3', at(5)), pid('M9')]),                                      # a type not processed
        adt('t4', 'A02', 29 * 24 + 5, mrn='M9', enc='E9', ward='ICU'),                                   # MSH-7 on a 30th
        oru('t5', 'O9', 7, '10.5^x', 'C', mrn='M9', enc='E9'),                                           # OBX-5 with components
        short_obx,
        join_segments([msh('ADT', 'A34', 't6', at(8)), segment('EVN', 'A34', format_ts(at(8))), pid('M9'), segment('MRG', 'M8')]),
        adt('t8', 'A08', 9, mrn='M9', enc='E9', ward='ICU').replace('|19500102|', '||'),                  # no birth date
        adt('t9', 'A03', 10, mrn='M9', enc='', ward='ICU'),                                              # no visit number
    ]


def noisy_live(tmp_path, monkeypatch):
    "A live SQLite store holding a noisy feed (duplicates, late messages, merges), the scenarios and the tricky messages."
    monkeypatch.setenv('CDE_SITE_KEY_FILE', str(tmp_path / 'site.key'))
    live = get_engine(f'sqlite:///{tmp_path}/live.sqlite')
    feed = hl7_feed(generate(HospitalConfig(n_patients=150, seed=8, start='2023-10-01', duplicate_rate=0.05, late_rate=0.1, merge_rate=0.5,
                                            malformed_rate=0.02)))
    items = [(m, t, 'live') for t, m in feed] + [(m, T0, 'live') for msgs in SCENARIOS.values() for m in msgs] + [(m, T0, 'live') for m in tricky()]
    store_messages(live, items)
    return live


@pytest.mark.parametrize('bounds', [(None, None), (40, 300)])
def test_one_pass_rebuild_equals_processing_batch_by_batch(tmp_path, monkeypatch, bounds):
    from cde_workbench.rebuild import _copy_and_process, _rebuild_sqlite
    from cde_workbench.store import ids_messages, processor_state
    live = noisy_live(tmp_path, monkeypatch)
    fast, slow = (get_engine(f'sqlite:///{tmp_path}/{n}.sqlite') for n in ('fast', 'slow'))
    a = _rebuild_sqlite(live, fast, *bounds, batch=64, key=KEY)   # several batches
    b = _copy_and_process(live, slow, *bounds, batch=50, key=KEY)
    assert (a.messages, a.errors, a.last_seq, a.rows) == (b.messages, b.errors, b.last_seq, b.rows)
    assert a.messages == (261 if bounds[0] else len(live_seqs(live)))
    if bounds[0] is None: assert a.errors >= 3 and a.rows['mrn_merges'] > 3   # the tricky messages and the merges took part
    tables = (*DERIVED_TABLES, ids_messages, processor_state)
    assert table_checksums(fast, tables, source=None, ignore=('id', 'at', 'updated_at')) == table_checksums(slow, tables, source=None, ignore=('id', 'at', 'updated_at'))
    assert process_pending(fast, key=KEY).messages == 0   # the cursor is where processing would have left it


def live_seqs(engine):
    with engine.connect() as c: return c.execute(sa.text('select seq from ids_messages')).scalars().all()


@pytest.mark.parametrize('table', ['lab_results', 'lab_orders'])
def test_a_failed_rebuild_leaves_the_target_empty_and_as_it_was(tmp_path, monkeypatch, table):
    "A failure while facts are written (the writer thread) or while the state is: everything rolls back, indexes and PRAGMAs too."
    import gc
    live = noisy_live(tmp_path, monkeypatch)
    target = get_engine(f'sqlite:///{tmp_path}/target.sqlite')
    with target.begin() as c:
        c.execute(sa.text(f"CREATE TRIGGER full BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"))
    schema = lambda: target.connect().execute(sa.text('select type, name, sql from sqlite_master order by name')).all()
    before = schema()
    with pytest.raises(Exception, match='disk is full'): replay(live, target, batch=64, key=KEY)
    assert schema() == before and gc.isenabled()
    with target.connect() as c:
        assert all(c.execute(sa.text(f'select count(*) from {t.name}')).scalar() == 0 for t in DERIVED_TABLES)
        assert c.execute(sa.text('select count(*) from ids_messages')).scalar() == 0
        assert c.execute(sa.text('PRAGMA synchronous')).scalar() == 2   # FULL again for whoever uses the connection next
        c.execute(sa.text('DROP TRIGGER full')); c.commit()
    process_pending(live, batch=40, key=KEY)
    replay(live, target, key=KEY)   # done again, it succeeds, and equals the live-built tables
    assert table_checksums(target) == table_checksums(live)
