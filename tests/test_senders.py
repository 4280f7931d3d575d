"""Issue 9, items 1-3: a readable message is stored and acknowledged whatever its identifiers look like; the sender
identifier policy (var/settings/senders.toml) decides which PID-3 identifier is the MRN, and without one the message
is held with its reason; `redrive` processes held messages after the policy changes, and the result equals a replay
of the whole store from scratch."""
import asyncio
from datetime import datetime, timedelta, timezone

import pytest
import polars as pl
import sqlalchemy as sa

from cde_workbench.events import process_pending, redrive, table_checksums
from cde_workbench.ingest_status import ingest_reasons
from cde_workbench.ids import store_messages
from cde_workbench.mllp import MLLPReceiver, send_messages
from cde_workbench.rebuild import replay
from cde_workbench.senders import SenderPolicy, SenderRule
from cde_workbench.store import audit_log, dispose_engines, encounters, get_engine, lab_orders, patient_identity, processing_errors

from conftest import cde, one_line_error  # noqa: E402

KEY = bytes(range(32))
T0 = datetime(2024, 3, 1, 8, tzinfo=timezone.utc)


def _adt(app, fac, cid, pid3, enc, t='20240301080000', event='A01', ward='MED1', v='2.5'):
    return '\r'.join([f'MSH|^~\\&|{app}|{fac}|CDE|CDE|{t}||ADT^{event}|{cid}|P|{v}', f'EVN|{event}|{t}', f'PID|1||{pid3}||Doe^Jo||19700101|F',
                      'PV1|' + '|'.join(['1', 'I', ward] + [''] * 15 + [enc])])


def _oru(app, fac, cid, pid3, oid, enc, t='20240301100000'):
    return '\r'.join([f'MSH|^~\\&|{app}|{fac}|CDE|CDE|{t}||ORU^R01|{cid}|P|2.5', f'PID|1||{pid3}||Doe^Jo||19700101|F',
                      'PV1|' + '|'.join(['1', 'I', 'MED1'] + [''] * 15 + [enc]), f'OBR|1|{oid}||CBC|||20240301090000',
                      'OBX|1|NM|718-7^Hemoglobin^LN||9.5|g/dL|12-16|L|||F|||20240301090000'])


FEED = [
    _adt('LAB', 'NORTH', 'L1', 'N1^^^', 'EN1'),                                   # no authority (v2.5): held without a policy
    _oru('LAB', 'NORTH', 'L2', 'N1^^^', 'ON1', 'EN1'),
    _adt('RIS', 'WEST', 'R1', 'W1^^^', 'EW1'),                                    # a second sender, no policy ever: stays held
    _adt('EPIC', 'MAIN', 'E1', '999^^^NHS^NH~E1^^^MAIN^PI', 'EE1'),               # repeating PID-3, none typed MR
    _adt('HIS', 'HOSP', 'H1', 'H1^^^HOSP^MR', 'EH1'),                             # the usual case: processed at once
    _adt('LAB', 'NORTH', 'L3', 'N1^^^', 'EN1', t='20240302080000', event='A03'),  # the discharge, held like the admission
    _adt('EPIC', 'MAIN', 'E2', 'E2^^^MAIN^PI', 'EE2'),                            # one identifier: processed, MRN E2
    _adt('EPIC', 'MAIN', 'E3', 'X9^^^OTHER^MR', 'EE3'),                           # processed now; the policy below excludes it
]
POLICY = SenderPolicy((SenderRule('LAB', 'NORTH', authority='NORTH_MRN', identifier_type='MR'), SenderRule('EPIC', 'MAIN', mrn_authority='MAIN')),
                      'test policy')


@pytest.fixture
def engine(tmp_path):
    eng = get_engine(f'sqlite:///{tmp_path}/live.sqlite')
    yield eng
    dispose_engines()


def _held(eng) -> list[tuple]:
    with eng.connect() as c:
        return c.execute(sa.text('select m.sending_app, m.sending_facility, m.message_type, e.reason from processing_errors e '
                                 'join ids_messages m on m.seq = e.seq where e.resolved_at is null order by e.seq')).all()


