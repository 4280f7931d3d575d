"""Coverage of bootstrap intervals for AUROC when a patient contributes many correlated orders.

Simulated hospital with known truth: each patient has a risk the score does not see (u) and a score
error shared by all their orders (v); each order has its own signal (x):

    y = Bernoulli(expit(-0.5 + x + u)),   score = expit(x + v),   u ~ N(0, 1.5²), v ~ N(0, 1), x ~ N(0, 1)

with 1 + Poisson(9) orders per patient. The true AUROC (orders as the unit, as the sample AUROC
estimates it) is computed once on a population of 300,000 patients (Monte Carlo SE ≈ 0.0003).
For each seed, one sample of `patients` patients is drawn and two 95% percentile intervals are
computed with `auroc_ci`: resampling orders (the row bootstrap) and resampling patients (the
cluster bootstrap). Coverage is the share of seeds whose interval contains the truth.

Expected: the row bootstrap under-covers (its intervals ignore the within-patient correlation);
the patient bootstrap covers in 91–99% of seeds.

Run: .venv/bin/python benchmarks/coverage.py [--seeds 200] [--patients 400] [--n-boot 1000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.special import expit

SIGMA_U, SIGMA_V, MEAN_EXTRA_ORDERS = 1.5, 1.0, 9


def simulate(patients: int, rng: np.random.Generator):
    "Labels, scores and patient ids of `patients` simulated patients."
    m = 1 + rng.poisson(MEAN_EXTRA_ORDERS, patients)
    pid = np.repeat(np.arange(patients), m)
    u, v = rng.normal(0, SIGMA_U, patients)[pid], rng.normal(0, SIGMA_V, patients)[pid]
    x = rng.normal(0, 1, len(pid))
    y = (rng.uniform(size=len(pid)) < expit(-0.5 + x + u)).astype(int)
    return y, expit(x + v), pid


def true_auroc(population: int = 300_000, seed: int = 12345) -> float:
    "The population AUROC, by Monte Carlo on a very large simulated population."
    from sklearn.metrics import roc_auc_score
    y, s, _ = simulate(population, np.random.default_rng(seed))
    return float(roc_auc_score(y, s))


def coverage(seeds: int = 200, patients: int = 400, n_boot: int = 1000, truth: float | None = None) -> dict:
    "Coverage and mean width of row- and patient-level 95% AUROC intervals over `seeds` simulated samples."
    from cde_workbench.evaluate import auroc_ci
    truth = true_auroc() if truth is None else truth
    hit = {'row': 0, 'patient': 0}; width = {'row': [], 'patient': []}
    for k in range(seeds):
        y, s, pid = simulate(patients, np.random.default_rng(k))
        for unit, cl in (('row', None), ('patient', pid)):
            e = auroc_ci(y, s, n_boot, seed=k, clusters=cl)
            hit[unit] += e.low <= truth <= e.high; width[unit].append(e.high - e.low)
    return {'truth': truth, 'seeds': seeds, 'patients': patients, 'n_boot': n_boot,
            'coverage': {u: hit[u] / seeds for u in hit}, 'mean_width': {u: float(np.mean(w)) for u, w in width.items()}}


def bench_coverage(seeds: int = 200, patients: int = 400, n_boot: int = 1000) -> dict:
    t0 = time.perf_counter()
    c = coverage(seeds, patients, n_boot)
    note = (f"{seeds} seeds, {patients} patients (~{patients * (1 + MEAN_EXTRA_ORDERS):,} orders) each, B={n_boot:,}, true AUROC {c['truth']:.4f}; "
            f"mean width patient {c['mean_width']['patient']:.4f} vs row {c['mean_width']['row']:.4f}; {time.perf_counter() - t0:.0f} s")
    return {'auroc_ci_coverage_patient': {'value': round(c['coverage']['patient'], 3), 'unit': 'share', 'baseline': round(c['coverage']['row'], 3),
                                          'ratio': round(c['coverage']['patient'] / c['coverage']['row'], 2),
                                          'note': 'patient-level bootstrap (target 0.91-0.99); baseline: row-level bootstrap; ' + note},
            'auroc_ci_coverage_row': {'value': round(c['coverage']['row'], 3), 'unit': 'share', 'baseline': None, 'ratio': None,
                                      'note': 'row-level bootstrap, same samples (under-covers: orders of one patient are correlated)'}}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seeds', type=int, default=200); ap.add_argument('--patients', type=int, default=400)
    ap.add_argument('--n-boot', type=int, default=1000)
    a = ap.parse_args()
    for name, v in bench_coverage(a.seeds, a.patients, a.n_boot).items():
        ratio = f"  ratio {v['ratio']}x (baseline {v['baseline']})" if v['ratio'] else ''
        print(f"{name:30s} {v['value']:>8} {v['unit']}{ratio}   [{v['note']}]")
