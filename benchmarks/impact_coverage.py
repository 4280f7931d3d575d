"""Coverage of the impact estimators' 95% intervals on simulated interventions whose effects are known.

Each seed simulates (cde_workbench.interventions):
- a score shown at its threshold 0.5 (4,000 packets): the outcome jumps by -0.8 where shown. The sharp design (shown
  exactly at or above 0.5) and a fuzzy one (shown with probability 0.8 above, 0.1 below) go to `rdd_analysis`
  (rdrobust: triangular kernel, MSE-optimal bandwidth, p = 1; the robust bias-corrected interval); truth -0.8 for both.
  The sharp sample's labels, missing where the repeat test was skipped (more often where shown), go to
  `label_selection_performance` (AUROC weighted by 1 / p_observed, patient bootstrap); truth: the population AUROC, from
  a reference sample of 1,000,000 packets with the same parameters, averaged exactly over their Bernoulli(score)
  labels (Monte Carlo error about 0.0001, a hundredth of the estimates' spread). The naive complete-case AUROC is the contrast: it is biased, so its interval should miss.
- the electrolyte nudge trial (2,000 ICU stays, about 500 randomised (within range, NOAF risk >= 0.1)): `iv_analysis` on the randomised stays, with the
  nudge as instrument for supplementation; ITT truth (0.6 - 0.15) x -0.06 = -0.027, CACE truth -0.06 (each seed's
  truth dict; no probability is clipped among randomised stays with these parameters). ITT with heteroscedasticity-
  robust errors, and again clustered by clinician.

For each estimand: coverage (the share of seeds whose interval holds the truth; target 0.91-0.99), mean interval width,
the estimates' mean and SD over seeds, and se_ratio = mean(half-width / 1.96) / SD of the estimates (about 1 when the
intervals are as wide as the estimator's actual spread; a CI half as wide as it should be gives about 0.5).

Run: .venv/bin/python benchmarks/impact_coverage.py [--seeds 200] [--quick] [--n-boot 1000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl

CUTOFF, EFFECT, FUZZY_COMPLIANCE = 0.5, -0.8, 0.8
REFERENCE_PACKETS, REFERENCE_SEED = 1_000_000, 1_000_000   # the reference sample's seed lies outside the seeds of the study
Z95 = 1.959963984540054
DESIGNS = ('rdd_sharp', 'rdd_fuzzy', 'iv', 'iv_cluster', 'auroc')   # what a seed simulates and estimates
ROWS = {  # estimand: (design, what it is)
    'rdd_sharp': ('rdd_sharp', 'jump in the outcome where shown, sharp RDD, robust bias-corrected CI'),
    'rdd_fuzzy': ('rdd_fuzzy', 'effect of being shown, fuzzy RDD (Wald ratio at the cutoff), robust bias-corrected CI'),
    'itt': ('iv', 'effect of the nudge on NOAF, OLS, HC1 errors'),
    'itt_cluster': ('iv_cluster', 'effect of the nudge on NOAF, OLS, errors clustered by clinician (30)'),
    'cace': ('iv', 'effect of supplementing among compliers, 2SLS, robust errors'),
    'auroc_weighted': ('auroc', 'AUROC weighted by 1 / p_observed, patient bootstrap'),
    'auroc_naive': ('auroc', 'complete-case AUROC (biased: the contrast, expected to under-cover)'),
}


def expected_auroc(score: np.ndarray) -> float:
    "Population AUROC of a calibrated score (label ~ Bernoulli(score)): expected concordant over expected positive-negative pairs of distinct rows."
    s = np.sort(np.asarray(score, dtype=float))
    negatives_below = np.concatenate([[0.0], np.cumsum(1 - s)[:-1]])   # expected negatives scored below each row (continuous: no ties)
    return float(np.dot(s, negatives_below) / (s.sum() * (1 - s).sum() - np.dot(s, 1 - s)))


def population_auroc(packets: int = REFERENCE_PACKETS, seed: int = REFERENCE_SEED) -> float:
    """The population AUROC of the threshold display's score against its true labels, from a large reference sample.
    The simulator's labels are Bernoulli(score), so the labels' own noise is averaged out exactly (`expected_auroc`);
    what is left is the scores' sampling error (about 0.0001 at 1,000,000 packets, against 0.0005 from drawn labels)."""
    from cde_workbench.interventions import simulate_threshold_display
    sample, _ = simulate_threshold_display(packets, seed=seed, threshold=CUTOFF, outcome_effect=EFFECT)
    return expected_auroc(sample['score'].to_numpy())