def test_stored_held_with_reasons_then_redriven_equal_to_replay(engine, tmp_path):
    out = store_messages(engine, [(m, T0 + timedelta(minutes=i), 'test') for i, m in enumerate(FEED)])
    assert [o.status for o in out] == ['stored'] * len(FEED)    # every readable message is stored: its ACK is AA
    s = process_pending(engine, key=KEY)
    assert (s.messages, s.errors) == (8, 5)
    held = _held(engine)
    assert [h[:3] for h in held] == [('LAB', 'NORTH', 'ADT^A01'), ('LAB', 'NORTH', 'ORU^R01'), ('RIS', 'WEST', 'ADT^A01'),
                                     ('EPIC', 'MAIN', 'ADT^A01'), ('LAB', 'NORTH', 'ADT^A03')]
    assert "'N1' has no assigning authority" in held[0][3] and 'sender LAB^NORTH has no policy giving one' in held[0][3]
    assert 'sender RIS^WEST has no policy giving one' in held[2][3]
    assert "holds 2 identifiers ('999' (NH, NHS), 'E1' (PI, MAIN))" in held[3][3] and 'no policy naming the MRN' in held[3][3]
    with engine.connect() as c:
        assert c.execute(sa.select(encounters.c.encounter_id).order_by(encounters.c.encounter_id)).scalars().all() == ['EE2', 'EE3', 'EH1']
        groups = ingest_reasons(c).filter(pl.col('state') == 'held')   # visible per sender and type; one cause, one row
    assert sorted(groups.select('sending_app', 'sending_facility', 'message_type', 'count').rows()) == [
        ('EPIC', 'MAIN', 'ADT^A01', 1), ('LAB', 'NORTH', 'ADT^A01', 1), ('LAB', 'NORTH', 'ADT^A03', 1), ('LAB', 'NORTH', 'ORU^R01', 1),
        ('RIS', 'WEST', 'ADT^A01', 1)]
    assert groups.filter(pl.col('sending_app') == 'LAB', pl.col('message_type') == 'ADT^A01')['reason'].item() == (
        "PID-3 identifier … has no assigning authority (from v2.5 one of CX.4, CX.9 or CX.10 must be valued) "
        "and sender LAB^NORTH has no policy giving one")

    # the policy is added for two of the three senders; EPIC's rule now also decides its single identifiers
    r = redrive(engine, key=KEY, policy=POLICY, actor='tester')
    assert (r.held, r.processed, r.still_held) == (5, 4, 1)
    with engine.connect() as c:
        assert dict(c.execute(sa.select(encounters.c.encounter_id, encounters.c.status)).all()) == {
            'EN1': 'discharged', 'EE1': 'admitted', 'EE2': 'admitted', 'EE3': 'admitted', 'EH1': 'admitted'}
        assert c.execute(sa.select(lab_orders.c.status).where(lab_orders.c.order_id == 'ON1')).scalar() == 'resulted'
        assert set(c.execute(sa.select(patient_identity.c.mrn)).scalars()) == {'N1', 'E1', 'E2', 'X9', 'H1'}   # E1: the MRN the policy names
        assert c.execute(sa.select(sa.func.count()).select_from(processing_errors).where(processing_errors.c.resolution == 'processed on re-drive')).scalar() == 4
        a = c.execute(sa.select(audit_log.c.action, audit_log.c.actor, audit_log.c.detail)).all()
    assert [x[:2] for x in a] == [('ingest.redrive', 'tester')] and '"still_held": [3]' in a[0][2]
    assert [h[:2] for h in _held(engine)] == [('RIS', 'WEST')]

    # a replay from scratch with the same policy gives the same tables; EE3 (MR, but not MAIN's) is held there from the start
    fresh = get_engine(f'sqlite:///{tmp_path}/replayed.sqlite')
    rs = replay(engine, fresh, key=KEY, policy=POLICY)
    assert rs.errors == 2
    assert [h[:2] for h in _held(fresh)] == [('RIS', 'WEST'), ('EPIC', 'MAIN')]
    # live, EE3 was processed before the policy existed; a re-drive only touches held messages, so the two differ there
    live, again = table_checksums(engine), table_checksums(fresh)
    assert {t for t in live if live[t] != again[t]} >= {'processing_errors'}

    # the same story without the message the policy would have held: then re-drive and replay agree on every table
    eng2 = get_engine(f'sqlite:///{tmp_path}/live2.sqlite')
    store_messages(eng2, [(m, T0 + timedelta(minutes=i), 'test') for i, m in enumerate(FEED[:7])])
    process_pending(eng2, key=KEY)
    r1 = redrive(eng2, key=KEY, policy=POLICY)
    assert (r1.processed, r1.still_held) == (4, 1)
    before = table_checksums(eng2)
    r2 = redrive(eng2, key=KEY, policy=POLICY)    # idempotent: the one still held stays held, nothing else changes
    assert (r2.held, r2.processed, r2.still_held) == (1, 0, 1) and table_checksums(eng2) == before
    fresh2 = get_engine(f'sqlite:///{tmp_path}/replayed2.sqlite')
    replay(eng2, fresh2, key=KEY, policy=POLICY)
    assert table_checksums(fresh2) == before
    fresh3 = get_engine(f'sqlite:///{tmp_path}/replayed3.sqlite')   # and the general path (processor batch by batch) agrees
    with fresh3.begin() as c: c.execute(sa.text("insert into processor_state (name, last_seq, updated_at) values ('other', 0, '2024-01-01 00:00:00.000000')"))
    replay(eng2, fresh3, batch=2, key=KEY, policy=POLICY)
    assert table_checksums(fresh3) == before


