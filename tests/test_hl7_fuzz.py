"""Bounded fuzz test of the HL7 v2 parser: whatever bytes arrive, parse_message and parse_batch either return or raise
IngestError (never another exception), and an acknowledgement can always be built and parses.

Fixed seed, a few thousand cases (byte flips, delimiter and control-byte insertions, deletions, truncations,
duplicated and spliced slices, pure junk), a few seconds. Seeds: the workbench's synthetic feed, a batch, a message
with every escape, and the public conformance messages when ../shared/data/hl7v2 is present.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from cde_workbench.config import IngestError
from cde_workbench.hl7 import Batch, Message, ack_mode, build_ack, parse_batch, parse_message, split_plain

from conftest import SHARED, in_ci

DATA = SHARED / 'hl7v2' / 'messages'
SPECIAL = [b'|', b'^', b'~', b'\\', b'&', b'#', b'\r', b'\n', b'\r\n', b'\x0b', b'\x1c', b'\x00', b'\xff', b'\xc3', b'\xe2\x80\xa8',
           b'MSH', b'BHS', b'BTS', b'FHS', b'FTS', b'PID', b'""', b'\\X41\\', b'\\H\\', b'\\r', b'+2500', b'.', b'-', b' ', b'\t', '²'.encode()]


def _seeds() -> list[bytes]:
    from cde_workbench.synth import HospitalConfig, generate, hl7_feed
    feed = [m.encode() for _, m in hl7_feed(generate(HospitalConfig(n_patients=40, seed=5)))]
    seeds = feed[:: max(1, len(feed) // 25)]
    seeds.append(b'BHS|^~\\&|A\r' + feed[0] + b'\r' + feed[1] + b'\rBTS|2')
    seeds.append(b'FHS|^~\\&\rBHS|^~\\&\r' + feed[2] + b'\rBTS|1\rFTS|1')
    seeds.append(b'MSH|^~\\&#|A|B|C|D|20240101||ADT^A01|X1|P|2.7|||ER|AL\rPID|1||M1^^^H&1.2&ISO^MR||O\\F\\B^A\\S\\B\\X41\\~R\\R\\1')
    if DATA.exists(): seeds += [p.read_bytes() for p in sorted(DATA.glob('*.hl7'))]
    else: assert not in_ci(), f'{DATA} is missing; CI is set, so the fuzz seeds must include the public messages'
    return seeds


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        op = rng.randrange(8)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b: b[min(i, len(b) - 1)] = rng.randrange(256)                         # flip a byte
        elif op == 1: b[i:i] = rng.choice(SPECIAL)                                           # insert a delimiter / control
        elif op == 2 and b: del b[i:i + rng.randrange(1, 12)]                                # delete a run
        elif op == 3: b = b[:i]                                                              # truncate
        elif op == 4 and b: j = rng.randrange(len(b)); b[i:i] = b[j:j + rng.randrange(1, 40)]  # duplicate a slice
        elif op == 5: o = rng.choice(seeds); b[i:i] = o[rng.randrange(len(o) + 1):]           # splice another message in
        elif op == 6: b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))  # junk
        elif op == 7 and b: b = b[i:]                                                        # lose the head
    return bytes(b)


def _exercise(m: Message | Batch) -> None:
    "Everything a caller might read must work on whatever parsed."
    msgs = m.messages if isinstance(m, Batch) else [m]
    for x in msgs:
        assert x.message_type and x.control_id and len(x.sha256) == 64
        for s in x.segments:
            for n in range(1, len(s) + 2):
                x.field(s, n); x.field(s, n, 2, 2, 1)
        parse_message(build_ack(x, 'CA' if ack_mode(x) == 'enhanced' else 'AA', 'ok'), 'ack')


def test_fuzz_only_ingest_errors():
    rng = random.Random(20240501)
    seeds = _seeds()
    cases = [b'', b'MSH', b'MSH|', b'MSH\r', b'MSH\rPID|1', b'xMSH', b'MSH|^~\\&', b'MSH|^~\\&|', b'BHS', b'BHS|^~\\&', b'FHS|^~\\&\rFTS',
             b'\x0b\x1c\r', b'MSH|^~\\&|A|B|C|D|20240230||ADT^A01|1|P|2.5', b'MSH|^~\\&|A|B|C|D|20240101||ADT^A01|\\X\\|P|2.5']
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60))) for _ in range(200)]
    cases += [b'MSH' + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) for _ in range(200)]
    cases += [_mutate(rng, rng.choice(seeds), seeds) for _ in range(3600)]
    t0 = time.perf_counter()
    outcomes = {'parsed': 0, 'refused': 0}
    for i, raw in enumerate(cases):
        for parse in (parse_message, parse_batch):
            try: m = parse(raw, f'case {i}')
            except IngestError as e:
                reason = str(e)
                assert reason.startswith(f'case {i}') and '\n' not in reason, reason
                outcomes['refused'] += 1
                ack = parse_message(build_ack(None, 'AR', reason, raw=raw), 'ack')
                assert ack.field('MSA', 1) in ('AR', 'CR') and ack.field('ERR', 7) == reason
            except Exception as e:  # noqa: BLE001 - the point of the test
                raise AssertionError(f'{parse.__name__} raised {type(e).__name__}: {e} on case {i}: {raw[:200]!r}') from e
            else:
                outcomes['parsed'] += 1
                _exercise(m)
    assert time.perf_counter() - t0 < 30
    assert outcomes['parsed'] > 200 and outcomes['refused'] > 2000, outcomes  # the mutations reach both sides


def test_split_plain_only_for_messages_parse_message_reads_the_same():
    "The trusted fast path (replay) returns segments only for a message parse_message accepts, the very same segments,"
    "with nothing to decode (no escapes, no repetitions): so a component is a plain split."
    rng = random.Random(7)
    seeds = _seeds()
    plain = [s.replace(b'20240101|', b'20240101120000|') for s in seeds]   # a full MSH-7 keeps more seeds plain
    cases = plain + [_mutate(rng, rng.choice(plain), seeds) for _ in range(4000)]
    taken = 0
    for i, raw in enumerate(cases):
        segs = split_plain(raw)
        if segs is None: continue
        taken += 1
        m = parse_message(raw, f'case {i}')   # must not raise
        assert m.segments == segs, i
        assert (m.field_sep, m.component_sep, m.repetition_sep, m.escape_char, m.subcomponent_sep, m.truncation_char) == ('|', '^', '~', '\\', '&', '')
        for s in segs:
            for n, v in enumerate(s):
                if n == 0 or (s[0] == 'MSH' and n == 1): continue   # the segment ID; MSH-2, the encoding characters
                assert '\\' not in v and '~' not in v, (i, s[0], n)
                comps = v.split('^')
                for c in range(1, len(comps) + 2):
                    assert m.field(s, n + 1 if s[0] == 'MSH' else n, c) == (comps[c - 1] if c <= len(comps) else ''), (i, s[0], n, c)
    assert taken > 500, taken   # many stay plain (about 800 of 4,000 with this seed)
