"""Sizing figures for the README's "When to move from the embedded default to PostgreSQL + Airflow", computed from a demo store.

    python benchmarks/sizing.py [STORE_URL]     # default: the workspace's store (after `make demo`: var/cde.sqlite)

How each figure is computed (printed with its inputs, so the README's numbers can be checked):
- the simulated period: first to last ADT event in the store (the warehouse years, then the HL7 feed months);
- occupied beds: the hospital's mean census, i.e. the sum of every stay's hours inside the period (admission to
  discharge, or to the period's end for a stay still open) divided by the period's hours. "Per 1,000 beds" scales by
  1,000 / mean census (a full hospital: every bed occupied);
- rows per day: every row of the clinical fact tables (tables with an event time: ADT events, encounters, location
  visits, diagnoses, medication orders, lab orders and their events, lab results, patient facts, merges) divided by the
  period's days, per 1,000 beds; the raw HL7 messages exist only for the feed months, so they are counted per day
  of those months (received time), per 1,000 beds;
- store growth per year: the store's size on disk (SQLite: pages in use; PostgreSQL: pg_database_size) divided by the
  period's days, times 365, per 1,000 beds, plus the raw messages' bytes at the feed months' rate (a site whose every
  fact arrives over HL7 keeps its raw message too; the warehouse years came in as an extract, without one);
- scheduled runs per hour: every deployment's cron times (deployments/*/deployment.toml, `scheduled_runs`) over 28
  days, divided by 672 hours: a property of the deployments, not the beds; order-triggered scorings per hour: the
  inference packets per hour of simulated time (their prediction times), per 1,000 beds, for the one deployment the demo scores live.
"""
from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    from croniter import croniter
    from cde_workbench.config import Workspace
    from cde_workbench.deployment import load_deployment
    from cde_workbench.store import encounters, get_engine, ids_messages, inferences, metadata
    ws = Workspace.from_env()
    url = argv[0] if argv else ws.database_url
    engine = get_engine(url)
    facts = [t for t in metadata.sorted_tables if 'event_time' in t.c and 'stored_time' in t.c]
    utc = lambda t: t if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc)
    with engine.connect() as c:
        adt = metadata.tables['adt_events']
        start, end = (utc(x) for x in c.execute(sa.select(sa.func.min(adt.c.event_time), sa.func.max(adt.c.event_time))).one())
        if start is None: print(f'{url}: no ADT events; run `make demo` first', file=sys.stderr); return 2
        rows = {t.name: c.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in facts}
        stays = c.execute(sa.select(encounters.c.admit_time, encounters.c.discharge_time)).all()
        msg_n, msg_bytes, m0, m1 = c.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sa.func.length(ids_messages.c.raw)), 0),
                                                       sa.func.min(ids_messages.c.received_time), sa.func.max(ids_messages.c.received_time))).one()
        inf_n, i0, i1 = c.execute(sa.select(sa.func.count(), sa.func.min(inferences.c.prediction_time), sa.func.max(inferences.c.prediction_time))).one()
        if engine.dialect.name == 'sqlite':
            size = c.exec_driver_sql('PRAGMA page_count').scalar() * c.exec_driver_sql('PRAGMA page_size').scalar() \
                   - c.exec_driver_sql('PRAGMA freelist_count').scalar() * c.exec_driver_sql('PRAGMA page_size').scalar()
        else:
            size = c.execute(sa.text('select pg_database_size(current_database())')).scalar()
    hours = (end - start).total_seconds() / 3600
    days = hours / 24
    bed_hours = sum(max(0.0, (min(utc(d) or end, end) - max(utc(a), start)).total_seconds() / 3600) for a, d in stays if a is not None)
    census = bed_hours / hours
    per1k = 1000 / census
    fact_rows = sum(rows.values())
    m0, m1 = utc(m0), utc(m1)
    feed_days = (m1 - m0).total_seconds() / 86400 if msg_n else 0
    deps = [load_deployment(p.parent.name, ws.deployments) for p in sorted(Path(ws.deployments).glob('*/deployment.toml'))]
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    fires = 0
    for d in deps:
        for cron in d.scheduled_runs().values():
            it = croniter(cron, t0 - timedelta(seconds=1))
            while it.get_next(datetime) < t0 + timedelta(days=28): fires += 1
    print(f'store {engine.url.render_as_string(hide_password=True)}: {size / 1e6:.1f} MB')
    print(f'period {start:%Y-%m-%d} to {end:%Y-%m-%d}: {days:.0f} days; {len(stays)} stays, mean census {census:.1f} occupied beds')
    print(f'clinical fact rows {fact_rows:,} ({", ".join(f"{k} {v:,}" for k, v in sorted(rows.items(), key=lambda kv: -kv[1]))})')
    print(f'rows per day per 1,000 beds: {fact_rows / days * per1k:,.0f}')
    if msg_n:
        print(f'raw HL7 messages: {msg_n:,} over {feed_days:.0f} feed days, {msg_bytes / 1e6:.1f} MB: '
              f'{msg_n / feed_days * per1k:,.0f} messages and {msg_bytes / feed_days * per1k / 1e6:.1f} MB per day per 1,000 beds')
    growth = size / days * 365 * per1k + (msg_bytes / feed_days * 365 * per1k if msg_n else 0)
    print(f'store growth per year per 1,000 beds: {size / days * 365 * per1k / 1e9:.2f} GB (store) '
          f'+ {(msg_bytes / feed_days * 365 * per1k if msg_n else 0) / 1e9:.2f} GB (raw messages) = {growth / 1e9:.2f} GB')
    print(f'scheduled notebook runs per hour: {fires / 672:.2f} ({fires} cron times in 28 days, {sum(len(d.scheduled_runs()) for d in deps)} scheduled notebooks of {len(deps)} deployments)')
    if inf_n and i0 and i1:
        ih = (utc(i1) - utc(i0)).total_seconds() / 3600
        print(f'scorings per hour per 1,000 beds (one deployment, order-triggered and catch-up): {inf_n / ih * per1k:.1f} ({inf_n:,} packets over {ih / 24:.0f} days)')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