def test_redrive_filters(store_url):
    "The filters choose what is re-driven; on SQLite and PostgreSQL alike."
    engine = get_engine(store_url)
    store_messages(engine, [(m, T0 + timedelta(minutes=i), 'test') for i, m in enumerate(FEED[:6])])
    process_pending(engine, key=KEY)
    assert redrive(engine, key=KEY, policy=POLICY, sender='RIS').held == 1
    assert redrive(engine, key=KEY, policy=POLICY, sender='LAB^SOUTH').held == 0
    r = redrive(engine, key=KEY, policy=POLICY, sender='LAB^NORTH', message_type='ADT^*')
    assert (r.held, r.processed) == (2, 2)
    assert redrive(engine, key=KEY, policy=POLICY, error_like='naming the MRN').processed == 1
    assert redrive(engine, key=KEY, policy=POLICY, error_like='no%authority%LAB').held == 0   # with a %, the pattern is the whole reason (as SQL LIKE)
    assert redrive(engine, key=KEY, policy=POLICY, error_like='%NO ASSIGNING authority%LAB^%').processed == 1   # the ORU
    assert [h[:2] for h in _held(engine)] == [('RIS', 'WEST')]
    dispose_engines()


def test_a_message_without_an_authority_is_acknowledged_aa_over_mllp(engine):
    msgs = [FEED[2].encode(), FEED[2].replace('|R1|', '||').encode()]   # the second has no control id: it cannot be identified
    async def go():
        rx = MLLPReceiver(engine, port=0)
        port = await rx.start()
        try: return await send_messages(msgs, port=port, window=2, timeout=20)
        finally: await rx.close()
    res = asyncio.run(go())
    assert res.acks == {0: 'AA', 1: 'AR'}
    with engine.connect() as c:
        assert c.execute(sa.text('select count(*) from ids_messages')).scalar() == 1
        assert 'MSH-10' in c.execute(sa.text('select reason from ids_dead_letters')).scalar()