def seed_estimates(seed: int, designs=DESIGNS, packets: int = 4000, stays: int = 2000, n_boot: int = 1000) -> dict:
    "One seed: {estimand: (estimate, ci_low, ci_high, truth or None)} from the workbench's estimators."
    from cde_workbench.impact import iv_analysis, label_selection_performance, rdd_analysis
    from cde_workbench.interventions import simulate_electrolyte_trial, simulate_threshold_display
    out = {}
    if 'rdd_sharp' in designs or 'auroc' in designs:
        sharp, truth = simulate_threshold_display(packets, seed=seed, threshold=CUTOFF, outcome_effect=EFFECT)
    if 'rdd_sharp' in designs:
        r = rdd_analysis(sharp, running='score', outcome='outcome', cutoff=CUTOFF, placebo_cutoffs=[])['estimate']['robust']
        out['rdd_sharp'] = (r['coef'], *r['ci'], truth['rdd_effect'])
    if 'rdd_fuzzy' in designs:
        fuzzy, ft = simulate_threshold_display(packets, seed=seed, threshold=CUTOFF, outcome_effect=EFFECT, display_compliance=FUZZY_COMPLIANCE)
        r = rdd_analysis(fuzzy, running='score', outcome='outcome', cutoff=CUTOFF, treatment='shown', placebo_cutoffs=[])['estimate']['robust']
        out['rdd_fuzzy'] = (r['coef'], *r['ci'], ft['rdd_effect'])
    if 'iv' in designs or 'iv_cluster' in designs:
        trial, tt = simulate_electrolyte_trial(stays, seed=seed)
        randomised = trial.filter(pl.col('randomised'))
    if 'iv' in designs:
        iv = iv_analysis(randomised, outcome='noaf', treatment='supplemented', instrument='arm', cov='robust')
        out['itt'] = (iv['itt']['coef'], *iv['itt']['ci'], tt['itt'])
        out['cace'] = (iv['cace']['coef'], *iv['cace']['ci'], tt['cace'])
    if 'iv_cluster' in designs:
        cl = iv_analysis(randomised, outcome='noaf', treatment='supplemented', instrument='arm', cov='cluster:clinician')
        out['itt_cluster'] = (cl['itt']['coef'], *cl['itt']['ci'], tt['itt'])
    if 'auroc' in designs:
        ls = label_selection_performance(sharp, label='label', score='score', observed='observed', p_observed='p_observed',
                                         n_boot=n_boot, seed=seed, unit='patient')
        for kind in ('weighted', 'naive'):
            a = ls[kind]['auroc']
            out[f'auroc_{kind}'] = (a['value'], *a['ci'], None)   # truth: the population AUROC, set by `coverage`
    return out


