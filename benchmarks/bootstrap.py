"""Vectorised bootstrap against loops of scikit-learn calls over the same resample indices.

- bootstrap_auroc_seconds: AUROC of 1,000 resamples of n = 20,000 cases. Ours draws the resamples chunk
  by chunk from the seeded stream (`Resamples`, identical to `bootstrap_indices`) and counts them;
  its time includes drawing the indices. The baseline is a loop of sklearn.metrics.roc_auc_score over
  the same indices (materialised with `bootstrap_indices`; drawing them is not counted against it).
  Every resample's AUROC must agree to 1e-12. Ours is the median of 3 runs.
- cluster_bootstrap_seconds: the same AUROC bootstrap resampling patients (n = 20,000 predictions from
  2,000 patients, B = 1,000; `ClusterResamples`), against the row bootstrap (`Resamples`) on the same data
  as its baseline (target: at most 2x its time). Each cluster resample is checked against
  roc_auc_score on the cases of the drawn patients. Both are medians of 3 runs.
- evaluate_predictions_seconds: every figure of `evaluate_predictions` (AUROC, average precision,
  confusion-matrix metrics, Brier, calibration slope and intercept, net benefit, reliability) with
  1,000 resamples, n = 20,000; no baseline (a scikit-learn/statsmodels loop over 1,000 resamples
  would take minutes), so its ratio is None.

Run: .venv/bin/python benchmarks/bootstrap.py
"""
from __future__ import annotations

import statistics
import time

import numpy as np


def bench_bootstrap(n=20_000, n_boot=1_000, seed=0):
    from scipy.special import expit
    from sklearn.metrics import roc_auc_score
    from cde_workbench.evaluate import ClusterResamples, Resamples, bootstrap_auroc, bootstrap_indices, evaluate_predictions
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n); s = rng.normal(y * 0.8, 1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fast = bootstrap_auroc(y, s, Resamples(n, n_boot, seed))
        times.append(time.perf_counter() - t0)
    t_fast = statistics.median(times)
    idx = bootstrap_indices(n, n_boot, seed)
    t0 = time.perf_counter()
    slow = np.array([roc_auc_score(y[i], s[i]) for i in idx])
    t_slow = time.perf_counter() - t0
    assert np.allclose(fast, slow, atol=1e-12, rtol=0), 'vectorised bootstrap disagrees with scikit-learn'
    # the cluster bootstrap: 2,000 patients with 10 orders each on average, sharing a patient effect
    patient = rng.integers(0, n // 10, n)
    u = rng.normal(0, 1, n // 10)
    yc = (rng.uniform(size=n) < expit(u[patient] - 0.3)).astype(int); sc = rng.normal(yc * 0.8 + 0.5 * u[patient], 1)
    t_row, t_cl = [], []
    for _ in range(3):
        t0 = time.perf_counter(); bootstrap_auroc(yc, sc, Resamples(n, n_boot, seed)); t_row.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); cl = bootstrap_auroc(yc, sc, ClusterResamples(patient, n_boot, seed)); t_cl.append(time.perf_counter() - t0)
    check = ClusterResamples(patient, 5, seed)
    ref = [roc_auc_score(yc[i], sc[i]) for _, rows in check.chunks(5) for i in rows]
    assert np.allclose(bootstrap_auroc(yc, sc, check), ref, atol=1e-12), 'cluster bootstrap disagrees with scikit-learn'
    t_row, t_cl = statistics.median(t_row), statistics.median(t_cl)
    p = expit(rng.normal(y * 1.5 - 0.7, 1))
    t0 = time.perf_counter()
    evaluate_predictions(y, p, threshold=0.5, n_boot=n_boot, seed=seed)
    t_eval = time.perf_counter() - t0
    return {'bootstrap_auroc_seconds': {'value': round(t_fast, 3), 'unit': 's', 'baseline': round(t_slow, 3), 'ratio': round(t_slow / t_fast, 1),
                                        'note': f'n={n:,}, B={n_boot:,}, drawing the indices included (median of 3); baseline: loop of roc_auc_score over the same indices'},
            'cluster_bootstrap_seconds': {'value': round(t_cl, 3), 'unit': 's', 'baseline': round(t_row, 3), 'ratio': round(t_cl / t_row, 2),
                                          'note': f'AUROC, n={n:,} from {n // 10:,} patients, B={n_boot:,}, patients resampled (median of 3); baseline: the row bootstrap on the same data; target ratio <= 2'},
            'evaluate_predictions_seconds': {'value': round(t_eval, 2), 'unit': 's', 'baseline': None, 'ratio': None,
                                             'note': f'every figure with {n_boot:,}-resample intervals, n={n:,}, no subgroups'}}


if __name__ == "__main__":
    for name, v in bench_bootstrap().items():
        ratio = f"  ratio {v['ratio']}x (baseline {v['baseline']} {v['unit']})" if v['ratio'] else ''
        print(f"{name:30s} {v['value']:>8} {v['unit']}{ratio}   [{v['note']}]")
