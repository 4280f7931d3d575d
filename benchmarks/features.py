"""Point-in-time count features: the full transform path (events table → integer codes → window search → CSR) against a
pandas merge-and-filter baseline on the same synthetic events and points.

Each side runs in a fresh subprocess. Peak memory is the process's resident high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs once the input exists) minus its resident size with the input loaded: the extra memory the
transform needs. The input is a polars table of events (patient key and token code dictionary-encoded, event and stored
times, grouped by patient in time order as `load_feature_data` returns them) and a table of prediction points.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PARAMS = dict(n_patients=100_000, n_events=20_000_000, n_points=200_000, vocab=15_000, days=14, seed=1, grouped=True)


def _status(field: str) -> int:
    "A memory figure of this process in bytes from /proc/self/status (VmRSS, VmHWM)."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'): return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def _reset_peak():
    "Reset VmHWM to the current resident size (Linux ≥ 4.0)."
    Path('/proc/self/clear_refs').write_text('5')


def _arrays(n_patients, n_events, n_points, vocab, days, seed, grouped=True):
    "Events grouped by patient in time order, each stored up to 12 h after it happened (5% up to 20 days later); random points."
    rng = np.random.default_rng(seed)
    span = 365 * 86400
    t0 = 1_700_000_000
    ev_pid = np.sort(rng.integers(0, n_patients, n_events)).astype(np.int64)
    ev_sec = rng.integers(0, span, n_events).astype(np.int64)
    order = np.lexsort((ev_sec, ev_pid)); ev_sec = ev_sec[order] + t0; del order
    delay = rng.integers(0, 12 * 3600, n_events)
    late = rng.random(n_events) < 0.05
    delay[late] = rng.integers(0, 20 * 86400, int(late.sum()))
    ev_stored = ev_sec + delay
    ev_tok = rng.integers(0, vocab, n_events).astype(np.int64)
    pt_pid = rng.integers(0, n_patients, n_points).astype(np.int64)
    pt_sec = rng.integers(0, span, n_points).astype(np.int64) + t0
    if not grouped:   # events in arbitrary order (e.g. straight from a warehouse file): the transform sorts them once
        o = rng.permutation(n_events); ev_pid, ev_sec, ev_stored, ev_tok = ev_pid[o], ev_sec[o], ev_stored[o], ev_tok[o]
    return ev_pid, ev_sec, ev_stored, ev_tok, pt_pid, pt_sec


def _digest(m) -> dict:
    m = m.tocsr(); m.sum_duplicates(); m.sort_indices()
    h = hashlib.sha256()
    for a in (m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.astype(np.float64)): h.update(a.tobytes())
    return {'nnz': int(m.nnz), 'sha256': h.hexdigest(), 'shape': list(m.shape)}


def run_ours(p: dict) -> dict:
    "Our transform: FeatureData from the events table, CountFeaturizer.transform to CSR."
    import polars as pl
    from cde_workbench.features import FeatureData
    from cde_workbench.featurizer import CountFeaturizer
    ev_pid, ev_sec, ev_stored, ev_tok, pt_pid, pt_sec = _arrays(**p)
    T = pl.Datetime('us', 'UTC')
    pkeys = [f'P{i:06d}' for i in range(p['n_patients'])]
    toks = [f'T{i:05d}' for i in range(p['vocab'])]
    pk_enum, tok_enum = pl.Enum(pkeys), pl.Enum(toks)
    events = pl.DataFrame({
        'patient_key': pl.Series(pkeys, dtype=pk_enum).gather(ev_pid),
        'kind': pl.Series(['med'], dtype=pl.Enum(['med'])).gather(np.zeros(len(ev_pid), np.int64)),
        'code': pl.Series(toks, dtype=tok_enum).gather(ev_tok),
        'event_time': pl.Series(ev_sec * 1_000_000).cast(T), 'stored_time': pl.Series(ev_stored * 1_000_000).cast(T)})
    points = pl.DataFrame({'patient_key': pl.Series(pkeys).gather(pt_pid), 'prediction_time': pl.Series(pt_sec * 1_000_000).cast(T)})
    patients = pl.DataFrame(schema={'patient_key': pl.String, 'birth_year': pl.Int64, 'sex': pl.String, 'race_ethnicity': pl.String})
    del ev_pid, ev_sec, ev_stored, ev_tok
    fz = CountFeaturizer(demographics=False, diagnoses=False, medication_days=p['days'], lab_days=None)
    # the vocabulary is fitted on a slice of the events (patients of the first 4,000,000 events): every token occurs there
    head = events.head(4_000_000) if p.get('grouped', True) else events.sort('patient_key').head(4_000_000)
    fz.fit(points.filter(pl.col('patient_key').is_in(head['patient_key'].cast(pl.String).unique().to_list())), FeatureData(patients, head))
    assert len(fz.vocabulary_) == p['vocab'], len(fz.vocabulary_)
    del head
    import gc; gc.collect()
    rss_input = _status('VmRSS'); _reset_peak()
    t0 = time.perf_counter()
    X = fz.transform(points, FeatureData(patients, events))
    secs = time.perf_counter() - t0
    peak = _status('VmHWM')
    return {'seconds': secs, 'peak_extra_bytes': peak - rss_input, 'input_rss_bytes': rss_input, **_digest(X)}


def run_pandas(p: dict) -> dict:
    "Baseline: pandas merge of points with their patients' events, filter to the window and stored-by-T, count per (point, token)."
    import pandas as pd
    import scipy.sparse as sp
    ev_pid, ev_sec, ev_stored, ev_tok, pt_pid, pt_sec = _arrays(**p)
    ev = pd.DataFrame({'pid': ev_pid, 'sec': ev_sec, 'stored': ev_stored, 'tok': ev_tok})
    pts = pd.DataFrame({'pid': pt_pid, 'T': pt_sec, 'point': np.arange(len(pt_pid))})
    del ev_pid, ev_sec, ev_stored, ev_tok
    import gc; gc.collect()
    rss_input = _status('VmRSS'); _reset_peak()
    t0 = time.perf_counter()
    j = pts.merge(ev, on='pid')
    j = j[(j['sec'] <= j['T']) & (j['sec'] > j['T'] - p['days'] * 86400) & (j['stored'] <= j['T'])]
    c = j.groupby(['point', 'tok']).size()
    m = sp.coo_matrix((c.values.astype(np.float64), (c.index.get_level_values(0), c.index.get_level_values(1))), shape=(len(pts), p['vocab'])).tocsr()
    secs = time.perf_counter() - t0
    peak = _status('VmHWM')
    return {'seconds': secs, 'peak_extra_bytes': peak - rss_input, 'input_rss_bytes': rss_input, **_digest(m)}


def _subprocess(side: str, p: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, '--side', side, json.dumps(p)], capture_output=True, text=True, check=False)
    if out.returncode: raise RuntimeError(f'{side} benchmark failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_count_features(**overrides) -> dict:
    "Time and peak memory of our transform and of the pandas baseline, each in a fresh subprocess; same result checked."
    p = {**PARAMS, **overrides}
    ours, base = _subprocess('ours', p), _subprocess('pandas', p)
    if (ours['nnz'], ours['sha256']) != (base['nnz'], base['sha256']):
        raise AssertionError(f'the transform disagrees with the pandas baseline: {ours} vs {base}')
    gb = lambda b: round(b / 1e9, 3)
    what = (f"{p['n_events']:,} events ({'grouped by patient in time order' if p['grouped'] else 'in arbitrary order'}), {p['n_points']:,} points, {p['vocab']:,}-token vocabulary, {p['days']}-day window; "
            f"baseline: pandas merge + filter + groupby; fresh subprocess per side")
    return {
        'count_features_seconds': {'value': round(ours['seconds'], 3), 'unit': 's', 'baseline': round(base['seconds'], 3),
                                   'ratio': round(base['seconds'] / ours['seconds'], 1), 'note': what + f"; {ours['nnz']:,} non-zeros, identical"},
        'count_features_peak_memory': {'value': gb(ours['peak_extra_bytes']), 'unit': 'GB', 'baseline': gb(base['peak_extra_bytes']),
                                       'ratio': round(base['peak_extra_bytes'] / max(ours['peak_extra_bytes'], 1), 1),
                                       'note': f"resident high-water mark (VmHWM) minus resident size with the input loaded "
                                               f"(input: ours {gb(ours['input_rss_bytes'])} GB, baseline {gb(base['input_rss_bytes'])} GB process RSS)"}}


def bench_count_features_ungrouped() -> dict:
    "The same figures with the events in arbitrary order, so the transform's one-off sort is counted."
    return {k.replace('count_features', 'count_features_ungrouped'): v for k, v in bench_count_features(grouped=False).items()}


if __name__ == '__main__':
    if len(sys.argv) > 2 and sys.argv[1] == '--side':
        p = json.loads(sys.argv[3])
        print(json.dumps(run_ours(p) if sys.argv[2] == 'ours' else run_pandas(p)))
    else:   # `--ungrouped`: events in arbitrary order, so the transform's one-off sort is part of the figure
        for k, v in bench_count_features(grouped='--ungrouped' not in sys.argv).items(): print(k, v)