def coverage(seeds: int = 200, designs=DESIGNS, packets: int = 4000, stays: int = 2000, n_boot: int = 1000,
             auroc_truth: float | None = None, first_seed: int = 0) -> dict:
    "Coverage, mean width and the estimates' spread per estimand of `designs` over `seeds` samples; 'runs' holds each seed's (estimate, low, high, truth)."
    unknown = sorted(set(designs) - set(DESIGNS))
    if unknown: raise ValueError(f"unknown design(s) {', '.join(unknown)}: use {', '.join(DESIGNS)}")
    if 'auroc' in designs and auroc_truth is None: auroc_truth = population_auroc()
    runs = {}
    t0 = time.perf_counter()
    for k in range(first_seed, first_seed + seeds):
        for name, (est, lo, hi, truth) in seed_estimates(k, designs, packets, stays, n_boot).items():
            runs.setdefault(name, []).append((est, lo, hi, auroc_truth if truth is None else truth))
    rows = []
    for name in ROWS:
        if name not in runs: continue
        est, lo, hi, truth = (np.array(v, dtype=float) for v in zip(*runs[name]))
        sd = float(est.std(ddof=1)) if len(est) > 1 else float('nan')
        width = hi - lo
        rows.append({'estimand': name, 'what': ROWS[name][1], 'truth': float(truth.mean()), 'coverage': float(((lo <= truth) & (truth <= hi)).mean()),
                     'mean_width': float(width.mean()), 'mean_estimate': float(est.mean()), 'sd_estimate': sd,
                     'se_ratio': float((width / (2 * Z95)).mean() / sd) if sd > 0 else float('nan'), 'seeds': len(est)})
    return {'rows': rows, 'runs': runs, 'seeds': seeds, 'packets': packets, 'stays': stays, 'n_boot': n_boot, 'auroc_truth': auroc_truth,
            'seconds': time.perf_counter() - t0}


def table(c: dict) -> str:
    "The coverage table as text."
    lines = [f"{'estimand':15s} {'truth':>8s} {'coverage':>9s} {'mean width':>11s} {'mean est':>9s} {'sd est':>8s} {'se ratio':>9s} {'seeds':>6s}"]
    for r in c['rows']:
        lines.append(f"{r['estimand']:15s} {r['truth']:8.4f} {r['coverage']:9.3f} {r['mean_width']:11.4f} {r['mean_estimate']:9.4f} "
                     f"{r['sd_estimate']:8.4f} {r['se_ratio']:9.2f} {r['seeds']:6d}")
    return '\n'.join(lines)


def bench_impact_coverage(seeds: int = 200, n_boot: int = 1000) -> dict:
    "The figures for benchmarks/run.py: coverage of each estimand's 95% interval (target 0.91-0.99)."
    c = coverage(seeds, n_boot=n_boot)
    rows = {r['estimand']: r for r in c['rows']}
    common = f"{seeds} seeds; {c['packets']:,} packets / {c['stays']:,} ICU stays each; {c['seconds']:.0f} s for all"
    figures = {}
    for name in ('rdd_sharp', 'rdd_fuzzy', 'itt', 'itt_cluster', 'cace', 'auroc_weighted'):
        r = rows[name]
        base = rows['auroc_naive'] if name == 'auroc_weighted' else None
        figures[f'impact_coverage_{name}'] = {
            'value': round(r['coverage'], 3), 'unit': 'share', 'baseline': None if base is None else round(base['coverage'], 3),
            'ratio': None if base is None or not base['coverage'] else round(r['coverage'] / base['coverage'], 2),
            'note': (f"{r['what']} (target 0.91-0.99); truth {r['truth']:.4f}, mean width {r['mean_width']:.4f}, se ratio {r['se_ratio']:.2f}; "
                     + ('baseline: the naive complete-case AUROC, same samples; ' if base else '') + common)}
    return figures


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seeds', type=int, default=None, help='simulated samples (default 200; 30 with --quick)')
    ap.add_argument('--quick', action='store_true', help='30 seeds and 300 bootstrap resamples: a rough look in a minute')
    ap.add_argument('--n-boot', type=int, default=None, help='bootstrap resamples of the AUROC (default 1000; 300 with --quick)')
    a = ap.parse_args()
    seeds = a.seeds or (30 if a.quick else 200)
    n_boot = a.n_boot or (300 if a.quick else 1000)
    c = coverage(seeds, n_boot=n_boot)
    print(f"Coverage of 95% intervals over {seeds} seeds ({c['packets']:,} packets, {c['stays']:,} ICU stays per seed; "
          f"AUROC B={n_boot}; population AUROC {c['auroc_truth']:.4f} from {REFERENCE_PACKETS:,} packets); target 0.91-0.99")
    print(table(c))
    for r in c['rows']: print(f"  {r['estimand']}: {r['what']}")
    print(f"{c['seconds']:.0f} s")