def test_cli_holds_then_redrives_after_the_policy_is_added(tmp_path):
    var = tmp_path / 'var'
    env = {'CDE_VAR': str(var)}
    (tmp_path / 'feed.hl7').write_text('\n'.join(FEED[:3]) + '\n', newline='')
    r = cde('ingest', 'file', str(tmp_path / 'feed.hl7'), env=env)
    assert r.returncode == 0 and '3 stored' in r.stdout and '3 processing errors' in r.stdout, r.stdout + r.stderr
    eng = get_engine(f'sqlite:///{var}/cde.sqlite')
    with eng.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(encounters)).scalar() == 0
    settings = var / 'settings'
    settings.mkdir()
    policy = settings / 'senders.toml'

    # a bad policy file: one line naming it and the problem, exit 2, nothing processed
    for text, needles in [('[[sender]]\napplication = "LAB"\nauthorty = "X"\n', ("senders.toml: sender 1: unknown key 'authorty'",)),
                          ('[[sender]]\napplication = "LABX"\nauthority = "X"\n', ("application 'LABX'", 'matches no sender', 'LAB^NORTH')),
                          ('[[sender]\n', ('not valid TOML',)),
                          ('[[sender]]\napplication = "LAB"\n', ('says nothing',))]:
        policy.write_text(text)
        one_line_error(cde('ingest', 'redrive', env=env), *needles)
    with eng.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(encounters)).scalar() == 0

    policy.write_text('[[sender]]\napplication = "LAB"\nfacility = "NORTH"\nauthority = "NORTH_MRN"\n\n'
                      '[[sender]]\napplication = "RIS"\nauthority = "WEST_MRN"\n')
    r = cde('ingest', 'redrive', '--sender', 'RIS', '--type', 'ADT^*', '--error-like', 'assigning authority', env=env)
    assert r.returncode == 0 and '1 held messages matched: 1 processed, 0 still held' in r.stdout, r.stdout + r.stderr
    with eng.connect() as c: assert c.execute(sa.select(encounters.c.encounter_id)).scalars().all() == ['EW1']
    r = cde('ingest', 'redrive', env=env)
    assert r.returncode == 0 and '2 held messages matched: 2 processed, 0 still held' in r.stdout, r.stdout + r.stderr
    r = cde('ingest', 'replay', f"sqlite:///{tmp_path / 'rebuilt.sqlite'}", env=env)
    assert r.returncode == 0 and 'rebuilt tables equal the live ones' in r.stdout, r.stdout + r.stderr
    dispose_engines()


def test_rules_written_before_a_senders_first_message_do_not_stop_receiving(tmp_path):
    "A site writes its rules before go-live: receiving applies them; only re-drive asks that every rule match a sender heard from."
    var = tmp_path / 'var'
    env = {'CDE_VAR': str(var)}
    (var / 'settings').mkdir(parents=True)
    (var / 'settings' / 'senders.toml').write_text('[[sender]]\napplication = "LAB"\nfacility = "NORTH"\nauthority = "NORTH_MRN"\n'
                                                    '[[sender]]\napplication = "NEWLAB"\nauthority = "X"\n')   # NEWLAB: not heard from yet
    (tmp_path / 'feed.hl7').write_text('\n'.join(FEED[:2]) + '\n', newline='')
    r = cde('ingest', 'file', str(tmp_path / 'feed.hl7'), env=env)
    assert r.returncode == 0 and '2 stored' in r.stdout and '2 processed, 0 processing errors' in r.stdout, r.stdout + r.stderr
    one_line_error(cde('ingest', 'redrive', env=env), "application 'NEWLAB'", 'matches no sender')


def test_a_merge_retires_the_identifier_the_policy_names(tmp_path):
    "MRG-1 is read by the sender's rule, like PID-3: the merge links the two MRNs, not an MRN and a national number."
    msgs = [_adt('EPIC', 'MAIN', 'M1', '998^^^NHS^NH~E0^^^MAIN^PI', 'EM1'),
            '\r'.join(['MSH|^~\\&|EPIC|MAIN|CDE|CDE|20240302080000||ADT^A40|M2|P|2.5', 'EVN|A40|20240302080000',
                       'PID|1||999^^^NHS^NH~E1^^^MAIN^PI||Doe^Jo||19700101|F', 'MRG|998^^^NHS^NH~E0^^^MAIN^PI'])]
    eng = get_engine(f'sqlite:///{tmp_path}/m.sqlite')
    store_messages(eng, [(m, T0 + timedelta(minutes=i), 'test') for i, m in enumerate(msgs)])
    assert process_pending(eng, key=KEY).errors == 2                  # no policy: both held (which of two identifiers?)
    assert 'PID-3 holds 2 identifiers' in _held(eng)[1][3]
    assert redrive(eng, key=KEY, policy=POLICY).processed == 2
    with eng.connect() as c:
        assert c.execute(sa.text('select retired_mrn, surviving_mrn from mrn_merges')).all() == [('E0', 'E1')]
    fresh = get_engine(f'sqlite:///{tmp_path}/m2.sqlite')
    replay(eng, fresh, key=KEY, policy=POLICY)
    assert table_checksums(fresh) == table_checksums(eng)
    dispose_engines()
