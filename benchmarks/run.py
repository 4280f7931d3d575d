"""Run every benchmark, print each figure with its same-run baseline and ratio, and write var/bench/latest.json.

Figures (each measured in this process, against a baseline measured in the same run):
- bootstrap_auroc: 1,000-resample AUROC bootstrap, n = 20,000, vectorised against a loop of
  sklearn.metrics.roc_auc_score over the same resample indices.
- count_features: point-in-time count features (window search) against a pandas merge-and-filter
  baseline on the same synthetic events and points.
- hl7_parse_extract: our HL7 parser extracting the processor's fields against python-hl7 (and hl7apy).
- replay_rebuild: 200,000 messages rebuilt from the immutable data store, against python-hl7's parse-only rate.
- mllp: live ingest over MLLP with 4 concurrent senders (benchmarks/mllp.py).
- demo stage timings: read from var/bench/demo_stages.json when `make demo` has run (no baseline:
  they are the demo's own wall times on this machine).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cde_workbench.config import var_dir  # noqa: E402


def bench_bootstrap(n=20_000, n_boot=1_000, seed=0):
    from sklearn.metrics import roc_auc_score
    from cde_workbench.evaluate import bootstrap_auroc, bootstrap_indices
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n); s = rng.normal(y * 0.8, 1)
    t0 = time.perf_counter()
    idx = bootstrap_indices(n, n_boot, seed)
    fast = bootstrap_auroc(y, s, idx)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = np.array([roc_auc_score(y[i], s[i]) for i in idx])
    t_slow = time.perf_counter() - t0
    assert np.allclose(fast, slow, atol=1e-12), 'vectorised bootstrap disagrees with scikit-learn'
    return {'bootstrap_auroc_seconds': {'value': round(t_fast, 3), 'unit': 's', 'baseline': round(t_slow, 3),
                                        'ratio': round(t_slow / t_fast, 1), 'note': f'n={n}, B={n_boot}; baseline: loop of roc_auc_score'}}


def bench_count_features(n_patients=2_000, n_events=2_000_000, n_points=20_000, vocab=1_500, days=14, seed=1):
    import pandas as pd
    from cde_workbench.features import _window_pairs
    rng = np.random.default_rng(seed)
    span = 365 * 86400
    ev_pid = np.sort(rng.integers(0, n_patients, n_events)); ev_sec = np.empty(n_events, np.int64)
    bounds = np.searchsorted(ev_pid, np.arange(n_patients + 1))
    for p in range(n_patients):
        a, b = bounds[p], bounds[p + 1]; ev_sec[a:b] = np.sort(rng.integers(0, span, b - a))
    ev_tok = rng.integers(0, vocab, n_events)
    pt_pid = rng.integers(0, n_patients, n_points); pt_sec = rng.integers(0, span, n_points)
    import scipy.sparse as sp
    t0 = time.perf_counter()
    pi, ei = _window_pairs(ev_pid, ev_sec, pt_pid, pt_sec, days)
    m = sp.coo_matrix((np.ones(len(pi), np.float32), (pi, ev_tok[ei])), shape=(n_points, vocab)).tocsr(); m.sum_duplicates()
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = pd.DataFrame({'pid': ev_pid, 'sec': ev_sec, 'tok': ev_tok})
    pts = pd.DataFrame({'pid': pt_pid, 'T': pt_sec, 'point': np.arange(n_points)})
    j = pts.merge(ev, on='pid')
    j = j[(j['sec'] <= j['T']) & (j['sec'] > j['T'] - days * 86400)]
    c = j.groupby(['point', 'tok']).size()
    base = sp.coo_matrix((c.values.astype(np.float32), (c.index.get_level_values(0), c.index.get_level_values(1))), shape=(n_points, vocab)).tocsr()
    t_slow = time.perf_counter() - t0
    assert (base != m).nnz == 0, 'window search disagrees with the pandas baseline'
    return {'count_features_seconds': {'value': round(t_fast, 3), 'unit': 's', 'baseline': round(t_slow, 3), 'ratio': round(t_slow / t_fast, 1),
                                       'note': f'{n_events:,} events, {n_points:,} points, {days}-day window; baseline: pandas merge + filter'}}


def demo_stages():
    p = var_dir() / 'bench' / 'demo_stages.json'
    if not p.exists(): return {}
    d = json.loads(p.read_text())
    return {f'demo_{k}_seconds': {'value': v, 'unit': 's', 'baseline': None, 'ratio': None, 'note': f"make demo, {d['patients']} patients"}
            for k, v in d['seconds'].items()}


def main():
    from hl7_parse import bench_hl7_parse
    from replay import bench_replay
    benches = [bench_bootstrap, bench_count_features, bench_hl7_parse, bench_replay]
    try:
        from mllp import bench_mllp
        benches.append(bench_mllp)
    except ImportError: pass
    figures = {}
    for f in (*benches, demo_stages):
        figures.update(f())
    for name, v in figures.items():
        ratio = f"  ratio {v['ratio']}x (baseline {v['baseline']} {v['unit']})" if v['ratio'] else ''
        print(f"{name:34s} {v['value']:>9} {v['unit']}{ratio}   [{v['note']}]")
    out = var_dir() / 'bench' / 'latest.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(f'written: {out}')


if __name__ == '__main__':
    main()
